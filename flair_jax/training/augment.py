"""On-device image augmentation for pre-training, as PyTorch FLAIR's kornia stack.

Per sample, in this order: horizontal flip (p=0.5); affine (p=0.25) with a
rotation uniform in [-5, 5] degrees and an isotropic scale uniform in
[0.9, 1] about the image centre, bilinear, zero fill; colour jitter (p=0.25)
with brightness and contrast factors uniform in [0.8, 1.2]. Brightness
multiplies; contrast blends with the image's mean grey level (ITU-R 601
weights); each clips to [0, 1]; as in kornia the two run in a random order
(drawn here per sample, by kornia per batch).

Geometry uses pixel centres: output pixel ``p`` reads the input at
``c + R(-a) (p - c) / s`` with ``c = ((W-1)/2, (H-1)/2)``, so a zero angle
and a unit scale are exactly the identity. (kornia's default
``align_corners=False`` adds a ``W/(W-1)`` stretch, 0.2% at 512 pixels,
not reproduced.) Shapes are static and every branch is a ``jnp.where``, so
the function jits once for a batch shape.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

GREY_WEIGHTS = (0.299, 0.587, 0.114)


class AugmentParams(NamedTuple):
  """Per-sample draws, each ``[B]``."""
  flip: jax.Array            # bool
  affine: jax.Array          # bool
  angle_deg: jax.Array       # float32, counter-clockwise on screen
  scale: jax.Array           # float32
  jitter: jax.Array          # bool
  brightness: jax.Array      # float32 factor
  contrast: jax.Array        # float32 factor
  contrast_first: jax.Array  # bool


def sample_params(key: jax.Array, batch: int, *, flip_p: float = 0.5, affine_p: float = 0.25,
                  degrees: float = 5.0, scale_range: tuple[float, float] = (0.9, 1.0),
                  jitter_p: float = 0.25, brightness: float = 0.2,
                  contrast: float = 0.2) -> AugmentParams:
  """Draws FLAIR's augmentation parameters for ``batch`` samples."""
  keys = jax.random.split(key, 8)

  def uniform(k, low, high):
    return jax.random.uniform(k, (batch,), jnp.float32, low, high)

  return AugmentParams(
      flip=jax.random.bernoulli(keys[0], flip_p, (batch,)),
      affine=jax.random.bernoulli(keys[1], affine_p, (batch,)),
      angle_deg=uniform(keys[2], -degrees, degrees),
      scale=uniform(keys[3], *scale_range),
      jitter=jax.random.bernoulli(keys[4], jitter_p, (batch,)),
      brightness=uniform(keys[5], 1.0 - brightness, 1.0 + brightness),
      contrast=uniform(keys[6], 1.0 - contrast, 1.0 + contrast),
      contrast_first=jax.random.bernoulli(keys[7], 0.5, (batch,)))


def _bilinear_zero_fill(img_bhwc, y_bhw, x_bhw):
  """Samples ``img`` at fractional pixel coordinates; outside reads 0."""
  b, h, w, c = img_bhwc.shape
  flat_bnc = img_bhwc.reshape(b, h * w, c)
  y0, x0 = jnp.floor(y_bhw), jnp.floor(x_bhw)
  wy, wx = (y_bhw - y0)[..., None], (x_bhw - x0)[..., None]
  out = jnp.zeros_like(img_bhwc)
  for dy, dx, weight in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx),
                         (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
    yi, xi = (y0 + dy).astype(jnp.int32), (x0 + dx).astype(jnp.int32)
    inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    index_bn = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).reshape(b, h * w, 1)
    value = jnp.take_along_axis(flat_bnc, index_bn, axis=1).reshape(b, h, w, c)
    out = out + jnp.where(inside[..., None], weight.astype(value.dtype) * value, 0)
  return out


def affine_warp(img_bhwc: jax.Array, angle_deg_b: jax.Array, scale_b: jax.Array) -> jax.Array:
  """Rotates by ``angle_deg`` and scales by ``scale`` about the image centre.

  Args:
    img_bhwc: float images.
    angle_deg_b, scale_b: ``[B]`` per-image rotation (degrees) and scale.
  Returns:
    float ``[B, H, W, C]``, bilinear, zeros outside the source.
  """
  _, h, w, _ = img_bhwc.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  angle = jnp.deg2rad(angle_deg_b.astype(jnp.float32))[:, None, None]
  inv_scale = 1.0 / scale_b.astype(jnp.float32)[:, None, None]
  dy = (jnp.arange(h, dtype=jnp.float32) - cy)[None, :, None]
  dx = (jnp.arange(w, dtype=jnp.float32) - cx)[None, None, :]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Inverse of the forward map dst = c + s [[cos, sin], [-sin, cos]] (src - c), in (x, y).
  x_src = cx + inv_scale * (cos * dx - sin * dy)
  y_src = cy + inv_scale * (sin * dx + cos * dy)
  return _bilinear_zero_fill(img_bhwc, y_src, x_src)


def _grey_mean(img_bhwc):
  weights = jnp.asarray(GREY_WEIGHTS, img_bhwc.dtype)
  return jnp.mean(img_bhwc @ weights, axis=(1, 2))[:, None, None, None]


def adjust_brightness(img_bhwc, factor_b):
  """``clip(img * factor, 0, 1)`` per image."""
  return jnp.clip(img_bhwc * factor_b[:, None, None, None].astype(img_bhwc.dtype), 0.0, 1.0)


def adjust_contrast(img_bhwc, factor_b):
  """``clip(factor * img + (1 - factor) * mean grey, 0, 1)`` per image."""
  f = factor_b[:, None, None, None].astype(img_bhwc.dtype)
  return jnp.clip(f * img_bhwc + (1.0 - f) * _grey_mean(img_bhwc), 0.0, 1.0)


def apply_params(img_bhwc: jax.Array, params: AugmentParams) -> jax.Array:
  """Applies drawn parameters: flip, then affine, then jitter, where selected."""
  def per_sample(mask_b, new, old):
    return jnp.where(mask_b[:, None, None, None], new, old)

  img = per_sample(params.flip, img_bhwc[:, :, ::-1], img_bhwc)
  img = per_sample(params.affine, affine_warp(img, params.angle_deg, params.scale), img)
  brightness_first = adjust_contrast(adjust_brightness(img, params.brightness), params.contrast)
  contrast_first = adjust_brightness(adjust_contrast(img, params.contrast), params.brightness)
  jittered = per_sample(params.contrast_first, contrast_first, brightness_first)
  return per_sample(params.jitter, jittered, img)


def to_unit_float(images_bhwc: jax.Array, dtype=jnp.float32) -> jax.Array:
  """uint8 pixels -> ``dtype`` in [0, 1]; float input only changes dtype."""
  if jnp.issubdtype(images_bhwc.dtype, jnp.integer):
    return (images_bhwc.astype(jnp.float32) / 255.0).astype(dtype)
  return images_bhwc.astype(dtype)


def augment(key: jax.Array, images_bhwc: jax.Array, *, dtype=jnp.float32, **kwargs) -> jax.Array:
  """FLAIR's pre-training augmentation of a batch.

  Args:
    key: PRNG key.
    images_bhwc: uint8 images (scaled by 1/255) or floats in [0, 1].
    dtype: the float dtype the augmentation computes in and returns (the
      towers' compute dtype: bfloat16 halves its memory traffic).
    **kwargs: probabilities and ranges of ``sample_params``.
  Returns:
    ``[B, H, W, C]`` floats in [0, 1] (jitter clips; flip and affine keep range).
  """
  img = to_unit_float(images_bhwc, dtype)
  params = sample_params(key, images_bhwc.shape[0], **kwargs)
  return apply_params(img, params).astype(dtype)
