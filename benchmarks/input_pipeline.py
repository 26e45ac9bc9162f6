"""Input throughput per CPU core: PyTorch FLAIR's loading against this pipeline.

(a) FLAIR's per-sample loading, as its pre-training loader does it every
    epoch: PIL decode of the original photograph, ``.convert('RGB')``,
    float64 array / 255, channels first, torchvision ``Resize`` (antialiased)
    so the longest side is 512, zero pad to 512x512.
(b) this pipeline reading a ``fundus_assembly`` dataset built once at canvas
    512 from the same photographs: balanced sampling, caption with expert
    knowledge, tokenization to 77, decode of the stored image, pad to the
    canvas as uint8, batching.

Both run in one process pinned to one CPU core (torch with one thread, grain
with no reader threads and no workers), so the figures are per core. The
build (decode, RGB, resize, encode once per image) is timed the same way.
The photographs of ``--fundus-dir`` are each repeated ``--repeats`` times.

(b) then runs on all cores with 0, 1 and 2 grain worker processes: wall
images/s, images per CPU-second of all processes (main, workers and any
helper process, from psutil), and CPU microseconds per image in the main
process and in the workers. CPU-seconds do not depend on what else runs on
the machine; wall rates do. From these: the scaling from 1 to 2 workers and
the cores a host needs to build 1,200 images/s. A breakdown of the
per-image costs (record read, decode, pad and batch, handing a batch
between processes) shows where the time goes.

  python benchmarks/input_pipeline.py --out benchmarks/RESULTS_input_pipeline.md
"""

from __future__ import annotations

import argparse
import datetime
import glob
import os
import platform
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from benchmarks import machine_info  # pylint: disable=g-import-not-at-top,wrong-import-position
DEFAULT_FUNDUS = os.path.join(REPO, 'tests', 'data', 'fundus')
CANVAS = 512
# Dataset folder and category of each photograph (any known category will do).
DATASETS = ('01_EYEPACS', '23_HRF', '28_OIA-DDR')
CATEGORIES = ('normal', 'glaucoma', 'diabetic retinopathy', 'mild diabetic retinopathy')


class Clock:
  """Wall and CPU time (this process, all its threads) since creation."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def rates(self, n):
    """``(n / wall seconds, n / CPU seconds, wall seconds)``."""
    wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
    return n / wall, n / cpu, wall


def pin_to_one_core():
  core = sorted(os.sched_getaffinity(0))[0]
  os.sched_setaffinity(0, {core})
  return core


def flair_load(path, size=CANVAS):
  """PyTorch FLAIR's LoadImage + ImageScaling for one photograph."""
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from torchvision.transforms import Resize  # pylint: disable=g-import-not-at-top

  img = np.array(Image.open(path).convert('RGB'), dtype=float)
  if np.max(img) > 1:
    img /= 255
  img = torch.tensor(np.transpose(img, (2, 0, 1)))
  h, w = img.shape[-2:]
  if h == w:
    return Resize((size, size))(img)
  scale = max(h, w) / size
  img = Resize((int(h / scale), int(w / scale)))(img)
  return torch.nn.functional.pad(img, (0, size - img.shape[-1], 0, size - img.shape[-2], 0, 0))


def bench_flair(photos, repeats):
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(1)
  flair_load(photos[0])  # warm-up
  clock = Clock()
  for _ in range(repeats):
    for path in photos:
      out = flair_load(path)
      assert out.shape == (3, CANVAS, CANVAS)
  return clock.rates(repeats * len(photos))


def make_assembly(photos, repeats, root):
  """A FLAIR-format assembly: photographs copied once, dataframes repeat them."""
  import shutil  # pylint: disable=g-import-not-at-top

  frames = os.path.join(root, 'dataframes')
  data = os.path.join(root, 'data')
  os.makedirs(frames, exist_ok=True)
  rows = {d: [] for d in DATASETS}
  for i, path in enumerate(photos):
    dataset = DATASETS[i % len(DATASETS)]
    relative = f'{dataset}/{os.path.basename(path)}'
    os.makedirs(os.path.join(data, dataset), exist_ok=True)
    shutil.copyfile(path, os.path.join(data, relative))
    rows[dataset] += [(relative, CATEGORIES[(i + r) % len(CATEGORIES)]) for r in range(repeats)]
  for dataset, entries in rows.items():
    with open(os.path.join(frames, f'{dataset}.csv'), 'w', encoding='utf-8') as f:
      f.write('image,atributes,categories\n')
      for relative, category in entries:
        f.write(f'{relative},"[\'clean\']","[\'{category}\']"\n')
  return frames, data


def bench_build(frames, data, out_dir):
  from data_pipelines import build as build_lib  # pylint: disable=g-import-not-at-top

  clock = Clock()
  report = build_lib.build('fundus_assembly', out_dir, dataframes_dir=frames, data_root=data,
                           canvas=CANVAS, num_workers=0, verbose=False)
  return report, clock.rates(report['kept'])


def _source(report, data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.data_source(report['tfds_name'], split='train', data_dir=data_dir, download=False,
                          decoders={'image': tfds.decode.SkipDecoding()})


def _tokenizer(work_dir):
  from data_pipelines import knowledge, tokenizer  # pylint: disable=g-import-not-at-top
  corpus = [f'A clean fundus photograph of {c} {" ".join(d)}'
            for c, d in knowledge.load_knowledge().items()]
  return tokenizer.build_wordpiece_vocab(corpus, os.path.join(work_dir, 'tok'), vocab_size=1000)


def _children_cpu(process):
  """``{pid: user + system seconds}`` of the live descendants of ``process``."""
  import psutil  # pylint: disable=g-import-not-at-top
  times = {}
  for child in process.children(recursive=True):
    try:
      t = child.cpu_times()
    except psutil.Error:
      continue
    times[child.pid] = t.user + t.system
  return times


def bench_pipeline(report, data_dir, batch, batches, work_dir, worker_count=0, warmup=1,
                   copy_out=False):
  """(b): ``dict`` of wall and CPU rates of the main process and of the workers.

  ``copy_out`` copies each batch's images in the consumer (what handing a
  copy instead of a view of the worker's memory would cost).
  """
  import psutil  # pylint: disable=g-import-not-at-top

  from data_pipelines import pipeline  # pylint: disable=g-import-not-at-top

  iterator = pipeline.make_pretraining_iterator(
      [_source(report, data_dir)], batch_size=batch, seed=0, tokenizer=_tokenizer(work_dir),
      canvas=CANVAS, process_index=0, process_count=1, worker_count=worker_count, read_threads=0,
      prefetch=2 if worker_count else 0)
  me = psutil.Process()
  try:
    for _ in range(warmup):  # worker start, and their buffers filled once
      first = next(iterator)
    assert first['image'].shape == (batch, CANVAS, CANVAS, 3) and first['image'].dtype == np.uint8
    del first
    before = _children_cpu(me)
    clock = Clock()
    for _ in range(batches):
      images = next(iterator)['image']
      if copy_out:
        images = np.array(images)
    del images
    wall, cpu_main = time.perf_counter() - clock.wall, time.process_time() - clock.cpu
    after = _children_cpu(me)
    counts = dict(getattr(iterator, 'transfer_counts', {}))
  finally:
    iterator.close()
  cpu_workers = sum(t - before.get(pid, 0.0) for pid, t in after.items())
  n = batches * batch
  return {'workers': worker_count, 'wall': n / wall, 'per_cpu': n / (cpu_main + cpu_workers),
          'main_us': 1e6 * cpu_main / n, 'worker_us': 1e6 * cpu_workers / n, 'seconds': wall,
          'counts': counts, 'load': os.getloadavg()[0]}


def _cpu_us(fn, repeats):
  fn()
  start = time.process_time()
  for _ in range(repeats):
    fn()
  return 1e6 * (time.process_time() - start) / repeats


def stage_costs(report, data_dir, batch, work_dir, repeats=3):
  """CPU microseconds per image of the steps of building and handing over a batch."""
  from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top

  from data_pipelines import images, pipeline  # pylint: disable=g-import-not-at-top

  source = _source(report, data_dir)
  rows = list(range(min(len(source), 4 * batch)))
  encoded = [source[r]['image'] for r in rows]
  decoded = [images.decode(e) for e in encoded]
  batches, _ = pipeline.pretraining_batches(
      [source], batch_size=batch, seed=0, tokenizer=_tokenizer(work_dir), canvas=CANVAS,
      process_index=0, process_count=1)
  batch_bcc3 = np.stack([images.stored_canvas(d, CANVAS) for d in decoded[:batch]])
  shared_memory_array.SharedMemoryArray._disable_async_del()  # pylint: disable=protected-access

  def through_fresh_segment():  # grain's hand-over: a new segment per array, mapped, unlinked
    handle = shared_memory_array.copy_to_shm(batch_bcc3)
    view = shared_memory_array.open_from_shm(handle)
    del view

  reused = np.empty_like(batch_bcc3)
  per_row = len(rows)
  costs = {
      'read a record (array_record, tfds)': _cpu_us(lambda: [source[r] for r in rows],
                                                   repeats) / per_row,
      'decode JPEG + RGB array': _cpu_us(lambda: [images.decode(e) for e in encoded],
                                         repeats) / per_row,
      'pad to canvas (new array) + np.stack': _cpu_us(
          lambda: np.stack([images.pad_to_canvas(d, CANVAS) for d in decoded[:batch]]),
          repeats) / batch,
      'batch through a fresh shared-memory segment (grain)': _cpu_us(through_fresh_segment,
                                                                     repeats) / batch,
      'copy a batch into reused memory': _cpu_us(lambda: np.copyto(reused, batch_bcc3),
                                                 repeats) / batch,
      'whole batch in process (sample, caption, tokenize, read, decode, pad)': _cpu_us(
          lambda: batches[0], repeats) / batch,
  }
  try:  # the in-place padding, where this checkout has it
    costs['pad into the batch row (stored_canvas out=)'] = _cpu_us(
        lambda: [images.stored_canvas(d, CANVAS, out=reused[i])
                 for i, d in enumerate(decoded[:batch])], repeats) / batch
  except TypeError:
    pass
  return costs


def machine():
  return machine_info.cpu_model(), os.cpu_count(), machine_info.ram_gib()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--fundus-dir', default=DEFAULT_FUNDUS)
  parser.add_argument('--repeats', type=int, default=40, help='copies of each photograph built')
  parser.add_argument('--flair-repeats', type=int, default=5,
                      help='passes of (a) over the photographs')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--batches', type=int, default=12)
  parser.add_argument('--worker-batches', type=int, default=40,
                      help='batches timed for each worker count')
  parser.add_argument('--out', default=None, help='markdown file for the results table')
  args = parser.parse_args()

  photos = sorted(glob.glob(os.path.join(args.fundus_dir, '*')))
  if not photos:
    raise SystemExit(f'no photographs in {args.fundus_dir}')
  load_before = os.getloadavg()[0]
  pin_to_one_core()
  with tempfile.TemporaryDirectory() as work:
    frames, data = make_assembly(photos, args.repeats, work)
    tfds_dir = os.path.join(work, 'tfds')
    report, build = bench_build(frames, data, tfds_dir)
    flair = bench_flair(photos, args.flair_repeats)
    ours = bench_pipeline(report, tfds_dir, args.batch, args.batches, work)
    ours = (ours['wall'], ours['per_cpu'], ours['seconds'])
    stages = stage_costs(report, tfds_dir, args.batch, work)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    runs = [bench_pipeline(report, tfds_dir, args.batch, args.worker_batches, work,
                           worker_count=w, warmup=2 * w + 1) for w in (0, 1, 2)]
    copied = bench_pipeline(report, tfds_dir, args.batch, args.worker_batches, work,
                            worker_count=2, warmup=5, copy_out=True)
    records = glob.glob(os.path.join(report['path'], '*.array_record*'))
    stored_kib = sum(os.path.getsize(p) for p in records) / report['kept'] / 1024
  load_after = os.getloadavg()[0]
  text = results_table(args, photos, report['kept'], stored_kib, flair, ours, build,
                       (load_before, load_after))
  text += scaling_table(args, runs, copied, stages, ours)
  print(text)
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      f.write(text)


def results_table(args, photos, n_built, stored_kib, flair, ours, build, load):
  """The markdown report; rates are ``(per wall second, per CPU second, wall)``."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  model, cores, mem_gib = machine()
  sizes = []
  for path in photos:
    with Image.open(path) as im:
      sizes.append(f'{im.width}x{im.height} {im.mode}')
  ratio = ours[1] / flair[1]
  lines = [
      '# Input pipeline throughput',
      '',
      f'Machine: {model}, {cores} CPU cores, {mem_gib:.0f} GiB RAM, Python '
      f'{platform.python_version()}; {datetime.date.today().isoformat()}; load average '
      f'{load[0]:.1f} before, {load[1]:.1f} after'
      + (' (other jobs were running: wall-clock rates are low; the per-core column divides by '
         'the CPU time this process got)' if max(load) > 1.5 else '') + '.',
      '',
      f'Photographs: the {len(photos)} files of `{os.path.relpath(args.fundus_dir, REPO)}` ({", ".join(sizes)}), '
      f'each repeated {args.repeats} times ({n_built} examples built); (a) makes '
      f'{args.flair_repeats} passes over the {len(photos)} files. Canvas {CANVAS}, batch '
      f'{args.batch}, stored as JPEG quality 95 ({stored_kib:.0f} KiB per image). '
      'Command: `python benchmarks/input_pipeline.py`.',
      '',
      '| measurement | images / s (wall) | images / CPU-second (per core) |',
      '| --- | ---: | ---: |',
      '| (a) PyTorch FLAIR loading: PIL decode, RGB, float, /255, antialiased resize, pad; '
      f'1 core | {flair[0]:.1f} | {flair[1]:.1f} |',
      '| (b) this pipeline from the built dataset: sample, caption, tokenize, decode, pad, '
      f'batch; 1 core | {ours[0]:.1f} | {ours[1]:.1f} |',
      '| build once: decode, RGB, resize, JPEG encode, write; 1 core | '
      f'{build[0]:.1f} | {build[1]:.1f} ({1000 / build[1]:.0f} ms CPU per image) |',
      '',
      f'Per core, (b) / (a) = **{ratio:.0f}x** (target >= 10x: '
      f'{"met" if ratio >= 10 else "NOT met"}).',
  ]
  return '\n'.join(lines) + '\n'


TARGET = 1200  # images/s that keep an H200 busy at the target step rate


def scaling_table(args, runs, copied, stages, ours):
  """Worker scaling, CPU per image, the cores for ``TARGET`` images/s and the cost breakdown."""
  by = {r['workers']: r for r in runs}
  one, two = by[1], by[2]
  scaling = two['wall'] / (2 * one['wall'])
  versus_core = two['wall'] / (2 * ours[0])
  efficiency = two['per_cpu'] / ours[1]
  us_per_image = two['main_us'] + two['worker_us']
  cores = TARGET * us_per_image / 1e6
  lines = [
      '',
      f'## (b) on all {os.cpu_count()} cores with grain workers',
      '',
      f'Batch {args.batch}, {args.worker_batches} batches timed per row after a warm-up; CPU '
      'counts every process of the pipeline (main, workers, helpers). Load: the 1-minute '
      'average when the row finished.',
      '',
      '| workers | images / s (wall) | images / CPU-second | main CPU us / image | '
      'worker CPU us / image | batches via reused shared memory / other | load |',
      '| ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
  ]
  for r in runs + [dict(copied, workers='2, consumer copies each batch')]:
    counts = r['counts']
    via = f"{counts['shared_memory']} / {counts['fallback']}" if counts else 'n/a'
    lines.append(f"| {r['workers']} | {r['wall']:.0f} | {r['per_cpu']:.0f} | {r['main_us']:.0f} | "
                 f"{r['worker_us']:.0f} | {via} | {r['load']:.1f} |")
  lines += [
      '',
      f'- Scaling from 1 to 2 workers (wall): {two["wall"]:.0f} / (2 x {one["wall"]:.0f}) = '
      f'**{100 * scaling:.0f}%**; 2 workers against 2 x the one-core in-process rate: '
      f'{100 * versus_core:.0f}%.',
      f'- Images per CPU-second with 2 workers / in process on one core: '
      f'{two["per_cpu"]:.0f} / {ours[1]:.0f} = **{100 * efficiency:.0f}%**.',
      f'- Cores for {TARGET} images/s: {TARGET} x ({two["main_us"]:.0f} + '
      f'{two["worker_us"]:.0f}) us = **{cores:.1f} cores** of this CPU (about '
      f'{int(-(-cores // 1))} workers plus the main process, which needs '
      f'{TARGET * two["main_us"] / 1e6:.2f} of a core and could serve at most '
      f'{1e6 / max(two["main_us"], 1e-9):.0f} images/s).',
      '',
      "## Where a batch's CPU goes (one core, microseconds per image)",
      '',
      '| step | CPU us / image |',
      '| --- | ---: |',
  ]
  lines += [f'| {name} | {us:.0f} |' for name, us in stages.items()]
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main()
