"""The label-aware contrastive loss against FLAIR's formula, and sharded ==
single-device in value and gradient on 1, 2, 4 and 8 devices."""

import collections
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from flair_jax.training import losses

B, D = 24, 13
LOGIT_SCALE = math.log(1 / 0.07)  # FLAIR's initial value.
MESH_SIZES = (1, 2, 4, 8)


def _unit(rng, shape):
  x = rng.standard_normal(shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


CATEGORIES = {
    'repeated': np.random.RandomState(1).randint(1, 5, B),
    'one_category': np.full(B, 7),
    'all_distinct': np.random.RandomState(2).permutation(B),  # 0 included.
    'no_category_id_0': np.array([0, 3, 0, 1, 0, 0, 2, 3] * 3),
}


@pytest.fixture(scope='module')
def embeddings():
  rng = np.random.default_rng(0)
  return _unit(rng, (B, D)), _unit(rng, (B, D))


def numpy_flair_loss(img_bd, txt_bd, logit_scale, categories):
  """FLAIR's train_epoch + softce_clip_loss, transcribed in float64 NumPy."""
  img, txt = img_bd.astype(np.float64), txt_bd.astype(np.float64)
  cooc = np.array([[a == b for a in categories] for b in categories], np.float64)
  target = cooc / cooc.sum(-1)  # FLAIR's broadcasting: column j / count(c_j).
  logits_per_text = (txt @ img.T) * np.exp(logit_scale)

  def soft_ce(pred, ref):
    log_p = pred - pred.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    return np.mean(-(ref * log_p).sum(1))

  return (soft_ce(logits_per_text, target) + soft_ce(logits_per_text.T, target)) / 2


_jitted_loss = jax.jit(losses.label_aware_contrastive_loss, static_argnames='positives')


def _mesh(n):
  return jax.make_mesh((n,), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:n])


def _grad_fn(loss_fn):
  return jax.value_and_grad(loss_fn, argnums=(0, 1, 2))


@pytest.fixture(scope='module')
def reference_grad():
  return jax.jit(_grad_fn(losses.label_aware_contrastive_loss))


TRACES = collections.Counter()


@functools.lru_cache(maxsize=None)
def _sharded_grad(n, positives='auto'):
  """One compiled value-and-grad per mesh size, inputs sharded on 'data'."""
  mesh = _mesh(n)
  batch, rep = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  loss_fn = losses.sharded_label_aware_contrastive_loss(mesh, positives=positives)

  def counted(*args):
    TRACES[n, positives] += 1
    return loss_fn(*args)

  fn = jax.jit(_grad_fn(counted), in_shardings=(batch, batch, rep, batch))
  return mesh, fn


def _place(mesh, img, txt, cat):
  batch = NamedSharding(mesh, P('data'))
  return (jax.device_put(img, batch), jax.device_put(txt, batch),
          jnp.asarray(LOGIT_SCALE, jnp.float32),
          jax.device_put(jnp.asarray(cat, jnp.int32), batch))


@pytest.mark.parametrize('positives', losses.POSITIVES)
@pytest.mark.parametrize('case', sorted(CATEGORIES))
def test_reference_matches_numpy_flair_formula(embeddings, case, positives):
  img, txt = embeddings
  got = _jitted_loss(img, txt, jnp.float32(LOGIT_SCALE),
                     jnp.asarray(CATEGORIES[case], jnp.int32), positives=positives)
  want = numpy_flair_loss(img, txt, np.float32(LOGIT_SCALE), CATEGORIES[case])
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_reference_gradients_match_torch_cross_entropy(embeddings, reference_grad):
  torch = pytest.importorskip('torch')
  img, txt = embeddings
  cat = CATEGORIES['no_category_id_0']
  img_t = torch.tensor(img, requires_grad=True)
  txt_t = torch.tensor(txt, requires_grad=True)
  scale_t = torch.tensor(np.float32(LOGIT_SCALE), requires_grad=True)
  cooc = np.array([[a == b for a in cat] for b in cat], np.float32)
  target = torch.tensor(cooc / cooc.sum(-1))
  logits_per_text = torch.matmul(txt_t, img_t.t()) * scale_t.exp()
  ce = torch.nn.functional.cross_entropy
  loss_t = (ce(logits_per_text, target) + ce(logits_per_text.t(), target)) / 2
  loss_t.backward()
  value, grads = reference_grad(img, txt, jnp.float32(LOGIT_SCALE), jnp.asarray(cat, jnp.int32))
  np.testing.assert_allclose(float(value), loss_t.item(), rtol=1e-6)
  for got, want in zip(grads, (img_t.grad, txt_t.grad, scale_t.grad)):
    np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-5, atol=1e-7)


def test_id_0_is_an_ordinary_label(embeddings):
  img, txt = embeddings
  loss = functools.partial(_jitted_loss, img, txt, jnp.float32(LOGIT_SCALE))
  cat = CATEGORIES['no_category_id_0']
  relabelled = np.where(cat == 0, 99, cat)
  each_own = np.where(cat == 0, 100 + np.arange(B), cat)  # 0s NOT positives of each other.
  with_0 = float(loss(jnp.asarray(cat, jnp.int32)))
  np.testing.assert_allclose(with_0, float(loss(jnp.asarray(relabelled, jnp.int32))), rtol=1e-6)
  assert abs(with_0 - float(loss(jnp.asarray(each_own, jnp.int32)))) > 1e-2


@pytest.mark.parametrize('positives', ['mask', 'segment'])
@pytest.mark.parametrize('n', MESH_SIZES)
def test_sharded_equals_reference_in_value_and_gradient(embeddings, reference_grad, n, positives):
  img, txt = embeddings
  mesh, sharded_grad = _sharded_grad(n, positives)
  for case, cat in sorted(CATEGORIES.items()):
    args = _place(mesh, img, txt, cat)
    value, grads = sharded_grad(*args)
    want_value, want_grads = reference_grad(img, txt, args[2], jnp.asarray(cat, jnp.int32))
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-6, atol=1e-6, err_msg=case)
    for name, got, want in zip(('img', 'txt', 'logit_scale'), grads, want_grads):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6,
                                 err_msg=f'{case}: d loss / d {name}')
    assert grads[0].sharding.is_equivalent_to(NamedSharding(mesh, P('data')), 2)
  assert TRACES[n, positives] == 1  # compiled once for all the category cases


@pytest.mark.parametrize('positives', ['mask', 'segment'])
def test_bfloat16_embeddings_give_float32_loss_close_to_float32(embeddings, positives):
  img, txt = (x.astype(jnp.bfloat16) for x in embeddings)
  mesh = _mesh(8)
  loss_fn = jax.jit(losses.sharded_label_aware_contrastive_loss(mesh, positives=positives))
  cat = jnp.asarray(CATEGORIES['repeated'], jnp.int32)
  got = loss_fn(img, txt, jnp.float32(LOGIT_SCALE), cat)
  assert got.dtype == jnp.float32
  # bf16 products are exact in float32, so the loss is that of the upcast inputs.
  want = numpy_flair_loss(np.asarray(img, np.float32), np.asarray(txt, np.float32),
                          np.float32(LOGIT_SCALE), CATEGORIES['repeated'])
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(img, txt, jnp.float32(LOGIT_SCALE), cat)
  assert all(g.dtype == jnp.bfloat16 for g in grads)


def test_sharded_loss_gathers_and_never_forms_the_full_logits(embeddings):
  img, txt = embeddings
  mesh, sharded_grad = _sharded_grad(8)
  hlo = sharded_grad.lower(*_place(mesh, img, txt, CATEGORIES['repeated'])).compile().as_text()
  assert 'all-gather' in hlo
  assert f'f32[{B // 8},{B}]' in hlo  # this device's block of logits
  assert not re.search(rf'\[{B},{B}\]', hlo)


def test_batch_not_divisible_by_devices_is_refused(embeddings):
  img, txt = embeddings
  loss_fn = losses.sharded_label_aware_contrastive_loss(_mesh(8))
  with pytest.raises(ValueError, match='not a multiple of the 8 devices'):
    loss_fn(img[:20], txt[:20], jnp.float32(1.0), jnp.zeros(20, jnp.int32))


def test_sharded_over_two_mesh_axes_equals_reference(embeddings):
  img, txt = embeddings
  mesh = jax.make_mesh((4, 2), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  loss_fn = jax.jit(losses.sharded_label_aware_contrastive_loss(mesh, axis=('data', 'fsdp')))
  cat = jnp.asarray(CATEGORIES['repeated'], jnp.int32)
  got = loss_fn(img, txt, jnp.float32(LOGIT_SCALE), cat)
  want = _jitted_loss(img, txt, jnp.float32(LOGIT_SCALE), cat)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
