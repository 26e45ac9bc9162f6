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

  For a batch split into micro-batches (gradient accumulation) the layer
  can also record the statistics of a whole batch (``record_moments``) and
  later normalise one micro-batch with them (``use_moments``); see there.
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
    self.moments = nnx.data(None)  # see record_moments / use_moments

  def __call__(self, x):
    axes = tuple(range(x.ndim - 1))
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    elif isinstance(self.moments, GivenMoments):
      mean, var = self.moments.normalising_moments(x.astype(jnp.float32), axes)
    else:
      mean, var = batch_moments(x.astype(jnp.float32), axes, self.mean[...])
      if isinstance(self.moments, RecordedMoments):
        self.moments = RecordedMoments((mean, var))
      n = math.prod(x.shape[a] for a in axes)
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      self.mean[...] = (1.0 - m) * self.mean[...] + m * mean
      self.var[...] = (1.0 - m) * self.var[...] + m * unbiased
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    inv = jax.lax.rsqrt(var + self.epsilon) * self.scale[...]
    shift = self.bias[...] - mean * inv
    return (x.astype(jnp.float32) * inv + shift).astype(self.dtype)


def batch_moments(xf, axes, shift):
  """``(mean, biased var)`` over ``axes`` in one pass over ``xf``.

  The sums of ``d = xf - shift`` and ``d**2`` are taken together (one read of
  the activations, and on a split batch one all-reduce instead of a mean's
  and then a variance's), then ``var = E[d**2] - E[d]**2``. Shifted by a value
  near the mean (the running mean), the subtraction loses no more than the
  two-pass form; the shift carries no gradient (the moments do not depend
  on it).
  """
  shift = jax.lax.stop_gradient(shift)
  d = xf - shift
  mean_d = jnp.mean(d, axes)
  var = jnp.maximum(jnp.mean(jnp.square(d), axes) - jnp.square(mean_d), 0.0)
  return mean_d + shift, var


class RecordedMoments(nnx.Intermediate):
  """The ``(mean, biased var)`` a train-mode BatchNorm normalised a batch with."""


class GivenMoments(nnx.Variable):
  """Whole-batch ``(mean, var)`` and a micro-batch's share of the batch.

  The micro-batch is normalised with the whole batch's statistics (the
  forward pass is the whole batch's, row for row). The gradient flows
  through them as through the statistics of the whole batch, but only via
  this micro-batch's own rows: ``d mean / d x_i = 1 / B`` and
  ``d var / d x_i = 2 (x_i - mean) / B`` for its rows ``i``, as in the whole
  batch; the terms through the other micro-batches' rows are absent (each
  would need the other micro-batches' backward pass at every BatchNorm).
  The running statistics are not updated (the whole batch's pass did).
  """

  def normalising_moments(self, xf, axes):
    mean_all, var_all, share = self.get_value()
    mean_all, var_all = jax.lax.stop_gradient(mean_all), jax.lax.stop_gradient(var_all)
    own_mean = jnp.mean(xf, axes)
    # Centred on the whole batch's mean: the mean's own gradient through the
    # variance, sum_i (x_i - mean) / B, is zero there as in the whole batch.
    own_var = jnp.mean(jnp.square(xf - mean_all), axes)
    # Values: exactly the whole batch's; gradients: this share of the rows.
    mean = mean_all + share * (own_mean - jax.lax.stop_gradient(own_mean))
    var = var_all + share * (own_var - jax.lax.stop_gradient(own_var))
    return mean, var


def batchnorms(model: nnx.Module) -> list:
  """The model's :class:`BatchNorm` layers, in a fixed order."""
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, BatchNorm)]


def record_moments(model: nnx.Module) -> None:
  """Train-mode BatchNorms of ``model`` keep the statistics of their next call."""
  for bn in batchnorms(model):
    bn.moments = RecordedMoments(None)


def recorded_moments(model: nnx.Module) -> list:
  """``[(mean, var)]`` per BatchNorm (:func:`batchnorms` order) since
  :func:`record_moments`; ``None`` for a layer in eval mode."""
  return [bn.moments.get_value() if isinstance(bn.moments, RecordedMoments) else None
          for bn in batchnorms(model)]


def use_moments(model: nnx.Module, moments: list, share) -> None:
  """Train-mode BatchNorms normalise with ``moments`` (from
  :func:`recorded_moments` of the whole batch); ``share`` is the micro-batch's
  fraction of the batch's rows. See :class:`GivenMoments`."""
  for bn, m in zip(batchnorms(model), moments, strict=True):
    if m is not None:
      bn.moments = GivenMoments((m[0], m[1], share))


def _run_block(block, *args):
  return block(*args)


def block_runner(remat: bool):
  """``run(block, *args)``: ``block(*args)``, rematerialised in the backward
  pass when ``remat`` (only the block's inputs are kept for it)."""
  return nnx.remat(_run_block) if remat else _run_block


def remat_blocks(model: nnx.Module) -> None:
  """Every tower of ``model`` with a ``remat`` switch rematerialises its blocks."""
  for _, m in nnx.iter_modules(model):
    if isinstance(getattr(m, 'remat', None), bool):
      m.remat = True


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
