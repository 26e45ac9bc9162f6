"""FLAIR's schedule against the chainable recursion; clip + AdamW against torch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from flair_jax.training import optim

BASE_LR = 1e-4


def chainable_flair_lrs(base_lr, steps_per_epoch, n_steps, warmup_epochs=1, horizon_epochs=100):
  """Rates of iterations 0..n_steps-1 by FLAIR_SPEC's chainable recursion, float64.

  The scheduler is stepped once at construction and once after every
  iteration, so iteration t trains with the value after t further steps.
  """
  w, m = warmup_epochs * steps_per_epoch, horizon_epochs * steps_per_epoch
  start = base_lr / w
  lrs, lr = [], None
  for t in range(n_steps):
    if t == 0:
      lr = start
    elif t < w:
      lr = lr + (base_lr - start) / (w - 1)
    elif t == w:
      lr = base_lr
    elif (t - 1 - m) % (2 * (m - w)) == 0:
      lr = lr + base_lr * (1 - math.cos(math.pi / (m - w))) / 2
    else:
      lr = ((1 + math.cos(math.pi * (t - w) / (m - w)))
            / (1 + math.cos(math.pi * (t - w - 1) / (m - w))) * lr)
    lrs.append(lr)
  return np.array(lrs)


@pytest.mark.parametrize('steps_per_epoch', [1, 2, 7, 50])
def test_flair_lr_matches_chainable_recursion_for_three_epochs(steps_per_epoch):
  n = 3 * steps_per_epoch
  want = chainable_flair_lrs(BASE_LR, steps_per_epoch, n)
  steps = np.arange(n)
  exact = optim.flair_lr(steps, BASE_LR, steps_per_epoch)
  np.testing.assert_allclose(exact, want, rtol=1e-9, atol=0)
  jitted = jax.jit(jax.vmap(optim.flair_schedule(BASE_LR, steps_per_epoch)))(steps)
  assert jitted.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(jitted, np.float64), want, rtol=4e-7, atol=0)
  with jax.enable_x64(True):
    schedule64 = optim.flair_schedule(BASE_LR, steps_per_epoch, dtype=jnp.float64)
    jitted64 = np.asarray(jax.jit(jax.vmap(schedule64))(jnp.arange(n)))
  np.testing.assert_allclose(jitted64, want, rtol=1e-9, atol=0)


@pytest.mark.parametrize('steps_per_epoch, warmup_epochs', [(1, 1), (2, 3)])
def test_flair_lr_matches_recursion_past_the_cosine_horizon(steps_per_epoch, warmup_epochs):
  n = 250 * steps_per_epoch  # crosses the recursion's special case at t = M + 1.
  want = chainable_flair_lrs(BASE_LR, steps_per_epoch, n, warmup_epochs)
  exact = optim.flair_lr(np.arange(n), BASE_LR, steps_per_epoch, warmup_epochs)
  np.testing.assert_allclose(exact, want, rtol=0, atol=1e-9 * BASE_LR)
  jitted = jax.jit(jax.vmap(optim.flair_schedule(BASE_LR, steps_per_epoch, warmup_epochs)))(
      jnp.arange(n))
  np.testing.assert_allclose(np.asarray(jitted, np.float64), want, rtol=0, atol=4e-7 * BASE_LR)


def test_flair_schedule_refuses_zero_warmup():
  with pytest.raises(ValueError, match='warm-up must be a whole number >= 1'):
    optim.flair_schedule(BASE_LR, steps_per_epoch=10, warmup_epochs=0)


def test_warmup_cosine_schedule_end_points():
  schedule = optim.warmup_cosine_schedule(1.0, warmup_steps=4, total_steps=24)
  np.testing.assert_allclose([schedule(0), schedule(2), schedule(4), schedule(14), schedule(24)],
                             [0.25, 0.625, 1.0, 0.5, 0.0], atol=1e-6)


def _torch_adamw_run(params_np, grads_np, lrs, wd, clip):
  torch = pytest.importorskip('torch')
  params = [torch.tensor(p, requires_grad=True) for p in params_np]
  opt = torch.optim.AdamW(params, lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
  for lr, grads in zip(lrs, grads_np):
    for g in opt.param_groups:
      g['lr'] = float(lr)
    for p, g in zip(params, grads):
      p.grad = torch.tensor(g)
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
  return [p.detach().numpy() for p in params]


@pytest.mark.parametrize('grad_scale', [10.0, 0.01])  # clipped, and not clipped
def test_make_optimizer_matches_torch_adamw_with_clipping(grad_scale):
  rng = np.random.default_rng(0)
  shapes = [(5, 3), (7,), ()]
  params_np = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  grads_np = [[grad_scale * rng.standard_normal(s).astype(np.float32) for s in shapes]
              for _ in range(3)]
  schedule = optim.flair_schedule(1e-2, steps_per_epoch=2)  # large rate: visible decay.
  lrs = optim.flair_lr(np.arange(3), 1e-2, steps_per_epoch=2)
  want = _torch_adamw_run(params_np, grads_np, lrs, wd=0.1, clip=1.0)

  tx = optim.make_optimizer(schedule, weight_decay=0.1)
  params = [jnp.asarray(p) for p in params_np]
  state = tx.init(params)
  step = jax.jit(tx.update)
  for grads in grads_np:
    updates, state = step([jnp.asarray(g) for g in grads], state, params)
    params = optax.apply_updates(params, updates)
  for got, w, p0 in zip(params, want, params_np):
    np.testing.assert_allclose(np.asarray(got), w, rtol=0, atol=1e-6)
    assert np.max(np.abs(w - p0)) > 1e-3  # the parameters did move.


def test_weight_decay_mask_and_frozen_parameters():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  no_decay = optim.tree_from_rules(params, [('.*bias', False)], default=True)
  frozen = optim.trainable_mask(params, ['kernel'])
  tx = optim.make_optimizer(1.0, weight_decay=0.5, clip_norm=None,
                            weight_decay_mask=no_decay, trainable_mask=frozen)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_array_equal(updates['kernel'][...], 0.0)  # frozen
  np.testing.assert_array_equal(updates['bias'][...], 0.0)  # zero grad, no decay
  decay_all = optim.make_optimizer(1.0, weight_decay=0.5, clip_norm=None)
  updates, _ = decay_all.update(zeros, decay_all.init(params), params)
  np.testing.assert_allclose(updates['kernel'][...], -0.5 * params['kernel'][...], rtol=1e-6)


def test_tree_from_rules_first_match_wins_and_unmatched_is_an_error():
  tree = {'vision': {'conv': {'kernel': 1}}, 'text': {'kernel': 2}}
  rules = [('vision/.*', 'v'), ('.*kernel', 'k')]
  assert optim.tree_from_rules(tree, rules) == {'vision': {'conv': {'kernel': 'v'}},
                                                'text': {'kernel': 'k'}}
  with pytest.raises(ValueError, match="'text/kernel' matches none of the rules"):
    optim.tree_from_rules(tree, [('vision/.*', 0)])
