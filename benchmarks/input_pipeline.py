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


def bench_pipeline(report, data_dir, batch, batches, work_dir, worker_count=0):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from data_pipelines import knowledge, pipeline, tokenizer  # pylint: disable=g-import-not-at-top

  corpus = [f'A clean fundus photograph of {c} {" ".join(d)}'
            for c, d in knowledge.load_knowledge().items()]
  tok = tokenizer.build_wordpiece_vocab(corpus, os.path.join(work_dir, 'tok'), vocab_size=1000)
  source = tfds.data_source(report['tfds_name'], split='train', data_dir=data_dir, download=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
  iterator = pipeline.make_pretraining_iterator(
      [source], batch_size=batch, seed=0, tokenizer=tok, canvas=CANVAS, process_index=0,
      process_count=1, worker_count=worker_count, read_threads=0, prefetch=2 if worker_count else 0)
  try:
    first = next(iterator)  # warm-up (and worker start)
    assert first['image'].shape == (batch, CANVAS, CANVAS, 3) and first['image'].dtype == np.uint8
    clock = Clock()
    for _ in range(batches):
      next(iterator)
    rates = clock.rates(batches * batch)
  finally:
    iterator.close()
  return rates


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
  parser.add_argument('--out', default=None, help='markdown file for the results table')
  args = parser.parse_args()

  photos = sorted(glob.glob(os.path.join(args.fundus_dir, '*')))
  if not photos:
    raise SystemExit(f'no photographs in {args.fundus_dir}')
  load_before = os.getloadavg()[0]
  pin_to_one_core()
  with tempfile.TemporaryDirectory() as work:
    frames, data = make_assembly(photos, args.repeats, work)
    report, build = bench_build(frames, data, os.path.join(work, 'tfds'))
    flair = bench_flair(photos, args.flair_repeats)
    ours = bench_pipeline(report, os.path.join(work, 'tfds'), args.batch, args.batches, work)
    os.sched_setaffinity(0, set(range(os.cpu_count())))
    workers = os.cpu_count()
    ours_all = bench_pipeline(report, os.path.join(work, 'tfds'), args.batch, args.batches, work,
                              worker_count=workers)
    records = glob.glob(os.path.join(report['path'], '*.array_record*'))
    stored_kib = sum(os.path.getsize(p) for p in records) / report['kept'] / 1024
  load_after = os.getloadavg()[0]
  text = results_table(args, photos, report['kept'], stored_kib, flair, ours, ours_all, build,
                       workers, (load_before, load_after))
  print(text)
  if args.out:
    with open(args.out, 'w', encoding='utf-8') as f:
      f.write(text)


def results_table(args, photos, n_built, stored_kib, flair, ours, ours_all, build, workers, load):
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
      f'Photographs: the {len(photos)} files of `shared/data/fundus` ({", ".join(sizes)}), '
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
      f'| (b) with {workers} grain worker processes on all {cores} cores | {ours_all[0]:.1f} | '
      f'{ours_all[0] / cores:.1f} (wall / cores) |',
      '| build once: decode, RGB, resize, JPEG encode, write; 1 core | '
      f'{build[0]:.1f} | {build[1]:.1f} ({1000 / build[1]:.0f} ms CPU per image) |',
      '',
      f'Per core, (b) / (a) = **{ratio:.0f}x** (target >= 10x: '
      f'{"met" if ratio >= 10 else "NOT met"}).',
  ]
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  main()
