"""XLA:CPU options against the flair_jax training step: images/s and loss.

Each candidate is a set of ``XLA_FLAGS`` (or a device split) given to a
fresh ``benchmarks/train_throughput.py --no-torch`` process; candidates run
in rounds, in a rotated order each round, so that a change of the machine's
load falls on all of them alike. Reported per candidate: the median images/s
over the rounds, its ratio to the baseline (no flags), the compile time, and
the loss after the timed steps against the baseline's (an option that
changes the numerics shows here: float32 rounding moves the loss by about
1e-6 relative; fast-math or reduced precision by more).

  python benchmarks/cpu_flags.py --rounds 3 -- --image-size 64 --batch 16 \\
      --resnet-stages 1 1 1 1 --resnet-width 16 --bert-layers 2 --bert-hidden 64 \\
      --bert-heads 2 --bert-intermediate 128 --bert-vocab 1000 --proj-dim 32

Arguments after ``--`` go to ``train_throughput.py`` unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import machine_info  # pylint: disable=g-import-not-at-top,wrong-import-position

# name -> (XLA_FLAGS to add, extra train_throughput arguments)
CANDIDATES = {
    'baseline': ('', ()),
    'onednn': ('--xla_cpu_use_onednn=true', ()),
    'onednn custom calls': ('--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true', ()),
    'xnnpack': ('--xla_cpu_use_xnnpack=true', ()),
    'xnn fusion dot+eltwise': ('--xla_cpu_use_xnnpack=true '
                               '--xla_cpu_experimental_xnn_fusion_type=dot,eltwise', ()),
    'onednn fusion': ('--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce', ()),
    'xnn graph fusion': ('--xla_cpu_use_xnnpack=true --xla_cpu_experimental_xnn_graph_fusion_mode='
                         'XNN_GRAPH_FUSION_MODE_GREEDY', ()),
    'ynn fusion': ('--xla_cpu_experimental_ynn_fusion_type=dot,eltwise', ()),
    'ynn fusion + convolutions': (
        '--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,individual_convolution', ()),
    'onednn convolutions and dots': (
        '--xla_cpu_use_onednn=true '
        '--xla_cpu_experimental_onednn_fusion_type=individual_convolution,individual_dot', ()),
    'onednn + ynn fusion': ('--xla_cpu_use_onednn=true '
                            '--xla_cpu_experimental_ynn_fusion_type=dot,eltwise', ()),
    'multi-output fusion': ('--xla_cpu_use_multi_output_fusion=true', ()),
    'no thunk runtime': ('--xla_cpu_use_thunk_runtime=false', ()),
    'fast math': ('--xla_cpu_enable_fast_math=true', ()),
    'vector width 512': ('--xla_cpu_prefer_vector_width=512', ()),
    'eigen single thread': ('--xla_cpu_multi_thread_eigen=false', ()),
    'concurrency scheduler off': ('--xla_cpu_enable_concurrency_optimized_scheduler=false', ()),
    '2 devices x 1 core': ('', ('--devices', '2')),
}


def run_one(name: str, flags: str, extra: tuple, bench_args: list, out_dir: str) -> dict:
  """One benchmark process; its JSON record, or the error it printed."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = ' '.join(f for f in (env.get('XLA_FLAGS', ''), flags) if f)
  out = os.path.join(out_dir, f'{abs(hash((name, len(os.listdir(out_dir)))))}.jsonl')
  cmd = [sys.executable, os.path.join(REPO, 'benchmarks', 'train_throughput.py'), '--no-torch',
         *bench_args, *extra, '--json-out', out, '--label', name]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode or not os.path.exists(out):
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']
    return {'error': tail[0][:200]}
  with open(out, encoding='utf-8') as f:
    return json.loads(f.readline())


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  split = argv.index('--') if '--' in argv else len(argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--rounds', type=int, default=3)
  p.add_argument('--only', nargs='*', default=None, help='candidate names (default: all)')
  p.add_argument('--out', default=None, help='append the markdown table to this file')
  args = p.parse_args(argv[:split])
  bench_args = argv[split + 1:]
  names = args.only or list(CANDIDATES)
  if 'baseline' not in names:
    names = ['baseline', *names]
  unknown = sorted(set(names) - set(CANDIDATES))
  if unknown:
    raise SystemExit(f'error: unknown candidates {unknown}; known: {sorted(CANDIDATES)}')
  results = {n: [] for n in names}
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as out_dir:
    for r in range(args.rounds):
      order = names[r % len(names):] + names[:r % len(names)]
      for name in order:
        record = run_one(name, *CANDIDATES[name], bench_args, out_dir)
        results[name].append(record)
        rate = record.get('jax_images_per_s')
        print(f'round {r + 1}: {name}: ' + (f'{rate:.2f} img/s' if rate else record['error']),
              flush=True)
  base = [x['jax_images_per_s'] for x in results['baseline'] if 'jax_images_per_s' in x]
  base_rate = statistics.median(base) if base else None
  base_loss = next((x['final_loss'] for x in results['baseline'] if 'final_loss' in x), None)
  lines = [f'{machine_info.describe()}, {datetime.date.today()}, load '
           f'{load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after; '
           f'{args.rounds} rounds; train_throughput.py {" ".join(bench_args)}', '',
           '| option | XLA_FLAGS / setting | img/s (median) | vs baseline | compile s | '
           'loss - baseline loss |', '|---|---|---:|---:|---:|---:|']
  for name in names:
    ok = [x for x in results[name] if 'jax_images_per_s' in x]
    flags, extra = CANDIDATES[name]
    setting = ' '.join(filter(None, [flags, ' '.join(extra)])) or '(none)'
    if not ok:
      err = results[name][0].get('error', '?') if results[name] else '?'
      lines.append(f'| {name} | `{setting}` | failed: {err} | - | - | - |')
      continue
    rate = statistics.median(x['jax_images_per_s'] for x in ok)
    compile_s = statistics.median(x['jax_compile_s'] for x in ok)
    loss = ok[0].get('final_loss')
    dloss = f'{loss - base_loss:.2e}' if loss is not None and base_loss is not None else '-'
    ratio = f'{rate / base_rate:.2f}' if base_rate else '-'
    lines.append(f'| {name} | `{setting}` | {rate:.2f} | {ratio} | {compile_s:.0f} | {dloss} |')
  table = '\n'.join(lines)
  print(table)
  if args.out:
    with open(args.out, 'a', encoding='utf-8') as f:
      f.write(table + '\n\n')


if __name__ == '__main__':
  main()
