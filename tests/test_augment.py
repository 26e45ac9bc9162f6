"""On-device augmentation against closed forms (exact flips, rotations, scalings, jitter)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flair_jax.training import augment as aug

B, H, W = 5, 11, 13  # odd, unequal sides so a transposed axis cannot pass


apply_params = jax.jit(aug.apply_params)
warp = jax.jit(aug.affine_warp)


def _params(b, **draws):
  """Neutral per-sample parameters (nothing applied), with ``draws`` overriding."""
  params = aug.AugmentParams(
      flip=np.zeros(b, bool), affine=np.zeros(b, bool), angle_deg=np.zeros(b, np.float32),
      scale=np.ones(b, np.float32), jitter=np.zeros(b, bool), brightness=np.ones(b, np.float32),
      contrast=np.ones(b, np.float32), contrast_first=np.zeros(b, bool))
  return params._replace(**{k: np.asarray(v) for k, v in draws.items()})


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).random((B, H, W, 3)).astype(np.float32)


def test_flip_is_exact_per_sample_and_no_op_is_identity(images):
  flip = np.array([True, False, True, False, False])
  out = np.asarray(apply_params(images, _params(B, flip=flip)))
  np.testing.assert_array_equal(out[flip], images[flip][:, :, ::-1])
  np.testing.assert_array_equal(out[~flip], images[~flip])
  np.testing.assert_array_equal(np.asarray(apply_params(images, _params(B))), images)


def test_identity_affine_and_unit_jitter_are_identity(images):
  selected = np.ones(B, bool)
  out = np.asarray(apply_params(images, _params(B, affine=selected, jitter=selected)))
  np.testing.assert_array_equal(out, images)


def test_quarter_turn_is_rot90_counter_clockwise():
  x = np.random.default_rng(1).random((2, 9, 9, 3)).astype(np.float32)
  out = np.asarray(warp(jnp.asarray(x), jnp.array([90.0, -90.0]), jnp.ones(2)))
  np.testing.assert_allclose(out[0], np.rot90(x[0], 1), atol=1e-5)
  np.testing.assert_allclose(out[1], np.rot90(x[1], -1), atol=1e-5)


def test_scale_shrinks_about_the_centre_with_zero_fill():
  # Scale 1/2 about pixel centre 4 of a 9-wide image: out[4 + d] = in[4 + 2 d], 0 beyond.
  x = np.random.default_rng(2).random((1, 9, 9, 1)).astype(np.float32) + 1.0
  out = np.asarray(warp(jnp.asarray(x), jnp.zeros(1), jnp.full(1, 0.5)))[0, ..., 0]
  expected = np.zeros((9, 9), np.float32)
  for dy in range(-2, 3):
    for dx in range(-2, 3):
      expected[4 + dy, 4 + dx] = x[0, 4 + 2 * dy, 4 + 2 * dx, 0]
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_bilinear_half_pixel_rotation_interpolates():
  # A rotation of 180 degrees maps pixel centres to pixel centres: exact reversal.
  x = np.random.default_rng(3).random((1, H, W, 3)).astype(np.float32)
  out = np.asarray(warp(jnp.asarray(x), jnp.full(1, 180.0), jnp.ones(1)))
  np.testing.assert_allclose(out[0], x[0, ::-1, ::-1], atol=1e-5)


def _grey(x):
  return x @ np.asarray(aug.GREY_WEIGHTS, np.float32)


def test_brightness_scales_mean_and_contrast_scales_grey_spread():
  rng = np.random.default_rng(4)
  x = (0.3 + 0.4 * rng.random((3, H, W, 3))).astype(np.float32)  # no clipping at factors 0.8-1.2
  factors = np.array([0.8, 1.0, 1.2], np.float32)
  bright = np.asarray(aug.adjust_brightness(jnp.asarray(x), jnp.asarray(factors)))
  np.testing.assert_allclose(bright.mean(axis=(1, 2, 3)), factors * x.mean(axis=(1, 2, 3)),
                             rtol=1e-5)
  contrast = np.asarray(aug.adjust_contrast(jnp.asarray(x), jnp.asarray(factors)))
  grey_in, grey_out = _grey(x), _grey(contrast)
  np.testing.assert_allclose(grey_out.mean(axis=(1, 2)), grey_in.mean(axis=(1, 2)), rtol=1e-5)
  np.testing.assert_allclose(grey_out.std(axis=(1, 2)), factors * grey_in.std(axis=(1, 2)),
                             rtol=1e-4)
  mean = grey_in.mean(axis=(1, 2))[:, None, None, None]
  np.testing.assert_allclose(contrast, factors[:, None, None, None] * (x - mean) + mean, atol=1e-6)


def test_jitter_clips_to_unit_range():
  x = np.full((2, 3, 3, 3), 0.9, np.float32)
  x[1] = 0.0
  x[1, 0, 0] = 1.0
  bright = np.asarray(aug.adjust_brightness(jnp.asarray(x), jnp.full(2, 1.2)))
  np.testing.assert_array_equal(bright[0], 1.0)
  low = np.asarray(aug.adjust_contrast(jnp.asarray(x), jnp.full(2, 1.2)))[1]
  assert low.min() == 0.0 and low.max() <= 1.0


def test_parameter_draws_have_flairs_rates_and_ranges():
  n = 20000
  params = jax.device_get(aug.sample_params(jax.random.key(5), n))
  for flag, p in ((params.flip, 0.5), (params.affine, 0.25), (params.jitter, 0.25),
                  (params.contrast_first, 0.5)):
    assert abs(flag.mean() - p) < 5 * np.sqrt(p * (1 - p) / n)
  for values, low, high in ((params.angle_deg, -5, 5), (params.scale, 0.9, 1.0),
                            (params.brightness, 0.8, 1.2), (params.contrast, 0.8, 1.2)):
    assert values.min() >= low and values.max() <= high
    assert abs(values.mean() - (low + high) / 2) < 5 * (high - low) / np.sqrt(12 * n)
  # Per sample: the three decisions are independent draws.
  both = (params.flip & params.affine).mean()
  assert abs(both - 0.125) < 5 * np.sqrt(0.125 * 0.875 / n)


def test_jitted_augment_is_per_sample_and_untouched_samples_are_exact():
  images = np.random.default_rng(6).integers(0, 256, (64, 8, 8, 3), dtype=np.uint8)
  key = jax.random.key(7)
  out = np.asarray(jax.jit(aug.augment)(key, jnp.asarray(images)))
  assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
  params = jax.device_get(aug.sample_params(key, 64))
  x = images.astype(np.float32) / 255.0
  np.testing.assert_allclose(out, np.asarray(aug.apply_params(jnp.asarray(x), params)), atol=1e-6)
  untouched = ~params.flip & ~params.affine & ~params.jitter
  flipped_only = params.flip & ~params.affine & ~params.jitter
  assert untouched.any() and flipped_only.any()
  # Exact up to how XLA rounds uint8 / 255 (at most one float32 ulp).
  np.testing.assert_allclose(out[untouched], x[untouched], rtol=0, atol=1e-7)
  np.testing.assert_allclose(out[flipped_only], x[flipped_only][:, :, ::-1], rtol=0, atol=1e-7)
