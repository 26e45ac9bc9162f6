"""fundus_assembly: FLAIR's pre-training assembly from its dataframes.

Input: a folder of FLAIR-format dataframes (one CSV per dataset with columns
``image``, ``atributes`` and ``categories``; list cells are parsed with
``ast.literal_eval``) and the data root the ``image`` paths are relative to.
Each image is decoded once, converted to RGB, optionally cropped to its field
of view, resized so its longest side is the canvas and stored encoded.
Bad rows and images are skipped and counted (see report.SplitReport).
"""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np

from data_pipelines import categories as categories_lib
from data_pipelines import dataframes
from data_pipelines import images
from data_pipelines.builders import common

COLUMNS = ('image', 'atributes', 'categories')


@dataclasses.dataclass(eq=False)
class AssemblyConfig(common.ImageOptions):
  """Options of fundus_assembly (see ImageOptions for the shared ones).

  Attributes:
    dataframes_dir: folder of FLAIR dataframes, one ``<dataset>.csv`` each.
    data_root: folder the ``image`` paths are relative to.
    datasets: CSV stems to include, in order; empty = every CSV, sorted.
    crop_foreground: crop to the field of view before resizing.
    max_pixels: images with more pixels are refused from their header.
    jpeg_draft: let the JPEG decoder downscale first (faster, approximate).
    extra_categories: file of category names appended to the vocabulary.
  """

  image_format: str = 'jpeg'
  dataframes_dir: str = ''
  data_root: str = ''
  datasets: tuple = ()
  crop_foreground: bool = False
  max_pixels: int = images.DEFAULT_MAX_PIXELS
  jpeg_draft: bool = False
  extra_categories: str = ''

  def validate(self):
    super().validate()
    for field in ('dataframes_dir', 'data_root'):
      if not os.path.isdir(getattr(self, field) or ''):
        raise ValueError(
            f'fundus_assembly needs {field} = an existing folder (got '
            f'{getattr(self, field)!r}); e.g. python -m data_pipelines build '
            'fundus_assembly --dataframes_dir DIR --data_root DIR --data-dir OUT')

  def csv_paths(self) -> list[str]:
    if not self.datasets:
      paths = sorted(glob.glob(os.path.join(self.dataframes_dir, '*.csv')))
      if not paths:
        raise ValueError(f'no *.csv dataframes in {self.dataframes_dir}')
      return paths
    available = sorted(os.path.splitext(os.path.basename(p))[0] for p in
                       glob.glob(os.path.join(self.dataframes_dir, '*.csv')))
    missing = [d for d in self.datasets if d not in available]
    if missing:
      raise ValueError(f'datasets {missing} have no dataframe in '
                       f'{self.dataframes_dir}; available: {available}')
    return [os.path.join(self.dataframes_dir, f'{d}.csv') for d in self.datasets]


def config_name(cfg: AssemblyConfig) -> str:
  """A folder name for these options: readable part + hash of all of them."""
  options = common.content_options(cfg)
  for field in ('dataframes_dir', 'data_root', 'extra_categories'):
    options[field] = os.path.realpath(options[field]) if options[field] else ''
  options['datasets'] = list(options['datasets'])
  crop = '-crop' if cfg.crop_foreground else ''
  return f'c{cfg.canvas}-{cfg.format_tag()}{crop}-{common.options_hash(options)}'


def prepare_example(payload: dict) -> dict:
  """One dataframe row (already validated) -> example; raises Skip."""
  try:
    p = images.prepare(payload['file'], payload['canvas'],
                       image_format=payload['image_format'],
                       jpeg_quality=payload['jpeg_quality'],
                       crop=payload['crop'], max_pixels=payload['max_pixels'],
                       jpeg_draft=payload['jpeg_draft'])
  except images.ImageError as e:
    raise common.Skip(e.reason, str(e)) from None
  return {'image': p.encoded, 'dataset': payload['dataset'],
          'categories': payload['categories'],
          'attributes': payload['attributes'],
          'original_size': np.asarray(p.original_size, np.int32),
          'path': payload['path']}


def rows(cfg, columns=COLUMNS, vocabulary=None, require_dataset=True):
  """(key, where, payload or Skip) for every row of the config's dataframes.

  ``where`` is the image path, or 'file.csv:line' for a row refused before
  its image is opened; ``vocabulary`` (None: no check) refuses unknown
  categories; ``require_dataset`` refuses paths without a dataset folder
  (otherwise their dataset is '').
  """
  root = os.path.realpath(cfg.data_root)
  shared = {'canvas': int(cfg.canvas), 'image_format': cfg.image_format,
            'jpeg_quality': int(cfg.jpeg_quality), 'crop': bool(cfg.crop_foreground),
            'max_pixels': int(cfg.max_pixels), 'jpeg_draft': bool(cfg.jpeg_draft)}
  for csv_path in cfg.csv_paths():
    stem = os.path.splitext(os.path.basename(csv_path))[0]
    for number, (line, row) in enumerate(dataframes.read_rows(csv_path, columns)):
      key, where = f'{stem}:{number}', dataframes.location(csv_path, line)
      if isinstance(row, common.Skip):
        yield key, where, row
        continue
      try:
        payload = _parse_row(row, root, vocabulary, require_dataset)
      except common.Skip as e:
        yield key, where, e
        continue
      yield key, payload['path'], {**payload, **shared}


def _parse_row(row, root, vocabulary, require_dataset):
  relative = row['image']
  cats = dataframes.parse_list(row['categories'], 'categories')
  attributes = (dataframes.parse_list(row['atributes'], 'atributes')
                if 'atributes' in row and row['atributes'] is not None else [])
  if vocabulary is not None:
    unknown = [c for c in cats if c not in vocabulary or not c]
    if unknown:
      raise common.Skip('unknown_category', '\n'.join(unknown))
  full = common.safe_path(root, relative)
  dataset = (common.dataset_of(relative) if require_dataset or '/' in relative
             else '')
  return {'file': full, 'path': relative, 'dataset': dataset,
          'categories': cats, 'attributes': attributes}


class FundusAssembly(common.FundusBuilder):
  """FLAIR's pre-training assembly, resized once to the canvas."""

  BUILDER_CONFIGS = [AssemblyConfig(name='default')]

  def _splits(self, cfg: AssemblyConfig) -> dict:
    cfg.csv_paths()  # Fails early, naming missing dataframes.
    vocabulary = categories_lib.load_vocabulary(cfg.extra_categories or None)
    return {'train': self._generate_examples(
        'train', rows(cfg, vocabulary=vocabulary), prepare_example,
        cfg.num_workers)}
