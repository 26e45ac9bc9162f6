"""PyTorch's antialiased bicubic resampling (``interpolate(mode='bicubic',
antialias=True, align_corners=False)``) in NumPy, one axis at a time.

PyTorch computes it as Pillow does: Keys' cubic with ``a = -0.5``, its
support widened by the scale when shrinking, taps outside the input dropped
and the remaining weights renormalised. timm resamples position embeddings
this way when a checkpoint's patch grid differs from the model's.
"""

from __future__ import annotations

import numpy as np

# Weights are computed in float32, as PyTorch does for float32 tensors: that
# brings them from ~1e-6 to ~1e-7 of PyTorch's.
_F = np.float32
_A = _F(-0.5)  # Keys' parameter in PyTorch's antialiased path (Pillow's)
_SUPPORT = _F(2.0)  # half-width of the cubic kernel in input pixels at scale 1


def _cubic(x: np.ndarray) -> np.ndarray:
  x = np.abs(x).astype(_F)
  near = ((_A + 2) * x - (_A + 3)) * x * x + 1
  far = ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A
  return np.where(x < 1, near, np.where(x < 2, far, 0)).astype(_F)


def weights(in_size: int, out_size: int) -> np.ndarray:
  """The ``[out_size, in_size]`` float32 resampling matrix of one axis."""
  scale = _F(in_size) / _F(out_size)
  support = _SUPPORT * scale if scale >= 1 else _SUPPORT
  invscale = _F(1) / scale if scale >= 1 else _F(1)
  w_oi = np.zeros((out_size, in_size), _F)
  half = _F(0.5)
  for i in range(out_size):
    center = _F(scale * (_F(i) + half))
    # int() truncates towards zero as PyTorch's static_cast does.
    lo = max(int(_F(center - support + half)), 0)
    hi = min(int(_F(center + support + half)), in_size)
    taps = _cubic((np.arange(lo, hi).astype(_F) - center + half) * invscale)
    total = _F(0)
    for t in taps:  # sequential float32 sum, PyTorch's order
      total = _F(total + t)
    w_oi[i, lo:hi] = taps / total if total != 0 else taps
  return w_oi


def resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
  """``x`` resampled to ``size`` along ``axis`` (float64 sums of float32
  weights)."""
  w_oi = weights(x.shape[axis], size).astype(np.float64)
  moved = np.moveaxis(np.asarray(x, np.float64), axis, 0)
  return np.moveaxis(np.tensordot(w_oi, moved, axes=(1, 0)), 0, axis)
