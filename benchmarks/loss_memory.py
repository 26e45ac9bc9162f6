"""Per-device temporary memory of the sharded contrastive loss, from XLA.

For each number of simulated CPU devices (one subprocess each, since the
device count is fixed when JAX starts) and each global batch B, compiles
three losses on 512-d float32 embeddings sharded over 'data' and reads
``compiled.memory_analysis().temp_size_in_bytes`` (per device):

  sharded     flair_jax.training.losses.sharded_label_aware_contrastive_loss
  full        each device all-gathers and forms the full [B, B] logits
  gspmd       the single-device formula under jit, left to XLA's partitioner

beside the floor: the all-gathered embeddings of both towers plus one
[B/n, B] float32 block of logits per direction. Compilation only: nothing
is allocated, so the grid can exceed this machine's memory.

  python benchmarks/loss_memory.py --out benchmarks/RESULTS_loss_memory.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

MIB = 2 ** 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)
from benchmarks import machine_info  # pylint: disable=g-import-not-at-top,wrong-import-position


def floor_bytes(batch, devices, dim, grad=False):
  """Gathered embeddings (+ their cotangents for grad) + 2 [B/n, B] blocks."""
  embeddings = 2 * batch * dim * 4
  return embeddings * (2 if grad else 1) + 2 * (batch // devices) * batch * 4


def measure(devices, batches, dim):
  """Runs in the subprocess; JAX sees ``devices`` CPU devices."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from flair_jax import parallel
  from flair_jax.training import losses

  assert jax.device_count() == devices, jax.device_count()
  mesh = parallel.make_mesh()
  batch_sh, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())

  def full_logits_body(img, txt, scale, cat):
    gather = functools.partial(jax.lax.all_gather, axis_name='data', tiled=True)
    loss = losses.label_aware_contrastive_loss(gather(img), gather(txt), scale, gather(cat))
    return jax.lax.psum(loss, 'data') / devices

  variants = {
      'sharded': losses.sharded_label_aware_contrastive_loss(mesh),
      'full': jax.shard_map(full_logits_body, mesh=mesh, out_specs=P(),
                            in_specs=(P('data'), P('data'), P(), P('data'))),
      'gspmd': losses.label_aware_contrastive_loss,
  }
  rows = []
  for batch in batches:
    args = (jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=batch_sh),
            jax.ShapeDtypeStruct((batch, dim), jnp.float32, sharding=batch_sh),
            jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
            jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sh))
    row = {'devices': devices, 'batch': batch}
    for name, fn in variants.items():
      for suffix, f in (('', fn), ('_grad', jax.value_and_grad(fn, argnums=(0, 1, 2)))):
        start = time.perf_counter()
        compiled = jax.jit(f).lower(*args).compile()
        row[name + suffix] = compiled.memory_analysis().temp_size_in_bytes
        row['compile_s'] = row.get('compile_s', 0.0) + time.perf_counter() - start
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def machine():
  info = {'Model name': machine_info.cpu_model(), 'CPU(s)': str(os.cpu_count()),
          'RAM': f'{machine_info.ram_gib():.1f} GiB'}
  import jax  # pylint: disable=g-import-not-at-top
  info['cores (os.cpu_count)'] = os.cpu_count()
  info['python / jax'] = f'{platform.python_version()} / {jax.__version__}'
  info['date'] = datetime.date.today().isoformat()
  return info


def table(rows, dim):
  lines = [
      '| devices | global B | B per device | floor MiB | sharded MiB '
      '| sharded / floor | full B x B MiB | gspmd MiB | grad floor MiB '
      '| sharded+grad MiB | sharded+grad / grad floor | full+grad MiB '
      '| gspmd+grad MiB |',
      '|' + '---:|' * 13]
  for r in rows:
    n, b = r['devices'], r['batch']
    fl, gfl = floor_bytes(b, n, dim), floor_bytes(b, n, dim, grad=True)
    lines.append(
        f"| {n} | {b:,} | {b // n:,} | {fl / MIB:,.1f} | {r['sharded'] / MIB:,.1f} "
        f"| {r['sharded'] / fl:.2f} | {r['full'] / MIB:,.1f} | {r['gspmd'] / MIB:,.1f} "
        f"| {gfl / MIB:,.1f} | {r['sharded_grad'] / MIB:,.1f} | {r['sharded_grad'] / gfl:.2f} "
        f"| {r['full_grad'] / MIB:,.1f} | {r['gspmd_grad'] / MIB:,.1f} |")
  return '\n'.join(lines)


def summary(rows, dim):
  """Worst ratios to the floors, and growth with B at a fixed per-device batch."""

  def ratio(r, grad=False):
    return r['sharded_grad' if grad else 'sharded'] / floor_bytes(
        r['batch'], r['devices'], dim, grad=grad)

  worst = max(rows, key=ratio)
  worst_grad = max(rows, key=lambda r: ratio(r, grad=True))
  lines = [
      f"Worst sharded / floor: {ratio(worst):.2f} ({worst['devices']} devices, "
      f"B = {worst['batch']:,}); with gradients {ratio(worst_grad, grad=True):.2f} "
      f"({worst_grad['devices']} devices, B = {worst_grad['batch']:,}).", '',
      'At a fixed per-device batch, sharded KiB per sample of the global batch '
      '(constant = linear in B):', '',
      '| B per device | global B: KiB per sample |', '| ---: | --- |']
  by_local = {}
  for r in rows:
    by_local.setdefault(r['batch'] // r['devices'], []).append(r)
  for local, group in sorted(by_local.items()):
    if len(group) > 1:
      cells = ', '.join(f"{r['batch']:,}: {r['sharded'] / r['batch'] / 1024:.1f}"
                        for r in sorted(group, key=lambda r: r['batch']))
      lines.append(f'| {local:,} | {cells} |')
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', default='8,16,32,64,128,256')
  parser.add_argument('--batches', default='1024,4096,16384,65536')
  parser.add_argument('--dim', type=int, default=512)
  parser.add_argument('--out', default=None, help='markdown file to write')
  parser.add_argument('--worker', type=int, default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(',')]
  if args.worker is not None:
    measure(args.worker, [b for b in batches if b % args.worker == 0 and b >= args.worker],
            args.dim)
    return

  rows, start = [], time.perf_counter()
  for n in (int(d) for d in args.devices.split(',')):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}',
               JAX_PLATFORMS='cpu',
               PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
    out = subprocess.run([sys.executable, __file__, '--worker', str(n), '--batches',
                          args.batches, '--dim', str(args.dim)],
                         env=env, capture_output=True, text=True, check=True).stdout
    rows += [json.loads(line) for line in out.splitlines() if line.startswith('{')]
    print(f'{n} devices done, {time.perf_counter() - start:.0f} s', file=sys.stderr)
  report = [
      '# Sharded loss memory (per device, from XLA memory analysis)', '',
      f'Embedding dim {args.dim}, float32; temporary bytes of the compiled '
      'program per device (arguments and outputs excluded); XLA CPU backend '
      'with simulated devices. floor = all-gathered embeddings of both towers '
      '+ one [B/n, B] float32 logits block per direction; grad floor adds the '
      'cotangents of the gathered embeddings. full = every device forms the '
      '[B, B] logits; gspmd = the one-device formula under jit with the batch '
      'sharded, partitioned by XLA.', '',
      'The XLA CPU backend does not fuse elementwise producers into '
      'reductions, so reducing the [B/n, B] logits under the same-category '
      'mask costs a materialised copy here (GPU and TPU fusions usually '
      'avoid it; not measured here). The loss therefore sums keys per '
      'category instead (`positives=\'segment\'`, an extra [B, D] per '
      'direction) once B/n > 2 D; the ratio is highest near B/n = 2 D. '
      'Ratios below 1: XLA does not keep both gathered towers and both '
      'blocks alive at once.', '',
      table(rows, args.dim), '',
      *summary(rows, args.dim), '',
      f'Total wall time {time.perf_counter() - start:.0f} s '
      f'({sum(r["compile_s"] for r in rows):.0f} s compiling).', '',
      '| machine | |', '| --- | --- |',
      *[f'| {k} | {v} |' for k, v in machine().items()], '']
  text = '\n'.join(report)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)


if __name__ == '__main__':
  main()
