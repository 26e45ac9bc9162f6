"""FLAIR's inference preprocessing: uint8 image -> padded float canvas.

PyTorch FLAIR scales intensities to [0, 1] (no ImageNet mean/std), resizes so
the longest side equals the canvas with antialiased bilinear interpolation
(target size ``int(side / scale)`` with ``scale = longest / canvas``) and pads
zeros at the bottom and right.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def to_rgb(image: np.ndarray) -> np.ndarray:
  """Greyscale ``[H, W]`` / ``[H, W, 1]`` -> 3 channels; RGBA drops alpha."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(f'expected an image [H, W] or [H, W, C], got shape {image.shape}')
  c = image.shape[-1]
  if c == 1:
    return np.repeat(image, 3, axis=-1)
  if c in (3, 4):
    return image[..., :3]
  raise ValueError(f'expected 1, 3 or 4 channels, got {c} (shape {image.shape})')


def canvas_size(height: int, width: int, image_size: int) -> tuple[int, int]:
  """The resized ``(h, w)`` exactly as PyTorch FLAIR computes it."""
  scale = max(height, width) / image_size
  return int(height / scale), int(width / scale)


def preprocess_image(image: np.ndarray, image_size: int = 512) -> jax.Array:
  """One image (uint8 HWC, HW greyscale or RGBA) -> float32 ``[S, S, 3]``.

  Values in [0, 1]; the longest side becomes ``image_size`` (antialiased
  bilinear) and the rest is zero padding at the bottom and right.
  """
  image = to_rgb(image)
  x = np.asarray(image, np.float32)
  if x.max() > 0:  # FLAIR divides only when the image is not all black.
    x = x / 255.0
  h, w = canvas_size(x.shape[0], x.shape[1], image_size)
  if (h, w) != x.shape[:2]:
    x = jax.image.resize(jnp.asarray(x), (h, w, 3), method='linear', antialias=True)
  return jnp.pad(jnp.asarray(x), ((0, image_size - h), (0, image_size - w), (0, 0)))


def preprocess_batch(images, image_size: int = 512) -> jax.Array:
  """A list of images of any sizes -> ``[B, S, S, 3]`` float32."""
  return jnp.stack([preprocess_image(im, image_size) for im in images])
