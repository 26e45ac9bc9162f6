"""Collectives in the compiled training step on 1, 2, 4 and 8 CPU devices.

Each device count runs in its own process (``XLA_FLAGS=
--xla_force_host_platform_device_count=N``), compiles ``make_train_step``
with tiny towers and the batch sharded on ``'data'``, and counts the
collectives of the optimised HLO (``compiled.as_text()``) by kind, with
their bytes (result shapes; an all-gather's result is the gathered array).
Each collective is also given a role from the JAX operations behind it
(the HLO ``op_name`` metadata; XLA's combiner merges several into one
instruction, whose metadata then lists them all):

  loss gather            the loss's all-gathers of embeddings and category ids
  loss gather transpose  their gradients (reduce-scatters)
  text length max        the batch's longest caption, for FLAIR's text pooling
  BatchNorm statistics   forward sums over the batch for the batch statistics
  loss sum               the loss's forward ``psum`` (when not combined)
  backward               backward reductions: parameter gradients, BatchNorm's
                         backward batch sums, the loss's psum transposes

Backward operands with two or more non-unit dimensions are weight gradients;
the others are BatchNorm sums or bias, scale and temperature gradients.

  python benchmarks/collectives.py --out benchmarks/RESULTS_collectives.md
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute', 'all-to-all')
DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4,
               'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
_INSTRUCTION = re.compile(
    r'=\s*(?P<shape>.*?)\s+(?P<kind>' + '|'.join(KINDS) + r')(?P<start>-start)?\((?P<rest>.*)$')
_ARRAY = re.compile(r'\b(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]')
_OP_NAME = re.compile(r'op_name="(?P<name>[^"]*)"')
# Tiny towers with odd sizes, as the step's tests use.
TINY = dict(image=29, batch=16, resnet_stages=(1, 1, 1, 1), resnet_width=16, proj_dim=17,
            bert=dict(vocab_size=211, hidden_size=44, num_hidden_layers=3, num_attention_heads=4,
                      intermediate_size=53))


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective instruction of an HLO module."""
  kind: str
  arrays: tuple  # ((dtype, dims), ...) of the result, one per combined operand
  op_name: str

  @property
  def bytes(self) -> int:
    return sum(DTYPE_BYTES.get(dt, 4) * _prod(dims) for dt, dims in self.arrays)

  @property
  def largest_dims(self) -> tuple:
    return max((dims for _, dims in self.arrays), key=_prod, default=())


def _prod(dims):
  out = 1
  for d in dims:
    out *= d
  return out


def parse_collectives(hlo_text: str) -> list:
  """Every collective of an HLO module's text (``-done`` halves not counted)."""
  out = []
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.search(line)
    if m is None:
      continue
    arrays = tuple((a['dtype'], tuple(int(d) for d in a['dims'].split(',') if d))
                   for a in _ARRAY.finditer(m['shape']))
    if m['start'] and m['kind'] in ('all-gather', 'collective-permute') and len(arrays) >= 2:
      arrays = arrays[len(arrays) // 2:]  # (operands, results): keep the results
    name = _OP_NAME.search(m['rest'])
    out.append(Collective(m['kind'], arrays, name['name'] if name else ''))
  return out


def role(c: Collective) -> str:
  """What a collective is for, from its kind and its JAX operations (see the module doc)."""
  name = c.op_name
  if c.kind == 'all-gather':
    return 'loss gather' if 'all_gather' in name else 'other gather'
  if c.kind == 'reduce-scatter':
    return 'loss gather transpose' if 'transpose(' in name else 'other reduce-scatter'
  if c.kind != 'all-reduce':
    return 'other'
  if 'transpose(' in name:
    return 'backward'
  if 'reduce_max' in name:
    return 'text length max'
  if 'psum' in name:
    return 'loss sum'
  return 'BatchNorm statistics'


def summarize(collectives) -> dict:
  """Counts, operands and bytes per kind and per ``kind: role``; backward operands."""
  by_kind = {k: dict(count=0, operands=0, bytes=0) for k in KINDS}
  by_role = collections.defaultdict(lambda: dict(count=0, operands=0, bytes=0))
  backward_operands = dict(weights=0, weight_bytes=0, vectors=0, vector_bytes=0)
  for c in collectives:
    for table, key in ((by_kind, c.kind), (by_role, f'{c.kind}: {role(c)}')):
      table[key]['count'] += 1
      table[key]['operands'] += len(c.arrays)
      table[key]['bytes'] += c.bytes
    if role(c) == 'backward':
      for dtype, dims in c.arrays:
        kind = 'weight' if sum(d > 1 for d in dims) >= 2 else 'vector'
        backward_operands[kind + 's'] += 1
        backward_operands[kind + '_bytes'] += DTYPE_BYTES.get(dtype, 4) * _prod(dims)
  return dict(kinds=by_kind, roles=dict(sorted(by_role.items())),
              backward_operands=backward_operands)


def compile_tiny_step(devices, *, batch=TINY['batch'], image=TINY['image']):
  """The tiny-tower training step compiled on a ``'data'`` mesh over ``devices``."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from benchmarks import train_throughput as tt  # pylint: disable=g-import-not-at-top
  from flair_jax import parallel  # pylint: disable=g-import-not-at-top
  from flair_jax.training import optim, step as step_lib  # pylint: disable=g-import-not-at-top
  from flair_jax.models import BertConfig, ModelConfig, VisionConfig, build_model  # pylint: disable=g-import-not-at-top

  mesh = parallel.make_mesh(devices=devices)
  tx = optim.make_optimizer(1e-4, trainable_mask=lambda p: optim.trainable_mask(p, tt.FROZEN))

  def make():
    model = build_model(ModelConfig(
        bert=BertConfig(**TINY['bert']), proj_dim=TINY['proj_dim'],
        vision=VisionConfig(stages=TINY['resnet_stages'], width=TINY['resnet_width'])),
        rngs=nnx.Rngs(0))
    model.train()
    return model

  graphdef, state = tt.init_train_state(make, tx, mesh)
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 11, batch).astype(np.int32)
  ids = rng.integers(5, TINY['bert']['vocab_size'], (batch, 77))
  ids *= np.arange(77) < lengths[:, None]
  host = dict(image=rng.integers(0, 256, (batch, image, image, 3), dtype=np.uint8),
              input_ids=ids.astype(np.int32), lengths=lengths,
              category=rng.integers(0, 4, batch).astype(np.int32))
  step = step_lib.make_train_step(graphdef, tx, mesh)
  compiled = step.lower(state, parallel.global_batch(host, mesh), jax.random.key(0)).compile()
  return compiled, state


def worker(n: int) -> dict:
  """Compile on ``n`` devices; the summary, flops and the parameter count."""
  import jax  # pylint: disable=g-import-not-at-top

  if len(jax.devices()) < n:
    raise RuntimeError(f'{len(jax.devices())} devices visible, {n} needed: set XLA_FLAGS='
                       f'--xla_force_host_platform_device_count={n} before JAX starts')
  compiled, state = compile_tiny_step(jax.devices()[:n])
  hlo = compiled.as_text()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  params = jax.tree.leaves(state.params)
  return dict(devices=n, flops_per_device=float(cost['flops']), **summarize(parse_collectives(hlo)),
              param_tensors=len(params), param_bytes=int(sum(p.nbytes for p in params)),
              grad_shapes_all_reduced=_grad_shapes_reduced(parse_collectives(hlo), params))


def _grad_shapes_reduced(collectives, params) -> str:
  """How many parameter tensors meet a backward all-reduce operand of their shape.

  Shapes are compared as given or reversed (XLA may reduce a transposed
  gradient). Expected misses: the unused BERT pooler, position embeddings
  (only the rows of the static length are reduced) and BatchNorm
  scale/bias gradients reduced as ``[1, 1, C]`` sums.
  """
  seen = collections.Counter(dims for c in collectives
                             if c.kind == 'all-reduce' and role(c) == 'backward'
                             for _, dims in c.arrays)
  matched = 0
  for p in params:
    for shape in (tuple(p.shape), tuple(reversed(p.shape))):
      if seen[shape] > 0:
        seen[shape] -= 1
        matched += 1
        break
  return f'{matched} of {len(params)}'


def with_device_count(env: dict, n: int) -> dict:
  """``env`` with XLA_FLAGS asking for ``n`` host (CPU) devices."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', env.get('XLA_FLAGS', ''))
  return dict(env, XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={n}'.strip())


ROLES = ('all-gather: loss gather', 'reduce-scatter: loss gather transpose',
         'all-reduce: text length max', 'all-reduce: BatchNorm statistics', 'all-reduce: loss sum',
         'all-reduce: backward')


def _cell(v) -> str:
  return '0' if not v or not v['count'] else (f"{v['count']} ({v['operands']}), "
                                              f"{v['bytes'] / 1024:,.1f} KiB")


def markdown(results) -> str:
  """Three tables: per kind, per role, FLOPs and gradient coverage."""
  lines = ['Cells: instructions (operands), bytes of the results.', '',
           '| devices | ' + ' | '.join(KINDS) + ' |', '|---:|' + '---|' * len(KINDS)]
  for r in results:
    lines.append(f"| {r['devices']} | " + ' | '.join(_cell(r['kinds'][k]) for k in KINDS) + ' |')
  other = sorted({k for r in results for k in r['roles']} - set(ROLES))
  roles = list(ROLES) + other
  lines += ['', '| devices | ' + ' | '.join(roles) + ' | backward weight operands '
            '| backward vector operands |', '|---:|' + '---|' * (len(roles) + 2)]
  for r in results:
    b = r['backward_operands']
    lines.append(f"| {r['devices']} | " + ' | '.join(_cell(r['roles'].get(k)) for k in roles)
                 + f" | {b['weights']}, {b['weight_bytes'] / 1024:,.1f} KiB "
                 f"| {b['vectors']}, {b['vector_bytes'] / 1024:,.1f} KiB |")
  lines += ['', '| devices | XLA GFLOP per device | x devices | parameter tensors (MiB) '
            '| parameter tensors met in backward all-reduces (by shape) |',
            '|---:|---:|---:|---:|---|']
  for r in results:
    lines.append(f"| {r['devices']} | {r['flops_per_device'] / 1e9:.3f} "
                 f"| {r['flops_per_device'] * r['devices'] / 1e9:.3f} "
                 f"| {r['param_tensors']} ({r['param_bytes'] / 2**20:.2f}) "
                 f"| {r['grad_shapes_all_reduced']} |")
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--devices', type=int, nargs='+', default=[1, 2, 4, 8])
  p.add_argument('--worker', type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument('--out', default=None, help='write the markdown tables here')
  p.add_argument('--json-out', default=None, help='write the raw results here')
  args = p.parse_args(argv)
  if args.worker is not None:
    print(json.dumps(worker(args.worker)))
    return None
  results = []
  for n in args.devices:
    run = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker', str(n)],
                         env=with_device_count(dict(os.environ), n), capture_output=True,
                         text=True, check=False)
    if run.returncode:
      raise RuntimeError(f'worker for {n} devices failed:\n{run.stderr[-3000:]}')
    results.append(json.loads(run.stdout.strip().splitlines()[-1]))
  if args.json_out:
    with open(args.json_out, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=1)
  table = markdown(results)
  print(table)
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      f.write(f'# Collectives of the training step\n\nGenerated {datetime.date.today()} by '
              f'`python benchmarks/collectives.py --out {args.out}`.\n\n{table}\n')
  return results


if __name__ == '__main__':
  main()
