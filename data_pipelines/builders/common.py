"""What the fundus builders share: the example schema, safe paths, config
names, the shared image options and the base builder (the build report is
in ``report``, dataframe rows in ``data_pipelines.dataframes``).

Every builder writes the same features so the pipeline reads them alike:

  image          uint8 HxWx3 when read through ``tfds.data_source`` (stored
                 as PNG/JPEG bytes; ``decoders={'image':
                 tfds.decode.SkipDecoding()}`` returns the bytes), longest
                 side == canvas, not padded
  dataset        bytes, the first path component (e.g. b'02_MESSIDOR')
  categories     list of bytes
  attributes     list of bytes
  original_size  int32 [2], (height, width) of the source image
  path           bytes, the image path relative to the data root
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import inspect
import json
import multiprocessing
import os
import sys
import time
from typing import Callable, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import images
from data_pipelines.builders.report import FAILED_REPORT_NAME, REPORT_NAME
from data_pipelines.builders.report import SplitReport, format_report, summarise
from data_pipelines.console import UserError
from data_pipelines.dataframes import Skip
from data_pipelines.jsonio import write_json

DEFAULT_MAX_SKIPPED_FRACTION = 0.05

class BuildError(UserError, RuntimeError):
  """A build that skipped more than its allowed fraction of examples."""


def features(image_format: str, **extra) -> tfds.features.FeaturesDict:
  """The shared example schema (plus ``extra`` features)."""
  text = tfds.features.Text()
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                   encoding_format=image_format),
      'dataset': text,
      'categories': tfds.features.Sequence(text),
      'attributes': tfds.features.Sequence(text),
      'original_size': tfds.features.Tensor(shape=(2,), dtype=np.int32),
      'path': text,
      **extra,
  })


def safe_path(root_real: str, relative: str) -> str:
  """The real path of ``relative`` under ``root_real``; Skip if it escapes."""
  if not relative or '\x00' in relative:
    raise Skip('malformed_row', 'empty image path')
  try:
    relative.encode('utf-8')
  except UnicodeEncodeError:
    raise Skip('malformed_row', 'image path is not valid UTF-8') from None
  if os.path.isabs(relative):
    raise Skip('path_escapes_root', f'{relative!r} is absolute')
  if '..' in relative.split('/'):
    raise Skip('path_escapes_root', f'{relative!r} contains ..')
  full = os.path.realpath(os.path.join(root_real, relative))
  if os.path.commonpath([full, root_real]) != root_real:
    raise Skip('path_escapes_root', f'{relative!r} resolves outside the data root')
  return full


def dataset_of(relative: str) -> str:
  """The dataset name: the first component of a relative image path."""
  parts = relative.split('/')
  if len(parts) < 2 or not parts[0]:
    raise Skip('malformed_row', f'{relative!r} has no dataset folder')
  return parts[0]


def options_hash(options: dict) -> str:
  return hashlib.sha256(json.dumps(options, sort_keys=True, default=str)
                        .encode()).hexdigest()[:8]


def content_options(config) -> dict:
  """Config fields that change the built data (not name/version/threshold)."""
  skip = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
  skip |= {'max_skipped_fraction', 'num_workers'}
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
          if f.name not in skip}


def _call(fn, item):
  try:
    return fn(item), None
  except Skip as e:
    return None, e
  except Exception as e:  # pylint: disable=broad-except
    return None, Skip('unexpected_error', f'{type(e).__name__}: {e}')


def ordered_map(fn: Callable, items: Iterable, num_workers: int) -> Iterator:
  """(item, (result, skip)) in input order; ``num_workers`` > 0 uses spawned
  processes (``fn`` must be a module-level function), at most 4 per worker
  in flight so memory stays small."""
  if num_workers <= 0:
    for item in items:
      yield item, _call(fn, item)
    return
  ctx = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as ex:
    window = collections.deque()
    for item in items:
      window.append((item, ex.submit(_call, fn, item)))
      if len(window) >= 4 * num_workers:
        first, future = window.popleft()
        yield first, future.result()
    while window:
      first, future = window.popleft()
      yield first, future.result()


@dataclasses.dataclass(eq=False)
class ImageOptions(tfds.core.BuilderConfig):
  """Options every fundus builder shares."""

  canvas: int = 512
  image_format: str = 'png'
  jpeg_quality: int = 95
  max_skipped_fraction: float = DEFAULT_MAX_SKIPPED_FRACTION
  num_workers: int = 0

  def validate(self):
    if self.image_format not in images.IMAGE_FORMATS:
      raise ValueError(f'image_format {self.image_format!r}; expected one of '
                       f'{images.IMAGE_FORMATS}')
    if not 8 <= int(self.canvas) <= 8192:
      raise ValueError(f'canvas {self.canvas}; expected 8..8192 pixels')
    if not 1 <= int(self.jpeg_quality) <= 100:
      raise ValueError(f'jpeg_quality {self.jpeg_quality}; expected 1..100')
    if not 0 <= float(self.max_skipped_fraction) <= 1:
      raise ValueError(f'max_skipped_fraction {self.max_skipped_fraction}; '
                       'expected a fraction in [0, 1]')

  def format_tag(self) -> str:
    """The image format as config names write it: 'png' or 'jpeg<quality>'."""
    return 'png' if self.image_format == 'png' else f'jpeg{self.jpeg_quality}'


class FundusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder: array_record files, one report per build, skip counting."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or 'array_record', **kwargs)
    self._split_reports = {}

  # TFDS prints 'Downloading and preparing dataset Unknown size ...' and
  # '... downloaded and prepared to ...' around every build; these builders
  # download nothing, and the build report says where the data went.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  # TFDS 4.9's own lookup needs the `importlib_resources` backport for a
  # builder inside a package; the module's file is the same answer.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    # A builder's description is its module's docstring.
    return tfds.core.DatasetInfo(
        builder=self, description=sys.modules[type(self).__module__].__doc__,
        features=features(self.builder_config.image_format, **self._extra_features()),
        homepage='https://github.com/jusiro/FLAIR')

  def _extra_features(self) -> dict:
    """Features this builder adds to the shared schema."""
    return {}

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the sources are local or drawn.
    cfg = self.builder_config
    cfg.validate()
    return self._splits(cfg)

  def _splits(self, cfg) -> dict:
    """Split name -> ``self._generate_examples(...)`` for the validated ``cfg``."""
    raise NotImplementedError

  def _generate_examples(self, split: str, items: Iterable, work: Callable,
                         num_workers: int) -> Iterator[tuple[str, dict]]:
    """Yields (key, example) for items (key, where, payload-or-Skip);
    ``work(payload)`` makes the example or raises Skip. Writes the report and
    enforces the skipped-fraction threshold when the split ends."""
    report = SplitReport(split)
    self._split_reports[split] = report

    def todo():
      for key, where, payload in items:
        if isinstance(payload, Skip):
          report.skip(where, payload)
          if payload.reason == 'unknown_category':
            report.unknown_categories.update(payload.detail.split('\n'))
        else:
          yield key, where, payload

    for (key, where, _), (example, skip) in ordered_map(
        _work_on, ((k, w, (work, p)) for k, w, p in todo()), num_workers):
      if skip is not None:
        report.skip(where, skip)
      else:
        report.kept += 1
        yield key, example
    report.seconds = time.perf_counter() - report.start
    self._finish_split(report)

  def report(self, path: str | None = None) -> dict:
    cfg = self.builder_config
    return summarise(
        {s: r.as_dict() for s, r in self._split_reports.items()},
        builder=self.name, config=cfg.name, version=str(self.version),
        path=path, max_skipped_fraction=cfg.max_skipped_fraction,
        options=content_options(cfg))

  def _finish_split(self, report: SplitReport):
    """Writes the report; raises BuildError past the skipped threshold."""
    cfg = self.builder_config
    summary = report.as_dict()
    fraction, limit = summary['skipped_fraction'], cfg.max_skipped_fraction
    # During generation data_dir is TFDS's 'incomplete.XXX_<version>/'.
    config_dir = os.path.dirname(os.path.normpath(os.fspath(self.data_dir)))
    failed = os.path.join(config_dir, FAILED_REPORT_NAME)
    if summary['kept'] == 0 or fraction > limit:
      full = self.report(path=None)
      write_json(failed, full)
      print(format_report(full))
      raise BuildError(
          f'{self.name}/{cfg.name} split {report.split!r}: skipped '
          f'{summary["skipped"]} of {summary["total"]} examples ({fraction:.2%}), '
          f'over the allowed max_skipped_fraction {limit:.2%}'
          + (' (no example kept)' if summary['kept'] == 0 else '')
          + f'; counts by reason: { {k: v["count"] for k, v in summary["reasons"].items()} }'
          f'; report: {failed}')
    if os.path.exists(failed):
      os.remove(failed)
    final = os.path.join(config_dir, str(self.version))
    write_json(os.path.join(os.fspath(self.data_dir), REPORT_NAME), self.report(final))
    print(f'{self.name}/{cfg.name} {report.split}: kept {summary["kept"]} of '
          f'{summary["total"]} ({summary["skipped_fraction"]:.2%} skipped)')


def _work_on(item):
  _, _, (work, payload) = item
  return work(payload)
