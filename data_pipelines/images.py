"""Image helpers for dataset builders: safe decode, RGB, canvas resize, crop.

Conventions follow PyTorch FLAIR's loader: ``.convert('RGB')`` (an alpha
channel is DROPPED, not composited; EXIF orientation is not applied), then a
resize that keeps the aspect ratio with the longest side equal to the canvas
(square images go straight to canvas x canvas), antialiased bilinear. Two
modes get a better conversion than PIL's: 16-bit greyscale (``I;16*`` and
``I``, taken as 0..65535) is scaled to 8 bit with ``round(v * 255 / 65535)``
instead of being clipped at 255, and CMYK uses PIL's
``(255 - C)(255 - K) / 255``.

Failures raise ``ImageError`` whose ``reason`` is one of ``REASONS``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from typing import Union

import numpy as np
from PIL import Image
from scipy import ndimage

# PIL's own decompression-bomb limit (``Image.MAX_IMAGE_PIXELS`` default).
DEFAULT_MAX_PIXELS = 89_478_485
REASONS = ('missing_file', 'empty_file', 'unreadable_file', 'corrupt_image',
           'truncated_image', 'too_many_pixels', 'unsupported_mode')
IMAGE_FORMATS = ('png', 'jpeg')
_SIXTEEN_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')

Source = Union[str, os.PathLike, bytes]


class ImageError(ValueError):
  """An image that cannot be used; ``reason`` says why (one of REASONS)."""

  def __init__(self, reason: str, message: str):
    super().__init__(f'{reason}: {message}')
    self.reason = reason


def _describe(source: Source) -> str:
  return f'{len(source)} bytes' if isinstance(source, bytes) else os.fspath(source)


def open_checked(source: Source, max_pixels: int = DEFAULT_MAX_PIXELS):
  """Opens an image reading its header only; refuses > max_pixels pixels.

  Returns a lazy PIL image (pixels not decoded yet). Use it as a context
  manager so a file handle is closed.
  """
  if not isinstance(source, bytes):
    try:
      if os.stat(source).st_size == 0:
        raise ImageError('empty_file', f'{_describe(source)} is empty')
    except FileNotFoundError:
      raise ImageError('missing_file', f'{_describe(source)} does not exist') from None
    except OSError as e:
      raise ImageError('unreadable_file', f'{_describe(source)}: {e}') from None
  elif not source:
    raise ImageError('empty_file', 'no bytes')
  try:
    img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
  except Image.DecompressionBombError as e:
    raise ImageError('too_many_pixels', f'{_describe(source)}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise ImageError('corrupt_image',
                     f'{_describe(source)} is not a readable image: {e}') from None
  w, h = img.size
  if w * h > max_pixels:
    img.close()
    raise ImageError('too_many_pixels',
                     f'{_describe(source)} is {w}x{h} = {w * h} pixels, over '
                     f'the limit of {max_pixels}; refused without decoding')
  return img


def load(img) -> None:
  """Decodes the pixels of an opened image, mapping failures to ImageError."""
  try:
    img.load()
  except Exception as e:  # pylint: disable=broad-except
    reason = 'truncated_image' if 'truncat' in str(e).lower() else 'corrupt_image'
    raise ImageError(reason, f'{getattr(img, "filename", "") or "image"}: '
                     f'{type(e).__name__}: {e}') from None


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL mode to RGB (alpha dropped, 16-bit scaled, not clipped)."""
  if img.mode == 'RGB':
    return img
  if img.mode in _SIXTEEN_BIT:
    v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    v8 = ((v * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(v8, 'L').convert('RGB')
  try:
    with warnings.catch_warnings():  # P + tRNS: PIL suggests RGBA; we drop alpha.
      warnings.filterwarnings('ignore', 'Palette images with Transparency')
      return img.convert('RGB')
  except (ValueError, OSError) as e:
    raise ImageError('unsupported_mode',
                     f'cannot convert mode {img.mode} to RGB: {e}') from None


def fit_size(height: int, width: int, canvas: int) -> tuple[int, int]:
  """(height, width) with the longest side == canvas, aspect kept (floored)."""
  if height == width:
    return canvas, canvas
  long_side = max(height, width)
  fit = lambda s: max(1, s * canvas // long_side)  # Exact integer floor.
  return (canvas, fit(width)) if height > width else (fit(height), canvas)


def resize_longest(img: Image.Image, canvas: int,
                   source_size: tuple[int, int] | None = None) -> Image.Image:
  """Antialiased bilinear resize so the longest side equals ``canvas``.

  ``source_size`` (height, width) sets the target's aspect when ``img`` is a
  reduced decode (JPEG draft) of a larger original.
  """
  h, w = fit_size(*(source_size or (img.height, img.width)), canvas)
  if (h, w) == (img.height, img.width):
    return img
  return img.resize((w, h), Image.Resampling.BILINEAR)


def li_threshold(values: np.ndarray) -> float:
  """Li's minimum cross-entropy threshold of uint8 values (iterative form).

  Same iteration as ``skimage.filters.threshold_li`` (start at the mean,
  tolerance half the smallest gap between present values), computed on a
  256-bin histogram. Returns a threshold in the units of ``values``.
  """
  hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
  present = np.flatnonzero(hist)
  if len(present) < 2:
    return float(present[0]) if len(present) else 0.0
  lo = present[0]
  levels = np.arange(256, dtype=np.float64) - lo  # Shifted so the min is 0.
  tolerance = np.diff(present).min() / 2
  cum_n, cum_s = np.cumsum(hist), np.cumsum(hist * levels)
  t_next, t_curr = cum_s[-1] / cum_n[-1], -2 * tolerance
  while abs(t_next - t_curr) > tolerance:
    t_curr = t_next
    k = int(np.floor(t_curr + lo))  # Background: levels <= t_curr.
    n_back, s_back = cum_n[k], cum_s[k]
    mean_back = s_back / n_back
    mean_fore = (cum_s[-1] - s_back) / (cum_n[-1] - n_back)
    if mean_back == 0:
      break
    t_next = (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
  return float(t_next + lo)


def foreground_box(rgb_hw3: np.ndarray):
  """Bounding box (top, bottom, left, right) of the field of view, or None.

  FLAIR's transfer crop: the largest 8-connected component of the red
  channel above its Li threshold.
  """
  red = rgb_hw3[..., 0]
  mask = red > li_threshold(red)
  labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
  if n == 0:
    return None
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  rows, cols = ndimage.find_objects(labels, max_label=int(sizes.argmax()))[-1]
  return rows.start, rows.stop, cols.start, cols.stop


def crop_foreground(img: Image.Image) -> Image.Image:
  """Crops an RGB image to its field of view (unchanged when none is found)."""
  box = foreground_box(np.asarray(img))
  if box is None:
    return img
  top, bottom, left, right = box
  return img.crop((left, top, right, bottom))


def encode(img: Image.Image, image_format: str = 'png',
           jpeg_quality: int = 95) -> bytes:
  """PNG or JPEG bytes of an RGB image."""
  buf = io.BytesIO()
  if image_format == 'png':
    img.save(buf, format='PNG', compress_level=3)
  elif image_format == 'jpeg':
    img.save(buf, format='JPEG', quality=int(jpeg_quality))
  else:
    raise ValueError(f'image_format {image_format!r}; expected one of {IMAGE_FORMATS}')
  return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
  """uint8 HxWx3 pixels of encoded RGB bytes."""
  with Image.open(io.BytesIO(data)) as img:
    return np.asarray(to_rgb(img), dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Prepared:
  encoded: bytes
  original_size: tuple[int, int]  # (height, width) of the source file.
  size: tuple[int, int]  # (height, width) stored.


def prepare(source: Source, canvas: int, *, image_format: str = 'png',
            jpeg_quality: int = 95, crop: bool = False,
            max_pixels: int = DEFAULT_MAX_PIXELS,
            jpeg_draft: bool = False) -> Prepared:
  """Source file -> RGB, optional FOV crop, longest side = canvas, encoded.

  ``jpeg_draft`` lets the JPEG decoder downscale by a power of two in the DCT
  domain (never below the canvas): several times faster on large photographs,
  a few grey levels away from a full decode.
  """
  with open_checked(source, max_pixels) as img:
    original = (img.height, img.width)
    if jpeg_draft and img.format == 'JPEG' and not crop:
      h, w = fit_size(img.height, img.width, canvas)
      img.draft(None, (w, h))
    load(img)
    rgb = to_rgb(img)
    if crop:
      rgb = crop_foreground(rgb)
    rgb = resize_longest(rgb, canvas, None if crop else original)
    return Prepared(encode(rgb, image_format, jpeg_quality), original,
                    (rgb.height, rgb.width))
