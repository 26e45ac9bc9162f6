"""torchvision's ResNet (v1.5 bottlenecks) in Flax NNX.

Attribute names follow torchvision (``conv1``, ``bn1``, ``layer1[0].conv2``,
``downsample.conv``/``downsample.bn``) so that the weight-conversion table
(:data:`TORCH_ROWS`) is a plain renaming. ``ResNet()`` with the defaults is ``torchvision.models.resnet50``
without its classifier: the output is the 2048-d global-average-pooled
feature.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flair_jax.models.layers import BatchNorm, Conv2d, block_runner, normalize_pixels
from flair_jax.models.torch_keys import Row
from flair_jax.models.tower import VisionTower

RESNET50_STAGES = (3, 4, 6, 3)
EXPANSION = 4


class Downsample(nnx.Module):
  """1x1 strided projection shortcut (torchvision's ``downsample.0/1``)."""

  def __init__(self, cin, cout, stride, *, dtype, rngs):
    self.conv = Conv2d(cin, cout, 1, stride=stride, dtype=dtype, rngs=rngs)
    self.bn = BatchNorm(cout, dtype=dtype)

  def __call__(self, x):
    return self.bn(self.conv(x))


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (carries the stride: v1.5) -> 1x1, expansion 4."""

  def __init__(self, cin: int, width: int, stride: int, *, dtype, rngs):
    cout = width * EXPANSION
    self.conv1 = Conv2d(cin, width, 1, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(width, dtype=dtype)
    self.conv2 = Conv2d(width, width, 3, stride=stride, padding=1, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(width, dtype=dtype)
    self.conv3 = Conv2d(width, cout, 1, dtype=dtype, rngs=rngs)
    self.bn3 = BatchNorm(cout, dtype=dtype)
    self.downsample = (Downsample(cin, cout, stride, dtype=dtype, rngs=rngs)
                       if stride != 1 or cin != cout else None)

  def __call__(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = jax.nn.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return jax.nn.relu(y + identity)


def max_pool_3x3_s2(x_bhwc):
  """torch ``MaxPool2d(3, stride=2, padding=1)``: pads with -inf."""
  return jax.lax.reduce_window(
      x_bhwc, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
      ((0, 0), (1, 1), (1, 1), (0, 0)))


class ResNet(nnx.Module):
  """ResNet with bottleneck blocks; defaults give ResNet-50.

  Args:
    stages: number of bottlenecks per stage.
    width: channels of the stem and of the first stage's bottleneck (64 for
      ResNet-50); stage i has ``width * 2**i`` and outputs 4x that.
    pixel_mean, pixel_std: normalisation of the [0, 1] input (empty, FLAIR's
      choice: none).
    dtype: compute dtype; parameters stay float32.

  ``remat`` (an attribute, default False): rematerialise each bottleneck in
  the backward pass.
  """

  def __init__(self, stages: Sequence[int] = RESNET50_STAGES, width: int = 64,
               *, pixel_mean: Sequence[float] = (), pixel_std: Sequence[float] = (),
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.conv1 = Conv2d(3, width, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
    self.bn1 = BatchNorm(width, dtype=dtype)
    cin = width
    for i, n_blocks in enumerate(stages):
      w = width * 2**i
      blocks = []
      for b in range(n_blocks):
        stride = 2 if (b == 0 and i > 0) else 1
        blocks.append(Bottleneck(cin, w, stride, dtype=dtype, rngs=rngs))
        cin = w * EXPANSION
      setattr(self, f'layer{i + 1}', nnx.List(blocks))
    self.num_stages = len(stages)
    self.out_features = cin
    self.pixel_mean = tuple(pixel_mean)
    self.pixel_std = tuple(pixel_std)
    self.dtype = dtype
    self.remat = False

  def __call__(self, images_bhwc):
    """Maps ``[B, H, W, 3]`` float images to ``[B, out_features]`` float32."""
    x = normalize_pixels(images_bhwc, self.pixel_mean, self.pixel_std)
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = max_pool_3x3_s2(x)
    run = block_runner(self.remat)
    for i in range(self.num_stages):
      for block in getattr(self, f'layer{i + 1}'):
        x = run(block, x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


# torchvision ResNet (``fc`` excluded) <-> ResNet.
TORCH_ROWS = (
    Row('conv1', 'conv1', 'conv'),
    Row('bn1', 'bn1', 'batchnorm'),
    Row('layer{s}.{b}.conv{k}', 'layer{s}/{b}/conv{k}', 'conv'),
    Row('layer{s}.{b}.bn{k}', 'layer{s}/{b}/bn{k}', 'batchnorm'),
    Row('layer{s}.{b}.downsample.0', 'layer{s}/{b}/downsample/conv', 'conv'),
    Row('layer{s}.{b}.downsample.1', 'layer{s}/{b}/downsample/bn', 'batchnorm'),
)
# The ImageNet classifier of a torchvision ResNet-50 (FLAIR replaces it).
TORCH_EXTRAS = ('fc.weight', 'fc.bias')


def build(config, *, dtype, rngs: nnx.Rngs) -> ResNet:
  """The ResNet of a ``VisionConfig`` (its ``stages`` and ``width``)."""
  return ResNet(config.stages, config.width, pixel_mean=config.pixel_mean,
                pixel_std=config.pixel_std, dtype=dtype, rngs=rngs)


def shape_from_torch(shapes: Mapping[str, tuple]) -> dict:
  """``stages`` and ``width`` of a torchvision ResNet state dict's shapes.

  A state dict without stage or stem keys gets ResNet-50's.
  """
  stages = []
  while True:
    pattern = re.compile(rf'layer{len(stages) + 1}\.(\d+)\.')
    blocks = [int(m.group(1)) for m in map(pattern.match, shapes) if m]
    if not blocks:
      break
    stages.append(max(blocks) + 1)
  conv1 = shapes.get('conv1.weight')
  return dict(stages=tuple(stages) or RESNET50_STAGES,
              width=int(conv1[0]) if conv1 is not None else 64)


# PyTorch FLAIR names its ImageNet ResNet-50 variants resnet_v1 and resnet_v2.
TOWER = VisionTower(name='ResNet', build=build, torch_rows=TORCH_ROWS, torch_extras=TORCH_EXTRAS,
                    hub_types=('resnet_v1', 'resnet_v2'), shape_from_torch=shape_from_torch)
