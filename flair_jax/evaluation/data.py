"""Downstream classification sets: a built TFDS ``fundus_classification``
dataset, or a FLAIR transferability CSV with its data root.

A set is a random-access sequence of uint8 RGB images, their integer labels
and the class names in label order (the zero-shot prompts).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from data_pipelines import dataframes
from data_pipelines import images as images_lib
from data_pipelines.targets import Targets, class_names, parse_targets


@dataclasses.dataclass(frozen=True)
class DownstreamSet:
  """Images (random access, uint8 ``[H, W, 3]``), labels ``[N]``, class names."""
  name: str
  images: Sequence
  labels: np.ndarray
  class_names: tuple

  def __post_init__(self):
    if len(self.images) != len(self.labels):
      raise ValueError(f'{self.name}: {len(self.images)} images but {len(self.labels)} labels')


def _decode(value) -> np.ndarray:
  """Encoded bytes (PNG / JPEG) or an array -> uint8 ``[H, W, 3]``."""
  if isinstance(value, (bytes, np.bytes_)):
    return images_lib.decode(bytes(value))
  return np.asarray(value, np.uint8)


class _Lazy(Sequence):
  """``fn(items[i])`` computed when indexed."""

  def __init__(self, items, fn):
    self._items, self._fn = items, fn

  def __len__(self):
    return len(self._items)

  def __getitem__(self, i):
    return self._fn(self._items[i])


def from_csv(csv_path: str, data_root: str, targets: Targets) -> DownstreamSet:
  """A FLAIR transferability CSV (``image``, ``categories`` columns).

  A sample's label is the target of its FIRST category, as FLAIR's loader
  takes it; list cells are parsed with ``ast.literal_eval``.
  """
  targets = parse_targets(targets)
  paths, labels, unknown = [], [], {}
  for line, row in dataframes.read_rows(csv_path, ('image', 'categories')):
    if isinstance(row, dataframes.Skip):
      raise ValueError(f'{csv_path}:{line}: {row.detail}')
    try:
      first = dataframes.parse_list(row['categories'], 'categories')[0]
    except (dataframes.Skip, IndexError):
      raise ValueError(f'{csv_path}:{line}: categories cell {row["categories"]!r} '
                       'is not a non-empty list literal like "[\'glaucoma\']"') from None
    if first not in targets:
      unknown[first] = unknown.get(first, 0) + 1
      continue
    paths.append(os.path.join(data_root, row['image']))
    labels.append(targets[first])
  if unknown:
    raise ValueError(f'{csv_path}: first categories {unknown} are not in the targets '
                     f'{list(targets)}; add them to the target map')

  def load(path):
    with images_lib.open_checked(path) as img:
      images_lib.load(img)
      return np.asarray(images_lib.to_rgb(img), np.uint8)

  name = os.path.splitext(os.path.basename(csv_path))[0]
  return DownstreamSet(name, _Lazy(paths, load), np.asarray(labels, np.int64), class_names(targets))


def from_tfds(dataset: str, split: str = 'test', data_dir: Optional[str] = None,
              targets: Optional[Targets] = None) -> DownstreamSet:
  """A built ``fundus_classification`` dataset (array_record; no TensorFlow).

  Args:
    dataset: a dataset folder (``.../fundus_classification/<config>/<version>``)
      or a name (``fundus_classification/<config>``) found under ``data_dir``.
    split: the split to read.
    targets: class names in label order; default: the ``label`` feature's
      names.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if os.path.isdir(dataset):
    builder = tfds.builder_from_directory(dataset)
  else:
    import data_pipelines.builders  # pylint: disable=unused-import  # registers the builders
    builder = tfds.builder(dataset, data_dir=data_dir)
  source = builder.as_data_source(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  labels = np.asarray([int(source[i]['label']) for i in range(len(source))], np.int64)
  if targets is not None:
    names = class_names(parse_targets(targets))
  else:
    names = tuple(getattr(builder.info.features['label'], 'names', ()))
    if not names:
      raise ValueError(f'{dataset}: the label feature has no class names; pass the targets')
  images = _Lazy(_Examples(source), _decode)
  return DownstreamSet(f'{builder.info.full_name}:{split}', images, labels, names)


class _Examples(Sequence):
  """The ``image`` field of a TFDS data source, by index."""

  def __init__(self, source):
    self._source = source

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    return self._source[i]['image']


def load(data: str, *, split: str = 'test', data_dir: Optional[str] = None,
         data_root: Optional[str] = None, targets=None) -> DownstreamSet:
  """A set from a CSV path (with ``data_root`` and ``targets``) or a TFDS dataset."""
  if data.endswith('.csv'):
    if data_root is None or targets is None:
      raise ValueError(f'{data} is a CSV: pass the data root of its image paths and the targets '
                       '(class names in label order, or a JSON target map)')
    return from_csv(data, data_root, targets)
  return from_tfds(data, split, data_dir, targets)


def from_pretraining_split(path: str, split: str = 'test') -> DownstreamSet:
  """A split of a built pre-training set (e.g. ``fundus_synthetic``'s held-out
  ``test``) as a downstream set: label = the first category; classes sorted."""
  from data_pipelines import build as build_lib  # pylint: disable=g-import-not-at-top
  source = build_lib.data_source(path, split, decode_images=False)
  firsts = []
  for i in range(len(source)):
    cats = source[i]['categories']
    if len(cats) == 0:
      raise ValueError(f'{path}:{split} example {i} has no category to use as its label')
    first = cats[0]
    firsts.append(first.decode() if isinstance(first, bytes) else str(first))
  names = tuple(sorted(set(firsts)))
  labels = np.asarray([names.index(c) for c in firsts], np.int64)
  name = f'{os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path))))}:{split}'
  return DownstreamSet(name, _Lazy(_Examples(source), _decode), labels, names)
