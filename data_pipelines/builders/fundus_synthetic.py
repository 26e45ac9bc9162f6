"""fundus_synthetic: procedural fundus photographs with FLAIR findings.

Four synthetic source datasets of different sizes, category mixes and
camera styles (see data_pipelines.synthetic.SOURCES); splits ``train`` (some
images carry two findings) and ``test`` (one finding each). Deterministic
for a seed, drawn straight at the canvas.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from data_pipelines import images
from data_pipelines import synthetic
from data_pipelines.builders import common


@dataclasses.dataclass(eq=False)
class SyntheticConfig(common.ImageOptions):
  """Options of fundus_synthetic (see ImageOptions for the shared ones)."""

  n_train: int = 2000
  n_test: int = 500
  seed: int = 0

  def validate(self):
    super().validate()
    if int(self.n_train) < 1 or int(self.n_test) < 0:
      raise ValueError(f'n_train {self.n_train} >= 1 and n_test {self.n_test} '
                       '>= 0 images expected')


def config_name(cfg: SyntheticConfig) -> str:
  return f'c{cfg.canvas}-{cfg.format_tag()}-n{cfg.n_train}-{cfg.n_test}-s{cfg.seed}'


def make_example(payload: tuple) -> dict:
  """(seed, split, index, n, canvas, image_format, jpeg_quality) -> example."""
  seed, split, index, n, canvas, image_format, jpeg_quality = payload
  ex = synthetic.example(seed, split, index, n, canvas)
  pixels = ex.pop('image')
  ex['image'] = images.encode(Image.fromarray(pixels), image_format, jpeg_quality)
  ex['original_size'] = np.asarray(pixels.shape[:2], np.int32)
  return ex


def split_items(cfg, split: str, n: int):
  for i in range(n):
    path = f'{split}/{i}'
    yield i, path, (int(cfg.seed), split, i, n, int(cfg.canvas),
                    cfg.image_format, int(cfg.jpeg_quality))


_DEFAULT = SyntheticConfig(name='')
_DEFAULT.name = config_name(_DEFAULT)


class FundusSynthetic(common.FundusBuilder):
  """Synthetic fundus photographs for the demo run and the tests."""

  BUILDER_CONFIGS = [_DEFAULT]

  def _splits(self, cfg: SyntheticConfig) -> dict:
    sizes = {'train': int(cfg.n_train), 'test': int(cfg.n_test)}
    return {split: self._generate_examples(split, split_items(cfg, split, n),
                                           make_example, cfg.num_workers)
            for split, n in sizes.items() if n > 0}
