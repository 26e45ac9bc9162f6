"""Gradient accumulation: K micro-batches give the whole batch's step.

The reference is the K = 1 step (itself checked against PyTorch FLAIR in
test_step.py). With K > 1 the step sums K micro-batch gradients, so the
gradients and updates are the same sums in another order.
"""

import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from flair_jax import parallel
from flair_jax.models import BertConfig, ModelConfig, VisionConfig, build_model, layers
from flair_jax.training import step as step_lib
from tests import torch_flair
from tests.conftest import REPO, subprocess_env

# Dropout on: every row must draw the same masks in any micro-batch.
BERT = torch_flair.tiny_bert_config(num_hidden_layers=2, hidden_dropout_prob=0.1,
                                    attention_probs_dropout_prob=0.1)
GLOBAL_BATCH = 32  # 4 micro-batches of one row on each of 8 devices
IMAGE = 29

# A sum of n float32 terms, reordered, differs by at most n u of the sum of
# the terms' magnitudes (u = 2**-24). The longest reduction of the step is
# the stem's kernel gradient: GLOBAL_BATCH rows x 15 x 15 output positions;
# micro-batches only regroup it (K partial sums added). Per tensor, relative
# to its largest element: a tensor whose gradient is rounding noise (BERT's
# key biases: softmax ignores them) is held to the bound of the largest
# gradient of the model instead.
_U32 = 2.0 ** -24
RTOL = GLOBAL_BATCH * ((IMAGE + 1) // 2) ** 2 * _U32  # 4.3e-4


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 11, (GLOBAL_BATCH,)).astype(np.int32)
  ids = rng.integers(5, BERT['vocab_size'], (GLOBAL_BATCH, 77)).astype(np.int32)
  return dict(image=rng.integers(0, 256, (GLOBAL_BATCH, IMAGE, IMAGE, 3), dtype=np.uint8),
              input_ids=(ids * (np.arange(77)[None] < lengths[:, None])).astype(np.int32),
              lengths=lengths, category=rng.integers(0, 4, (GLOBAL_BATCH,)).astype(np.int32))


def _state(mesh, tx, batchnorm):
  """``(graphdef, state)``; ``batchnorm='frozen'`` runs the ResNet's
  BatchNorm in eval mode (running statistics), the towers otherwise train."""
  model = build_model(ModelConfig(bert=BertConfig.from_dict(BERT), vision=VisionConfig(
      stages=(1, 1), width=8), proj_dim=17), rngs=nnx.Rngs(0))
  graphdef, state = step_lib.create_train_state(model, tx, mesh)
  if batchnorm == 'frozen':
    model = nnx.merge(graphdef, state.params, state.batch_stats)
    for bn in layers.batchnorms(model):
      bn.use_running_average = True
    graphdef = nnx.split(model, nnx.Param, nnx.BatchStat)[0]
  return graphdef, state


def _one_step(devices, steps, batchnorm):
  """Parameters, BatchNorm statistics and metrics after one step of plain
  SGD with rate 1 (the update is minus the gradient)."""
  mesh = parallel.make_mesh(devices=jax.devices()[:devices])
  tx = optax.sgd(1.0)
  graphdef, state = _state(mesh, tx, batchnorm)
  before = jax.device_get(state.params)
  options = step_lib.StepOptions(augment=True, text_dropout=True, accumulation_steps=steps)
  train_step = step_lib.make_train_step(graphdef, tx, mesh, options=options)
  state, metrics = train_step(state, parallel.global_batch(_batch(), mesh), jax.random.key(7))
  grads = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, before,
                       jax.device_get(state.params))
  return grads, jax.device_get(state.batch_stats), jax.device_get(metrics)


@pytest.fixture(scope='module')
def whole_batch():
  if len(jax.devices()) < 8:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count=8')
  return {bn: _one_step(1, 1, bn) for bn in ('frozen', 'train')}


def _leaves(tree):
  return [(jax.tree_util.keystr(p), np.asarray(v)) for p, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.mark.parametrize('devices,steps', [(1, 2), (1, 4), (8, 2), (8, 4)])
def test_micro_batches_give_the_whole_batch_gradient_and_update(whole_batch, devices, steps):
  want_grads, want_stats, want_metrics = whole_batch['frozen']
  grads, stats, metrics = _one_step(devices, steps, 'frozen')
  scale = max(np.max(np.abs(g)) for _, g in _leaves(want_grads))
  # Recovering the gradient as before - after adds the rounding of the
  # update, u |param| (parameters here are at most ~10).
  slack = 10 * _U32
  for (name, want), (_, got) in zip(_leaves(want_grads), _leaves(grads)):
    bound = RTOL * max(np.max(np.abs(want)), RTOL * scale) + slack
    assert np.max(np.abs(got - want)) <= bound, name
  for (name, want), (_, got) in zip(_leaves(want_stats), _leaves(stats)):
    np.testing.assert_array_equal(got, want, err_msg=name)  # frozen: untouched
  for k in ('loss', 'l2_grads', 'l2_updates', 'l2_params'):
    np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=RTOL, err_msg=k)


def test_with_batchnorm_training_the_forward_pass_is_the_whole_batch(whole_batch):
  """Train-mode BatchNorm: loss and running statistics are the whole batch's;
  the gradient misses the cross-micro-batch terms through the batch
  statistics (the BatchNorm test below checks what it keeps)."""
  want_grads, want_stats, want_metrics = whole_batch['train']
  grads, stats, metrics = _one_step(8, 2, 'train')
  np.testing.assert_allclose(metrics['loss'], want_metrics['loss'], rtol=RTOL)
  for (name, want), (_, got) in zip(_leaves(want_stats), _leaves(stats)):
    # Running statistics: 0.9 r + 0.1 batch moment, sums over 32 x 15 x 15.
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6, err_msg=name)
  text = [(n, g) for n, g in zip(_leaves(want_grads), _leaves(grads)) if 'text_' in n[0]]
  for (name, want), (_, got) in text:  # the text tower has no BatchNorm
    assert np.max(np.abs(got - want)) <= RTOL * np.max(np.abs(want)) + 10 * _U32, name
  gap = np.sqrt(sum(np.sum((g - w) ** 2) for (_, w), (_, g) in zip(_leaves(want_grads),
                                                                   _leaves(grads))))
  norm = np.sqrt(sum(np.sum(w ** 2) for _, w in _leaves(want_grads)))
  print(f'train-mode BatchNorm, K=2 on 8 devices: gradient gap {gap / norm:.3g} of its norm')


def test_batchnorm_micro_batch_uses_whole_batch_moments_and_its_own_rows_gradient():
  rng = np.random.default_rng(3)
  b, c, k = 12, 5, 3
  x_bc = rng.normal(1.0, 2.0, (b, c)).astype(np.float32)
  dy_bc = rng.normal(size=(b, c)).astype(np.float32)
  gamma = rng.uniform(0.5, 1.5, c).astype(np.float32)
  bn = layers.BatchNorm(c)
  bn.scale[...] = jnp.asarray(gamma)
  record = nnx.clone(bn)
  layers.record_moments(record)
  record(jnp.asarray(x_bc))
  moments = layers.recorded_moments(record)
  np.testing.assert_allclose(moments[0][0], x_bc.mean(0), rtol=1e-6)
  np.testing.assert_allclose(moments[0][1], x_bc.var(0), rtol=1e-5)

  mean, var = x_bc.astype(np.float64).mean(0), x_bc.astype(np.float64).var(0)
  inv = 1 / np.sqrt(var + 1e-5)
  xhat = (x_bc - mean) * inv
  m = b // k
  for part in range(k):
    rows = slice(part * m, (part + 1) * m)
    micro = nnx.clone(bn)
    layers.use_moments(micro, moments, 1.0 / k)
    y, vjp = jax.vjp(lambda x: micro(x), jnp.asarray(x_bc[rows]))
    np.testing.assert_allclose(y, xhat[rows] * gamma, rtol=1e-5, atol=1e-5)  # whole-batch stats
    (dx,) = vjp(jnp.asarray(dy_bc[rows]))
    # The whole batch's BatchNorm gradient, dx_i = gamma / sigma (dy_i -
    # sum_j dy_j / B - xhat_i sum_j dy_j xhat_j / B), with j over this
    # micro-batch's rows only.
    own = dy_bc[rows].astype(np.float64)
    want = gamma * inv * (own - own.sum(0) / b - xhat[rows] * (own * xhat[rows]).sum(0) / b)
    np.testing.assert_allclose(dx, want, rtol=1e-4, atol=1e-5)


def test_a_batch_that_does_not_split_into_micro_batches_is_a_one_line_error(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'flair_jax.train', '--config',
       str(REPO / 'configs' / 'demo.py') + ':tiny', '--workdir', str(tmp_path / 'run'),
       '--config.train.accumulation_steps=3'],
      env=subprocess_env(2), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith('error: train.accumulation_steps 3'), lines[-3:]
  assert 'Traceback' not in proc.stderr
