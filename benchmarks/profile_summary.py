"""The operations that take the time in a ``jax.profiler.trace`` capture.

Reads the ``perfetto_trace.json.gz`` that ``jax.profiler.trace(dir,
create_perfetto_trace=True)`` writes (plain JSON: no TensorBoard needed),
sums the durations of the compiled program's operations per name, and labels
each with the JAX operation behind it from the HLO ``op_name`` metadata of
``compiled.as_text()``.

  python benchmarks/profile_summary.py TRACE_DIR [--hlo step.hlo.txt] [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re

# Host-side events that are not operations of the compiled program.
_NOT_OPS = re.compile(r'^(\$|ThunkExecutor|PjitFunction|PjRt|CommonPjRt|Execute|XLA Modules|'
                      r'jit_|TfrtCpu|ProfileScope|Memcpy|cuStream|cuda[A-Z]|MemsetD)')
_HLO_LINE = re.compile(
    r'^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*\S+.*?\s(?P<opcode>[a-z][\w\-]*)\(')
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')


def latest_trace(trace_dir: str) -> str:
  """The newest ``perfetto_trace.json.gz`` under ``trace_dir``."""
  paths = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {trace_dir}; capture with '
                            'jax.profiler.trace(dir, create_perfetto_trace=True)')
  return max(paths, key=os.path.getmtime)


def hlo_index(hlo_text: str) -> dict:
  """HLO instruction name -> ``(opcode, op_name)`` from a module's text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _HLO_LINE.match(line)
    if m:
      name = _OP_NAME.search(line)
      out[m['name']] = (m['opcode'], name['op_name'] if name else '')
  return out


def _short(op_name: str, width: int = 90) -> str:
  """The innermost JAX operations of a long ``jit(...)/jvp(...)/...`` path."""
  parts = [p for p in op_name.split('/') if p]
  text = '/'.join(parts[-3:])
  return text if len(text) <= width else '...' + text[-width + 3:]


def summarize_trace(path: str, hlo_text: str = '', top: int = 25) -> dict:
  """Per-thread busy time and the ``top`` operations by summed duration.

  Returns:
    ``{'threads': {thread: ms}, 'total_ms': float, 'ops': [{name, device,
    ms, count, share, opcode, op_name}], 'primitives': [{pass_, primitive,
    ms, share}]}`` (time summed by JAX primitive and pass; '-' for
    instructions without metadata, named by opcode); ``share`` is of the summed
    operation time of all device/compute threads.
  """
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      processes[e['pid']] = e['args']['name']
    elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[(e['pid'], e['tid'])] = e['args']['name']
  index = hlo_index(hlo_text) if hlo_text else {}
  # Where a device has an 'XLA Ops' line, its stream lines repeat the same
  # time as kernels: count the ops line only.
  with_ops_line = {pid for (pid, _), name in threads.items() if name == 'XLA Ops'}
  per_op = collections.defaultdict(lambda: [0.0, 0])
  per_thread = collections.Counter()
  for e in events:
    if e.get('ph') != 'X' or _NOT_OPS.match(e.get('name', '')):
      continue
    process = processes.get(e['pid'], '')
    thread = threads.get((e['pid'], e['tid']), str(e['tid']))
    if thread == 'python' or 'XLA Modules' in thread or 'TraceMe' in thread:
      continue
    if e['pid'] in with_ops_line and thread != 'XLA Ops':
      continue
    if index and e['name'] not in index and '/device:' not in process:
      continue  # host events that are not HLO instructions
    key = (process, e['name'])  # threads of one device (CPU pool threads) merged
    per_op[key][0] += e.get('dur', 0.0) / 1e3
    per_op[key][1] += 1
    per_thread[f'{process} {thread}'.strip()] += e.get('dur', 0.0) / 1e3
  total = sum(ms for ms, _ in per_op.values()) or 1.0
  by_primitive = collections.Counter()
  for (_, name), (ms, _) in per_op.items():
    opcode, op_name = index.get(name, ('?', ''))
    pass_ = 'backward' if 'transpose(' in op_name else 'forward' if op_name else '-'
    by_primitive[(pass_, op_name.rsplit('/', 1)[-1] if op_name else opcode)] += ms
  ops = []
  for (process, name), (ms, count) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]:
    opcode, op_name = index.get(name, ('', ''))
    ops.append(dict(name=name, device=process, ms=ms, count=count, share=ms / total,
                    opcode=opcode, op_name=_short(op_name)))
  primitives = [dict(pass_=k[0], primitive=k[1], ms=ms, share=ms / total)
                for k, ms in by_primitive.most_common(top)]
  return dict(trace=path, threads=dict(per_thread), total_ms=total, ops=ops,
              primitives=primitives)


def markdown(summary: dict) -> str:
  lines = [f"Trace `{summary['trace']}`: {summary['total_ms']:.1f} ms of operations in all.", '',
           '| op | device | ms | calls | share | opcode | JAX operation |',
           '|---|---|---:|---:|---:|---|---|']
  for o in summary['ops']:
    lines.append(f"| {o['name']} | {o['device']} | {o['ms']:.2f} | {o['count']} "
                 f"| {o['share']:.1%} | {o['opcode']} | {o['op_name']} |")
  lines += ['', '| pass | JAX primitive (or HLO opcode) | ms | share |', '|---|---|---:|---:|']
  for o in summary.get('primitives', []):
    lines.append(f"| {o['pass_']} | {o['primitive']} | {o['ms']:.2f} | {o['share']:.1%} |")
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('trace_dir')
  p.add_argument('--hlo', default=None, help='compiled.as_text() of the profiled program')
  p.add_argument('--top', type=int, default=25)
  args = p.parse_args(argv)
  hlo = open(args.hlo, encoding='utf-8').read() if args.hlo else ''
  print(markdown(summarize_trace(latest_trace(args.trace_dir), hlo, args.top)))


if __name__ == '__main__':
  main()
