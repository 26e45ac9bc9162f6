"""Images for builders, loaders and the towers: safe decode, RGB, canvases, crop.

Conventions follow PyTorch FLAIR's loader: ``.convert('RGB')`` (an alpha
channel is DROPPED, not composited; EXIF orientation is not applied), then a
resize that keeps the aspect ratio with the longest side equal to the canvas
(square images go straight to canvas x canvas), antialiased bilinear. Two
modes get a better conversion than PIL's: 16-bit greyscale (``I;16*`` and
``I``, taken as 0..65535) is scaled to 8 bit with ``round(v * 255 / 65535)``
instead of being clipped at 255, and CMYK uses PIL's
``(255 - C)(255 - K) / 255``.

The model's input canvases are FLAIR's two float paths, which differ:
``flair_inference_canvas`` (``FLAIRModel``) and ``flair_transfer_canvas``
(the evaluation loader); ``stored_canvas`` pads a built image for training.

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


def _pil_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode as RGB (alpha dropped, 16-bit scaled, not clipped)."""
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


def to_rgb(image: Union[np.ndarray, Image.Image]) -> np.ndarray:
  """Three channels ``[H, W, 3]`` of an image array or a PIL image.

  Arrays: greyscale ``[H, W]`` / ``[H, W, 1]`` is repeated, RGBA drops
  alpha, the dtype is kept. PIL images (uint8 result): every mode PIL
  converts, with the 16-bit and CMYK rules of the module docstring.
  """
  if isinstance(image, Image.Image):
    return np.asarray(_pil_rgb(image))
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(f'expected an image [H, W] or [H, W, C], got shape {image.shape}')
  channels = image.shape[-1]
  if channels == 1:
    return np.repeat(image, 3, axis=-1)
  if channels in (3, 4):
    return image[..., :3]
  raise ValueError(f'expected 1, 3 or 4 channels, got {channels} (shape {image.shape})')


def flair_size(height: int, width: int, canvas: int) -> tuple[int, int]:
  """PyTorch FLAIR's resized ``(h, w)``: each side over ``longest / canvas``.

  Float division truncated, exactly as FLAIR computes it; the longest side
  can come out one short of ``canvas`` (then padded).
  """
  scale = max(height, width) / canvas
  return int(height / scale), int(width / scale)


def fit_size(height: int, width: int, canvas: int) -> tuple[int, int]:
  """Stored ``(h, w)``: the longest side exactly ``canvas``, aspect kept.

  The short side is FLAIR's ``flair_size`` computed in exact integers
  (floored, at least 1), so a stored image always spans the canvas; square
  images go straight to ``canvas x canvas`` as in FLAIR's transfer loader.
  """
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


def crop_foreground(image: np.ndarray) -> np.ndarray:
  """FLAIR's field-of-view crop of uint8 ``[H, W, 3]`` pixels (unchanged if none)."""
  if image.dtype != np.uint8:
    raise ValueError(f'the field-of-view crop expects uint8 pixels, got {image.dtype}')
  box = foreground_box(image)
  if box is None:
    return image
  top, bottom, left, right = box
  return image[top:bottom, left:right]


def pad_to_canvas(image: np.ndarray, canvas: int) -> np.ndarray:
  """``[canvas, canvas, C]``: zero padding at the bottom and right."""
  h, w = image.shape[:2]
  if (h, w) == (canvas, canvas):
    return image
  return np.pad(image, ((0, canvas - h), (0, canvas - w), (0, 0)))


def _resize_antialiased(x: np.ndarray, height: int, width: int) -> np.ndarray:
  """Antialiased bilinear resize of float ``[h, w, C]``: torchvision's
  ``Resize(antialias=True)``, which FLAIR uses, as JAX computes it."""
  if (height, width) == x.shape[:2]:
    return x
  import jax  # pylint: disable=g-import-not-at-top  # builders and readers never need it
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return np.asarray(jax.image.resize(jnp.asarray(x), (height, width, x.shape[2]),
                                     method='linear', antialias=True))


def flair_inference_canvas(image: np.ndarray, canvas: int = 512) -> np.ndarray:
  """PyTorch FLAIR's ``FLAIRModel.preprocess_image``: float32 ``[S, S, 3]``.

  Values in [0, 1] (the image is divided by 255 unless all black), both
  sides resized by ``flair_size`` (antialiased bilinear), zero padding at
  the bottom and right.
  """
  x = np.asarray(to_rgb(image), np.float32)
  if x.max() > 0:  # FLAIR divides only when the image is not all black.
    x = x / 255.0
  return pad_to_canvas(_resize_antialiased(x, *flair_size(*x.shape[:2], canvas)), canvas)


def flair_transfer_canvas(image: np.ndarray, canvas: int = 512, crop: bool = False) -> np.ndarray:
  """PyTorch FLAIR's transfer loader: float32 ``[S, S, 3]``.

  Optional field-of-view crop, division by 255 unless the values are
  already in [0, 1], square images resized straight to the canvas, others
  by ``flair_size`` with zero padding at the bottom and right.
  """
  image = to_rgb(image)
  if crop:
    image = crop_foreground(image)
  x = np.asarray(image, np.float32)
  if x.max() > 1:  # FLAIR's loader scales only images that are not already in [0, 1].
    x = x / 255.0
  h, w = x.shape[:2]
  size = (canvas, canvas) if h == w else flair_size(h, w, canvas)
  return pad_to_canvas(_resize_antialiased(x, *size), canvas)


def stored_canvas(image, canvas: int, out: np.ndarray | None = None) -> np.ndarray:
  """A stored image as uint8 ``[canvas, canvas, 3]``, padded bottom and right.

  Args:
    image: uint8 ``[h, w, 3]`` array or encoded PNG/JPEG bytes, longest side
      ``canvas`` (as the builders store it).
    canvas: the canvas side.
    out: optional uint8 ``[canvas, canvas, 3]`` array (e.g. a row of a
      batch) to write the canvas into instead of a new array: the pixels
      are copied once, straight to their place, and only the padding is
      zeroed.
  Returns:
    ``out`` when given, else a new array (the image itself when it already
    fills the canvas).
  """
  if out is not None and (out.dtype != np.uint8 or out.shape != (canvas, canvas, 3)):
    raise ValueError(f'out has dtype {out.dtype} and shape {out.shape}; expected uint8 '
                     f'[{canvas}, {canvas}, 3]')
  if isinstance(image, (bytes, np.bytes_)):
    image = decode(bytes(image))
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f'image has dtype {image.dtype} and shape {image.shape}; expected uint8 '
                     '[h, w, 3] RGB')
  h, w, _ = image.shape
  if max(h, w) != canvas:
    raise ValueError(f'image is {h}x{w} but the canvas is {canvas}: the dataset was built for '
                     f'another canvas; expected the longest side == {canvas}')
  if out is None:
    return pad_to_canvas(image, canvas)
  out[:h, :w] = image
  out[h:] = 0
  out[:h, w:] = 0
  return out


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
    return to_rgb(img)


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
    rgb = _pil_rgb(img)
    if crop:
      rgb = Image.fromarray(crop_foreground(np.asarray(rgb)))
    rgb = resize_longest(rgb, canvas, None if crop else original)
    return Prepared(encode(rgb, image_format, jpeg_quality), original,
                    (rgb.height, rgb.width))
