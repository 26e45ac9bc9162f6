"""Procedural fundus-like photographs with FLAIR findings drawn in.

``synthetic_fundus(rng, categories, size, style)`` paints a round field of
view on black: orange-red background with choroidal texture and vignetting,
the optic disc and its cup, the macula, a vessel tree leaving the disc, and
the findings: microaneurysms (small red dots), haemorrhages (dark red
blots), hard exudates (yellow sharp-edged spots), drusens (yellow-white soft
round deposits) and glaucoma (enlarged, pale optic cup). Geometry is in units
of the field-of-view radius with a floor in pixels, so the same picture comes
out at any canvas and lesions stay visible at 96 pixels.

``SOURCES`` describes the synthetic "datasets" (sizes, category mixes, image
styles) and ``example(seed, split, index, n, canvas)`` draws one example of
the synthetic assembly deterministically.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

FINDINGS = ('microaneurysms', 'haemorrhages', 'hard exudates', 'drusens',
            'glaucoma')
CATEGORIES = ('normal',) + FINDINGS
SPLITS = {'train': 0, 'test': 1}


@dataclasses.dataclass(frozen=True)
class Style:
  """How a synthetic camera renders: shape, colour and degradation."""

  aspect: float = 1.0  # height / width.
  fov: float = 0.96  # FOV radius / (min side / 2); > 1 clips top and bottom.
  brightness: float = 1.0
  tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
  vignette: float = 0.45
  noise: float = 0.012  # Pixel noise std, in [0, 1] units.
  blur: float = 0.0  # Gaussian blur, in units of the FOV radius.

  def degraded(self) -> Style:
    """The 'noisy' variant: darker, blurred, grainy, uneven illumination."""
    return dataclasses.replace(self, brightness=self.brightness * 0.8,
                               vignette=self.vignette + 0.2,
                               noise=self.noise + 0.035, blur=self.blur + 0.006)


@dataclasses.dataclass(frozen=True)
class Source:
  """One synthetic dataset: its share of the images, findings and style."""

  name: str
  share: float
  mix: dict  # Category -> probability of being the first category.
  style: Style
  attributes: bool  # Whether images carry 'clean'/'noisy'.
  noisy_rate: float
  pair_rate: float  # Train images with a second finding.


SOURCES = (
    Source('91_SYNTH-DR', 0.40,
           {'normal': 0.28, 'microaneurysms': 0.24, 'haemorrhages': 0.24,
            'hard exudates': 0.24},
           Style(brightness=1.05), True, 0.12, 0.25),
    Source('92_SYNTH-AMD', 0.25, {'normal': 0.4, 'drusens': 0.6},
           Style(aspect=0.75, fov=1.02, brightness=0.82,
                 tint=(1.0, 0.92, 0.85), vignette=0.55), False, 0.15, 0.0),
    Source('93_SYNTH-GLAUCOMA', 0.20, {'normal': 0.5, 'glaucoma': 0.5},
           Style(aspect=0.8, brightness=0.95, tint=(1.05, 0.85, 0.8)), False,
           0.1, 0.0),
    Source('94_SYNTH-MIX', 0.15, {c: 1 / 6 for c in CATEGORIES},
           Style(brightness=1.15, tint=(0.95, 1.05, 1.1), vignette=0.3), True,
           0.35, 0.2),
)

# Colours in [0, 1] RGB.
_VEIN, _ARTERY = (0.45, 0.06, 0.04), (0.62, 0.12, 0.06)
_RED_LESION, _HAEM = (0.38, 0.03, 0.02), (0.30, 0.02, 0.02)
_EXUDATE, _DRUSEN = (1.0, 0.86, 0.15), (0.92, 0.90, 0.74)
_DISC, _CUP = (1.0, 0.80, 0.52), (1.0, 0.96, 0.84)


class _Canvas:
  """Pixel grid and FOV geometry; draws antialiased masks in FOV units."""

  def __init__(self, size: int, style: Style):
    self.w = size if style.aspect <= 1 else max(1, round(size / style.aspect))
    self.h = max(1, round(size * style.aspect)) if style.aspect <= 1 else size
    self.r = style.fov * min(self.h, self.w) / 2  # FOV radius in pixels.
    self.cx, self.cy = self.w / 2, self.h / 2
    self.ss = 4 if size <= 192 else 2  # Supersampling of drawn masks.

  def px(self, length: float, floor_px: float) -> float:
    """A length in FOV units -> pixels, at least ``floor_px``."""
    return max(length * self.r, floor_px)

  def to_px(self, xy):
    return ((self.cx + xy[0] * self.r) * self.ss,
            (self.cy + xy[1] * self.r) * self.ss)

  def mask(self, draw_fn, blur_px: float = 0.0) -> np.ndarray:
    img = Image.new('L', (self.w * self.ss, self.h * self.ss), 0)
    draw_fn(ImageDraw.Draw(img))
    img = img.resize((self.w, self.h), Image.Resampling.BOX)
    if blur_px > 0:
      img = img.filter(ImageFilter.GaussianBlur(blur_px))
    return np.asarray(img, np.float32)[..., None] / 255

  def ellipse(self, draw, xy, rx_px, ry_px, fill=255):
    x, y = self.to_px(xy)
    rx, ry = rx_px * self.ss, ry_px * self.ss
    draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=fill)


def _smooth_noise(rng, h, w, cells):
  grid = rng.standard_normal((cells, cells)).astype(np.float32)
  return np.asarray(Image.fromarray(grid, 'F').resize((w, h), Image.Resampling.BICUBIC))


def _walk(rng, start, heading, length, steps, wobble):
  pts = [np.asarray(start, np.float64)]
  step = length / steps
  for _ in range(steps):
    heading += rng.normal(0, wobble)
    pts.append(pts[-1] + step * np.array([math.cos(heading), math.sin(heading)]))
  return np.stack(pts)


def _vessel_paths(rng, disc, fovea, side):
  """Polylines (points in FOV units, width in FOV units) of one vessel tree."""
  paths = []
  for kind, width, spread in (('vein', 0.026, 1.0), ('artery', 0.018, 0.9)):
    for up in (-1, 1):  # Superior and inferior arcade around the macula.
      a = abs(disc[0] - fovea[0]) * rng.uniform(0.95, 1.1)
      b = rng.uniform(0.38, 0.48) * spread
      c = np.array([disc[0] - side * a, fovea[1]])
      t = np.linspace(0, rng.uniform(0.5, 0.62) * math.pi, 28)
      wob = 0.02 * np.sin(3 * t + rng.uniform(0, 6))
      arc = np.stack([c[0] + side * a * np.cos(t), c[1] + up * (b + wob) * np.sin(t)], 1)
      tail = math.atan2(up * b * math.cos(t[-1]), -side * a * math.sin(t[-1]))
      arc = np.concatenate([arc, _walk(rng, arc[-1], tail, rng.uniform(0.3, 0.45), 10, 0.08)[1:]])
      paths.append((kind, arc, width))
      for k in rng.choice(np.arange(5, 34), size=5, replace=False):
        outward = math.atan2(arc[k, 1] - c[1], arc[k, 0] - c[0])
        heading = outward + rng.normal(0, 0.35)
        branch = _walk(rng, arc[k], heading, rng.uniform(0.2, 0.4), 8, 0.2)
        paths.append((kind, branch, width * 0.55))
      nasal = _walk(rng, disc, math.atan2(up * 0.8, side) + rng.normal(0, 0.2),
                    rng.uniform(0.45, 0.6), 12, 0.12)
      paths.append((kind, nasal, width * 0.75))
  return paths


def _points_near(rng, n, center, radius, avoid, avoid_r):
  """n points within ``radius`` of ``center``, inside the FOV, off the disc."""
  out = []
  while len(out) < n:
    m = 4 * (n - len(out))
    ang, rad = rng.uniform(0, 2 * math.pi, m), radius * np.sqrt(rng.uniform(0, 1, m))
    p = np.stack([center[0] + rad * np.cos(ang), center[1] + rad * np.sin(ang)], 1)
    ok = (np.hypot(p[:, 0], p[:, 1]) < 0.88) & (
        np.hypot(p[:, 0] - avoid[0], p[:, 1] - avoid[1]) > avoid_r)
    out.extend(p[ok][: n - len(out)])
  return out


def _blend(img, mask, colour, alpha=1.0):
  return img + (np.asarray(colour, np.float32) - img) * (mask * alpha)


def synthetic_fundus(rng: np.random.Generator, categories: str | Sequence[str],
                     size: int, style: Style = Style()) -> np.ndarray:
  """A fundus-like uint8 HxWx3 image, longest side ``size``, with findings.

  Args:
    rng: numpy Generator; the image is a function of its state.
    categories: 'normal', a finding of FINDINGS, or a sequence of them.
    size: canvas (longest side in pixels).
    style: rendering style (aspect, colour, degradation).
  """
  cats = [categories] if isinstance(categories, str) else list(categories)
  unknown = set(cats) - set(CATEGORIES)
  if unknown:
    raise ValueError(f'cannot draw {sorted(unknown)}; known: {CATEGORIES}')
  cv = _Canvas(size, style)
  h, w = cv.h, cv.w
  side = rng.choice([-1, 1])
  disc = np.array([0.4 * side, rng.normal(-0.02, 0.03)])
  fovea = np.array([-0.08 * side, rng.normal(0.03, 0.02)])

  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  u, v = (xx + 0.5 - cv.cx) / cv.r, (yy + 0.5 - cv.cy) / cv.r
  rho2 = (u * u + v * v)[..., None]
  base = np.array([0.80, 0.36, 0.16], np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
  texture = 0.06 * _smooth_noise(rng, h, w, 9) + 0.03 * _smooth_noise(rng, h, w, 23)
  img = base * (1 + texture[..., None]) * (1 - style.vignette * rho2)
  fd2 = ((u - fovea[0]) ** 2 + (v - fovea[1]) ** 2)[..., None]
  img = img * (1 - 0.35 * np.exp(-fd2 / 0.02) - 0.25 * np.exp(-fd2 / 0.0015))

  disc_r = cv.px(0.1, 4.5)
  cup_frac = rng.uniform(0.78, 0.9) if 'glaucoma' in cats else rng.uniform(0.25, 0.4)
  soft = max(0.35, 0.12 * disc_r)
  cup_r = disc_r * cup_frac
  img = _blend(img, cv.mask(lambda d: cv.ellipse(d, disc, disc_r, disc_r * 1.08), soft),
               _DISC, 0.85)
  img = _blend(img, cv.mask(lambda d: cv.ellipse(d, disc, cup_r, cup_r * 1.05), soft),
               _CUP, 0.9)

  paths = _vessel_paths(rng, disc, fovea, side)
  for kind, colour in (('vein', _VEIN), ('artery', _ARTERY)):
    def draw_vessels(d, kind=kind):
      for k, pts, width in paths:
        if k == kind:
          d.line([cv.to_px(p) for p in pts], width=max(1, round(cv.px(width, 0.9) * cv.ss)),
                 fill=255, joint='curve')
    img = _blend(img, cv.mask(draw_vessels), colour, 0.85)

  img = _draw_findings(rng, img, cv, cats, disc, fovea, disc_r)

  fov_mask = np.clip((1 - np.sqrt(rho2)) * cv.r + 0.5, 0, 1)
  img = img * np.asarray(style.tint, np.float32) * style.brightness * fov_mask
  if style.blur > 0:
    sigma = style.blur * cv.r
    img = ndimage.gaussian_filter(img, (sigma, sigma, 0), truncate=3.0)
  img = img + rng.normal(0, style.noise, img.shape).astype(np.float32) * fov_mask
  return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _draw_findings(rng, img, cv, cats, disc, fovea, disc_r):
  avoid_r = disc_r / cv.r + 0.05
  if 'microaneurysms' in cats:
    pts = _points_near(rng, rng.integers(10, 20), fovea, 0.55, disc, avoid_r)
    r = cv.px(0.014, 1.1)
    img = _blend(img, cv.mask(lambda d: [cv.ellipse(d, p, r, r) for p in pts]), _RED_LESION, 0.95)
  if 'haemorrhages' in cats:
    blots = _points_near(rng, rng.integers(4, 8), fovea, 0.6, disc, avoid_r)
    def draw(d):
      for p in blots:
        size = cv.px(rng.uniform(0.035, 0.06), 2.6)
        for _ in range(3):  # Irregular blot: overlapping ellipses.
          q = p + rng.normal(0, 0.4 * size / cv.r, 2)
          cv.ellipse(d, q, size * rng.uniform(0.6, 1.0), size * rng.uniform(0.6, 1.0))
    img = _blend(img, cv.mask(draw, max(0.3, 0.08 * cv.px(0.05, 2.6))), _HAEM, 0.95)
  if 'hard exudates' in cats:
    spots = []
    for centre in _points_near(rng, rng.integers(2, 4), fovea, 0.4, disc, avoid_r + 0.1):
      spots += _points_near(rng, rng.integers(6, 12), centre, 0.12, disc, avoid_r)
    def draw(d):
      for p in spots:
        r = cv.px(rng.uniform(0.012, 0.024), 1.1)
        cv.ellipse(d, p, r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3))
    img = _blend(img, cv.mask(draw), _EXUDATE, 1.0)
  if 'drusens' in cats:
    pts = _points_near(rng, rng.integers(12, 24), fovea, 0.35, disc, avoid_r)
    def draw(d):
      for p in pts:
        r = cv.px(rng.uniform(0.02, 0.035), 1.5)
        cv.ellipse(d, p, r, r)
    img = _blend(img, cv.mask(draw, max(0.4, 0.25 * cv.px(0.025, 1.5))), _DRUSEN, 0.9)
  return img


def split_counts(n: int) -> list[int]:
  """Images per source for a split of n (largest remainder of the shares)."""
  raw = np.array([s.share for s in SOURCES]) * n
  counts = np.floor(raw).astype(int)
  for k in np.argsort(counts - raw)[: n - counts.sum()]:
    counts[k] += 1
  return counts.tolist()


def describe(seed: int, split: str, index: int, n: int) -> tuple[dict, Style, np.random.Generator]:
  """Metadata of example ``index`` of a split of n, its style and its rng.

  The source follows the index (contiguous blocks of ``split_counts``);
  categories and attributes are drawn from the per-example rng, which then
  draws the image. Test images carry one category only, so the test split
  doubles as a single-label downstream set.
  """
  bounds = np.cumsum(split_counts(n))
  source = SOURCES[int(np.searchsorted(bounds, index, side='right'))]
  rng = np.random.default_rng([seed, SPLITS[split], index])
  names = list(source.mix)
  first = names[rng.choice(len(names), p=np.array(list(source.mix.values())))]
  cats = [first]
  others = [c for c in names if c not in ('normal', first)]
  if (split == 'train' and first != 'normal' and others
      and rng.uniform() < source.pair_rate):
    cats.append(others[rng.integers(len(others))])
  noisy = rng.uniform() < source.noisy_rate
  style = source.style.degraded() if noisy else source.style
  meta = {'dataset': source.name, 'categories': cats,
          'attributes': [('noisy' if noisy else 'clean')] if source.attributes else [],
          'path': f'{source.name}/{split}/{index:06d}.png'}
  return meta, style, rng


def example(seed: int, split: str, index: int, n: int, canvas: int) -> dict:
  """Example ``index`` of a synthetic split of n images (deterministic):
  ``describe``'s metadata plus ``image``, uint8 HxWx3."""
  meta, style, rng = describe(seed, split, index, n)
  return {'image': synthetic_fundus(rng, meta['categories'], canvas, style), **meta}
