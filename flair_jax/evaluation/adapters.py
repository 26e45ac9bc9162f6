"""Vision-language adapters as PyTorch FLAIR defines them.

All work on projected, normalised image embeddings ``x [N, D]`` and the
class prototypes ``text [C, D]`` of ``compute_text_embeddings``; training
goes one sample at a time through a fixed shuffled order for 40 epochs with
AdamW (lr 1e-3, eps 1e-4, torch's default weight decay 0.01), as FLAIR's.

- CLIP-Adapter: ``x' = normalise(0.2 * relu(relu(x W1) W2) + 0.8 x)`` (bias-
  free, hidden D / 4), logits ``exp(logit_scale) x' text.T``; cosine decay
  over all steps.
- Tip-Adapter: keys = training embeddings, values = one-hot labels; logits
  ``100 x text.T + alpha exp(-beta (1 - x keys.T)) values`` (beta 5, alpha 1).
- Tip-Adapter-F: the keys become trainable (initialised from the training
  embeddings); during training FLAIR scores the cache term ``/ N *
  exp(logit_scale)`` and the zero-shot term with ``exp(logit_scale)``, at
  prediction without them (with 100), and so does this module. FLAIR's
  trainable keys alias the embeddings its training samples are read from,
  so a sample is its current key; that too is kept.

FLAIR's Tip-Adapter also augments the TEST images at random when predicting;
that is left out here (predictions are deterministic).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

EPOCHS = 40
LR = 1e-3
EPS = 1e-4
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default
CLIP_RATIO = 0.2
CLIP_REDUCTION = 4
TIP_ALPHA = 1.0
TIP_BETA = 5.0
TIP_CLIP_SCALE = 100.0


def _train_per_sample(loss_fn, params, order, epochs, schedule):
  """``epochs`` passes over ``order``, one AdamW step per sample.

  ``loss_fn(params, index)`` is the loss of training sample ``index``.
  """
  optimizer = optax.adamw(schedule, b1=0.9, b2=0.999, eps=EPS, weight_decay=WEIGHT_DECAY)
  steps = np.tile(np.asarray(order, np.int32), epochs)

  def step(carry, index):
    params, opt_state = carry
    loss, grads = jax.value_and_grad(loss_fn)(params, index)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def run(params, steps):
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), steps)
    return params, losses

  return run(params, jnp.asarray(steps))


def _order(n, seed):
  return np.random.default_rng(seed).permutation(n)


def _ce(logits_bc, y_b):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_bc, y_b))


def clip_adapter_init(dim: int, seed: int = 0) -> dict:
  """torch ``nn.Linear`` default init (U(+-1/sqrt(fan_in))), kernels ``[in, out]``."""
  hidden = dim // CLIP_REDUCTION
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {'w1': jax.random.uniform(k1, (dim, hidden), jnp.float32, -1, 1) / np.sqrt(dim),
          'w2': jax.random.uniform(k2, (hidden, dim), jnp.float32, -1, 1) / np.sqrt(hidden)}


def clip_adapter_features(params, x_nd):
  """The residual adapter: ``normalise(0.2 adapter(x) + 0.8 x)``."""
  residual = jax.nn.relu(jax.nn.relu(x_nd @ params['w1']) @ params['w2'])
  x = CLIP_RATIO * residual + (1 - CLIP_RATIO) * x_nd
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def clip_adapter_logits(params, x_nd, text_cd, logit_scale):
  return jnp.exp(logit_scale) * clip_adapter_features(params, x_nd) @ text_cd.T


def fit_clip_adapter(x_nd, y_n, text_cd, logit_scale, *, epochs: int = EPOCHS, seed: int = 0,
                     params: Optional[dict] = None, order=None) -> tuple[dict, np.ndarray]:
  """Trains CLIP-Adapter; returns ``(params, per-step losses)``."""
  x_nd, text_cd = jnp.asarray(x_nd, jnp.float32), jnp.asarray(text_cd, jnp.float32)
  y_n = jnp.asarray(y_n, jnp.int32)
  params = params if params is not None else clip_adapter_init(x_nd.shape[1], seed)
  order = _order(x_nd.shape[0], seed) if order is None else order
  schedule = optax.cosine_decay_schedule(LR, epochs * x_nd.shape[0])
  loss_fn = lambda p, i: _ce(
      clip_adapter_logits(p, x_nd[i][None], text_cd, logit_scale), y_n[i][None])
  params, losses = _train_per_sample(loss_fn, params, order, epochs, schedule)
  return params, np.asarray(losses)


def predict_clip_adapter(params, x_nd, text_cd, logit_scale) -> np.ndarray:
  return np.asarray(jax.nn.softmax(clip_adapter_logits(
      params, jnp.asarray(x_nd, jnp.float32), jnp.asarray(text_cd, jnp.float32), logit_scale), -1))


def tip_adapter_logits(x_nd, text_cd, keys_kd, values_kc):
  """FLAIR's prediction: ``100 x text.T + alpha exp(-beta (1 - x keys.T)) values``."""
  affinity = x_nd @ keys_kd.T
  cache = jnp.exp(-(TIP_BETA - TIP_BETA * affinity)) @ values_kc
  return TIP_CLIP_SCALE * x_nd @ text_cd.T + TIP_ALPHA * cache


def tip_cache(x_nd, y_n, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """``(keys [N, D], one-hot values [N, C])`` of the training samples."""
  return (jnp.asarray(x_nd, jnp.float32),
          jax.nn.one_hot(jnp.asarray(y_n, jnp.int32), num_classes, dtype=jnp.float32))


def fit_tip_adapter_f(x_nd, y_n, text_cd, logit_scale, num_classes: int, *,
                      epochs: int = EPOCHS, seed: int = 0, order=None
                      ) -> tuple[jax.Array, jax.Array, np.ndarray]:
  """Tip-Adapter-F: trains the keys; returns ``(keys, values, losses)``."""
  keys_kd, values_kc = tip_cache(x_nd, y_n, num_classes)
  text_cd = jnp.asarray(text_cd, jnp.float32)
  n = keys_kd.shape[0]
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))

  y_n = jnp.asarray(y_n, jnp.int32)

  def loss_fn(keys, i):
    # FLAIR's trainable keys share memory with the cache its training samples
    # are read from, so each sample is the current (updated) key, as data.
    x = jax.lax.stop_gradient(keys[i][None])
    clip = scale * x @ text_cd.T
    cache = jnp.exp(-(TIP_BETA - TIP_BETA * (x @ keys.T))) @ values_kc / n * scale
    return _ce(clip + TIP_ALPHA * cache, y_n[i][None])

  order = _order(n, seed) if order is None else order
  keys_kd, losses = _train_per_sample(loss_fn, keys_kd, order, epochs, LR)
  return keys_kd, values_kc, np.asarray(losses)


def predict_tip_adapter(x_nd, text_cd, keys_kd, values_kc) -> np.ndarray:
  return np.asarray(jax.nn.softmax(tip_adapter_logits(
      jnp.asarray(x_nd, jnp.float32), jnp.asarray(text_cd, jnp.float32), keys_kd, values_kc), -1))
