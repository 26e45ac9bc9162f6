"""Synthetic fundus images: determinism, category mix per source, and that
each finding changes the pixels the way its clinical look says."""

import numpy as np
import pytest

from data_pipelines import synthetic

NO_NOISE = synthetic.Style(noise=0.0)


def test_same_seed_same_image_other_seed_other_image():
  a = synthetic.example(3, 'train', 17, 100, 48)
  b = synthetic.example(3, 'train', 17, 100, 48)
  c = synthetic.example(4, 'train', 17, 100, 48)
  np.testing.assert_array_equal(a['image'], b['image'])
  assert {k: a[k] for k in a if k != 'image'} == {k: b[k] for k in b if k != 'image'}
  assert np.abs(a['image'].astype(int) - c['image']).mean() > 1


@pytest.mark.parametrize('size', [31, 96, 200])
def test_shape_follows_canvas_and_aspect(size):
  for source in synthetic.SOURCES:
    img = synthetic.synthetic_fundus(np.random.default_rng(0), 'normal', size, source.style)
    assert img.dtype == np.uint8 and img.shape[2] == 3
    assert max(img.shape[:2]) == size
    assert img.shape[0] == max(1, round(size * source.style.aspect))
    assert img[0, 0].max() == 0 and img[-1, -1].max() == 0  # Black corners.


def test_source_sizes_and_category_mix():
  n = 3000
  counts = synthetic.split_counts(n)
  assert sum(counts) == n and counts == [1200, 750, 600, 450]
  metas = [synthetic.describe(0, 'train', i, n)[0] for i in range(n)]
  start = 0
  for source, count in zip(synthetic.SOURCES, counts):
    block = metas[start:start + count]
    start += count
    assert {m['dataset'] for m in block} == {source.name}
    for name, p in source.mix.items():
      freq = np.mean([m['categories'][0] == name for m in block])
      assert abs(freq - p) < 4.5 * np.sqrt(p * (1 - p) / count), (source.name, name)
    sick = [m for m in block if m['categories'][0] != 'normal']
    pairs = np.mean([len(m['categories']) == 2 for m in sick])
    q = source.pair_rate
    assert abs(pairs - q) <= 4.5 * np.sqrt(q * (1 - q) / len(sick)) + 1e-9
    if source.attributes:
      noisy = np.mean([m['attributes'] == ['noisy'] for m in block])
      r = source.noisy_rate
      assert abs(noisy - r) < 4.5 * np.sqrt(r * (1 - r) / count)
    else:
      assert all(m['attributes'] == [] for m in block)
  assert all(len(m['categories']) == len(set(m['categories'])) for m in metas)


def test_test_split_has_one_category_per_image():
  metas = [synthetic.describe(0, 'test', i, 400)[0] for i in range(400)]
  assert all(len(m['categories']) == 1 for m in metas)
  assert {m['categories'][0] for m in metas} == set(synthetic.CATEGORIES)


def lesion_change(finding, seed, size=128):
  """Pixels a finding changes on an otherwise identical picture."""
  normal = synthetic.synthetic_fundus(np.random.default_rng(seed), 'normal', size, NO_NOISE)
  sick = synthetic.synthetic_fundus(np.random.default_rng(seed), finding, size, NO_NOISE)
  diff = sick.astype(float) - normal
  changed = (np.abs(diff) > 8).any(-1)
  return changed, diff[changed].mean(0), sick[changed].mean(0)


@pytest.mark.parametrize('seed', [0, 1])
def test_findings_change_colour_in_the_clinical_direction(seed):
  ma, ma_diff, ma_colour = lesion_change('microaneurysms', seed)
  assert ma.sum() > 20 and (ma_diff < 0).all()  # Small dark red dots.
  assert ma_colour[0] > 2 * ma_colour[1]
  he, he_diff, _ = lesion_change('haemorrhages', seed)
  assert he.sum() > 1.5 * ma.sum() and (he_diff < 0).all()  # Larger dark blots.
  assert he_diff[0] < ma_diff[0]
  ex, ex_diff, _ = lesion_change('hard exudates', seed)
  assert ex.sum() > 20 and ex_diff[1] > 50 and ex_diff[0] > 0  # Yellow:
  assert abs(ex_diff[2]) < 0.2 * ex_diff[1]  # green and red up, blue not.
  dr, dr_diff, _ = lesion_change('drusens', seed)
  assert dr.sum() > 20 and dr_diff[1] > 40 and dr_diff[2] > 0.8 * dr_diff[1]  # Whitish.
  gl, gl_diff, _ = lesion_change('glaucoma', seed)
  rows, cols = np.flatnonzero(gl.any(1)), np.flatnonzero(gl.any(0))
  assert (gl_diff > 0).all()  # A larger, paler cup ...
  assert rows[-1] - rows[0] < 32 and cols[-1] - cols[0] < 32  # ... in the disc only.


def test_two_findings_show_both():
  both = synthetic.synthetic_fundus(np.random.default_rng(5), ['hard exudates', 'drusens'],
                                    96, NO_NOISE).astype(float)
  normal = synthetic.synthetic_fundus(np.random.default_rng(5), 'normal', 96, NO_NOISE)
  diff = both - normal
  yellow = (diff[..., 1] > 40) & (diff[..., 2] < 10)
  white = (diff[..., 1] > 30) & (diff[..., 2] > 30)
  assert yellow.sum() > 10 and white.sum() > 10


def test_unknown_category_is_refused():
  with pytest.raises(ValueError, match='cannot draw'):
    synthetic.synthetic_fundus(np.random.default_rng(0), 'cataract', 32)
