"""Layers whose numerics follow PyTorch exactly: convolution with explicit
symmetric padding, torch-style BatchNorm and a plain linear layer.

Parameters are stored float32 in JAX layouts (conv kernels HWIO, linear
kernels (in, out)); computation runs in a configurable ``dtype``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def _uniform(key, shape, bound):
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class Conv2d(nnx.Module):
  """2-D convolution, NHWC input, HWIO kernel, symmetric explicit padding.

  XLA's ``'SAME'`` pads stride-2 layers asymmetrically; torch pads both sides
  by ``padding``, which this layer reproduces.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int,
               *, stride: int = 1, padding: int = 0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    # torchvision's ResNet init: kaiming normal, fan_out, relu gain.
    fan_out = out_features * kernel_size * kernel_size
    std = math.sqrt(2.0 / fan_out)
    shape = (kernel_size, kernel_size, in_features, out_features)
    self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32))
    self.stride = stride
    self.padding = padding
    self.dtype = dtype

  def __call__(self, x_bhwc):
    p = self.padding
    return jax.lax.conv_general_dilated(
        x_bhwc.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(self.stride, self.stride),
        padding=((p, p), (p, p)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class BatchNorm(nnx.Module):
  """BatchNorm with torch's semantics.

  Train mode normalises with the biased batch variance and updates
  ``running = (1 - momentum) * running + momentum * batch`` where the running
  variance receives the UNBIASED batch variance, as ``torch.nn.BatchNorm2d``.
  ``num_batches_tracked`` is kept so that state dicts round-trip.
  Statistics are computed in float32 whatever the compute dtype.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.1,
               epsilon: float = 1e-5, dtype=jnp.float32,
               use_running_average: bool = False):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.use_running_average = use_running_average

  def __call__(self, x):
    axes = tuple(range(x.ndim - 1))
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      n = math.prod(x.shape[a] for a in axes)
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      self.mean[...] = (1.0 - m) * self.mean[...] + m * mean
      self.var[...] = (1.0 - m) * self.var[...] + m * unbiased
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    shift = self.bias[...] - mean * inv
    return (x.astype(jnp.float32) * inv + shift).astype(self.dtype)


class Linear(nnx.Module):
  """Dense layer with a ``(in, out)`` kernel; torch's default init."""

  def __init__(self, in_features: int, out_features: int, *,
               use_bias: bool = True, init_std: float | None = None,
               dtype=jnp.float32, rngs: nnx.Rngs):
    shape = (in_features, out_features)
    if init_std is None:
      bound = 1.0 / math.sqrt(in_features)
      self.kernel = nnx.Param(_uniform(rngs.params(), shape, bound))
    else:
      self.kernel = nnx.Param(init_std * jax.random.normal(rngs.params(), shape, jnp.float32))
    self.bias = (nnx.Param(jnp.zeros((out_features,), jnp.float32))
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32."""

  def __init__(self, num_features: int, *, epsilon: float, dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.epsilon = epsilon
    self.dtype = dtype

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


def normalize_pixels(images_bhwc, mean: Sequence[float], std: Sequence[float]):
  """``(x - mean) / std`` per channel; identity when ``mean`` is empty."""
  if not mean:
    return images_bhwc
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images_bhwc.astype(jnp.float32) - mean) / std
