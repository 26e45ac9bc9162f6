"""Gradient accumulation: memory and speed of the step for K micro-batches.

For each K, the flair_jax step (``train.accumulation_steps = K``) at one
fixed global batch is compiled; reported are XLA's memory plan of the
compiled step per device (arguments + outputs - aliased + temporaries, and
the temporaries alone, where the towers' activations live) and, unless
``--compile-only``, images/s over timed steps (compilation and warm-up
excluded), against K = 1. The model and batch flags are those of
``benchmarks/train_throughput.py``.

  python benchmarks/accumulation.py --steps-list 1 2 4 8 --image-size 64 --batch 32 \\
      --resnet-stages 1 1 1 1 --resnet-width 16 --bert-layers 2 --bert-hidden 64 \\
      --bert-heads 2 --bert-intermediate 128 --bert-vocab 1000 --proj-dim 32
  python benchmarks/accumulation.py --image-size 512 --batch 128 --compile-only  # the paper's
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from benchmarks import train_throughput as tt
from flair_jax import parallel
# pylint: enable=g-import-not-at-top,wrong-import-position


def measure(args, k: int, mesh, dtype, host_batches) -> dict:
  """Memory plan and (unless compile-only) images/s of the step with K = ``k``."""
  run_args = argparse.Namespace(**{**vars(args), 'accumulation_steps': k})
  batches = [parallel.global_batch(tt.for_jax(b, args), mesh) for b in host_batches]
  runner = tt.JaxRunner(run_args, mesh, dtype, batches[0])
  m = runner.compiled.memory_analysis()
  row = dict(k=k, compile_s=round(runner.compile_s, 1),
             plan_mib=runner.memory_analysis_bytes() / 2 ** 20,
             temp_mib=m.temp_size_in_bytes / 2 ** 20,
             # XLA's cost analysis counts a loop's body once: only K = 1's is whole.
             gflop_per_sample=runner.flops_per_step() / args.batch / 1e9 if k == 1 else None)
  if not args.compile_only:
    runner.run(batches[:1] * args.warmup)
    t0 = time.perf_counter()
    runner.run([batches[i % len(batches)] for i in range(args.steps)])
    row['img_s'] = args.steps * args.batch / (time.perf_counter() - t0)
  return row


def markdown(rows, args) -> str:
  base = rows[0]
  lines = [f'{args.label or "accumulation"}: batch {args.batch}, image {args.image_size}, '
           f'{tt.machine_description()}, {datetime.date.today().isoformat()}',
           '| K | memory plan MiB | temporaries MiB | temp / K=1 | GFLOP/sample | img/s | '
           'img/s / K=1 | compile s |', '|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    speed = (f"{r['img_s']:.2f} | {r['img_s'] / base['img_s']:.2f}" if 'img_s' in r
             else '- | -')
    flops = '-' if r['gflop_per_sample'] is None else f"{r['gflop_per_sample']:.2f}"
    lines.append(f"| {r['k']} | {r['plan_mib']:.0f} | {r['temp_mib']:.0f} | "
                 f"{r['temp_mib'] / base['temp_mib']:.2f} | {flops} | {speed} | "
                 f"{r['compile_s']} |")
  return '\n'.join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0], add_help=False,
                              allow_abbrev=False)  # --steps is train_throughput's
  p.add_argument('--steps-list', type=int, nargs='+', default=[1, 2, 4, 8],
                 help='the K to measure; the first is the reference')
  own, rest = p.parse_known_args(argv)
  args = tt.parse_args(rest)
  if args.devices > 1:
    jax.config.update('jax_num_cpu_devices', args.devices)  # only affects the CPU platform
  on_cpu = jax.devices()[0].platform == 'cpu'
  dtype = tt.jnp.dtype(('float32' if on_cpu else 'bfloat16') if args.dtype == 'auto'
                       else args.dtype)
  mesh = parallel.make_mesh(devices=jax.devices()[:args.devices])
  rng = np.random.default_rng(0)
  host_batches = [tt.random_host_batch(rng, args) for _ in range(args.device_batches)]
  rows = []
  for k in own.steps_list:
    rows.append(measure(args, k, mesh, dtype, host_batches))
    print(rows[-1], flush=True)
  print(markdown(rows, args))


if __name__ == '__main__':
  main()
