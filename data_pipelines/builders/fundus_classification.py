"""fundus_classification: a downstream set for zero-shot and linear probes.

Input: a FLAIR transferability dataframe (columns ``image`` and
``categories``, ``atributes`` optional) with a target map class name ->
label; as in FLAIR, an image's label is the target of its FIRST category.
Or, with ``synthetic=True``, the test split of fundus_synthetic (same seed,
count and canvas give the same images). One split, ``test``, holds the whole
set; the evaluation draws FLAIR's per-class train/val/test shots from it.
Categories are kept as written (not checked against the vocabulary); an
image directly under the data root has dataset ''.
Examples carry ``label`` (int64, a ClassLabel whose names are the classes by
label) and ``label_name`` besides the shared schema.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import tensorflow_datasets as tfds

from data_pipelines import images
from data_pipelines import synthetic
from data_pipelines import targets as targets_lib
from data_pipelines.builders import common
from data_pipelines.builders import fundus_assembly
from data_pipelines.builders import fundus_synthetic

SPLIT = 'test'
SYNTHETIC_TARGETS = {c: i for i, c in enumerate(synthetic.CATEGORIES)}


@dataclasses.dataclass(eq=False)
class ClassificationConfig(common.ImageOptions):
  """Options of fundus_classification (see ImageOptions for shared ones).

  Attributes:
    dataframe: FLAIR transferability CSV (unused when synthetic).
    data_root: folder the ``image`` paths are relative to.
    targets: class name -> label (dict, JSON text or JSON file path) or
      class names in label order ("a,b,c"); empty with synthetic=True means
      the six synthetic categories.
    synthetic: build the fundus_synthetic test split instead of a CSV.
    n_test, seed: size and seed of the synthetic split.
  """

  dataframe: str = ''
  data_root: str = ''
  targets: Any = ''
  synthetic: bool = False
  n_test: int = 500
  seed: int = 0
  crop_foreground: bool = False
  max_pixels: int = images.DEFAULT_MAX_PIXELS
  jpeg_draft: bool = False

  def target_map(self) -> dict[str, int]:
    if self.synthetic and not self.targets:
      return dict(SYNTHETIC_TARGETS)
    return targets_lib.parse_targets(self.targets)

  def validate(self):
    super().validate()
    self.target_map()
    if self.synthetic:
      if int(self.n_test) < 1:
        raise ValueError(f'n_test {self.n_test}: at least one image expected')
      return
    if not os.path.isfile(self.dataframe or ''):
      raise ValueError(f'fundus_classification needs dataframe = a FLAIR '
                       f'transferability CSV (got {self.dataframe!r}) or '
                       'synthetic=True')
    if not os.path.isdir(self.data_root or ''):
      raise ValueError(f'fundus_classification needs data_root = an existing '
                       f'folder (got {self.data_root!r})')

  # fundus_assembly.rows reads these.
  def csv_paths(self) -> list[str]:
    return [self.dataframe]


def config_name(cfg: ClassificationConfig) -> str:
  options = common.content_options(cfg)
  options['targets'] = cfg.target_map()
  for field in ('dataframe', 'data_root'):
    options[field] = os.path.realpath(options[field]) if options[field] else ''
  if cfg.synthetic:
    stem = f'synthetic-n{cfg.n_test}-s{cfg.seed}'
  else:
    stem = os.path.splitext(os.path.basename(cfg.dataframe))[0]
  return f'{stem}-c{cfg.canvas}-{cfg.format_tag()}-{common.options_hash(options)}'


def labelled(work, payload: tuple) -> dict:
  """Runs ``work`` on the payload, then adds label and label_name."""
  inner, targets = payload
  example = work(inner)
  name = example['categories'][0] if example['categories'] else ''
  if name not in targets:
    raise common.Skip('unknown_target', f'{name!r} not in targets {sorted(targets)}')
  return {**example, 'label': targets[name], 'label_name': name}


def _csv_example(payload):
  return labelled(fundus_assembly.prepare_example, payload)


def _synthetic_example(payload):
  return labelled(fundus_synthetic.make_example, payload)


class FundusClassification(common.FundusBuilder):
  """A labelled downstream fundus set (FLAIR transferability format)."""

  BUILDER_CONFIGS = [ClassificationConfig(name='default')]

  def _extra_features(self) -> dict:
    cfg = self.builder_config
    if not (cfg.targets or cfg.synthetic):
      raise ValueError('fundus_classification needs targets (class name -> '
                       'label) or synthetic=True; build it with '
                       'data_pipelines.build.build(..., targets=...)')
    names = targets_lib.class_names(cfg.target_map())
    return {'label': tfds.features.ClassLabel(names=names), 'label_name': tfds.features.Text()}

  def _splits(self, cfg: ClassificationConfig) -> dict:
    targets = cfg.target_map()
    if cfg.synthetic:
      items = ((k, w, (p, targets)) for k, w, p in
               fundus_synthetic.split_items(cfg, 'test', int(cfg.n_test)))
      work = _synthetic_example
    else:
      items = ((k, w, p if isinstance(p, common.Skip) else (p, targets))
               for k, w, p in fundus_assembly.rows(
                   cfg, columns=('image', 'categories'), require_dataset=False))
      work = _csv_example
    return {SPLIT: self._generate_examples(SPLIT, items, work, cfg.num_workers)}
