"""Few-shot adapters of FLAIR's follow-up work, on frozen image embeddings.

All take the projected image embeddings ``x [N, D]`` of the support set
(normalised here again, so any scale works), their labels and the class
prototypes ``text [C, D]`` of ``compute_text_embeddings``; none uses a
validation set.

- ZS-LP and CLAP (Silva-Rodríguez et al., CVPR 2024, code jusiro/CLAP): a
  linear probe whose class weights ``w [C, D]`` start at the prototypes,
  logits ``exp(logit_scale) cos(x, w_c)``. Trained as CLAP's feature-level
  recipe: SGD (momentum 0.9, no weight decay), batches of 256 reshuffled
  every epoch, 300 epochs, one warm-up epoch at 1e-5 then a cosine from 0.1
  (Dassl's constant warm-up). CLAP adds ``mean_c lambda_c ||w_c - t_c||^2``,
  ``lambda_c`` the mean zero-shot probability of class ``c`` on its support
  samples (a class without samples takes the mean of the others, as
  jusiro/SS-Text does); ``clap-phr`` also updates ``lambda`` after every
  epoch by CLAP's augmented-Lagrangian (PHR) step (with few classes and
  FLAIR's temperature of 100 the multipliers can grow past SGD's stable step
  and the weights diverge; that fit is refused).
- SS-Text / SS-Text+ (jusiro/SS-Text, training-free): ``w_c = t_c + (1 / (N
  lambda_c)) sum_{i in c} x_i / tau`` with ``tau = 1 / exp(logit_scale)``,
  ``lambda_c = 1 / N`` (SS-Text) or ``1 / n_c`` (SS-Text+), both clamped
  below at 1e-3 as the reference does; SS-Text+ then repels the classes:
  ``w_c -= normalise(2 w_c - mean_k w_k)``. Scored like the probe above.
- LP++ (Huang et al., CVPR 2024, code FereshteShakeri/FewShot-CLIP-Strong-
  Baseline): ``logits = W x + b + alpha * (x T^T)`` (no temperature), ``W``
  at the class SUMS of the support embeddings (their "centroids"), ``b`` as
  torch's ``nn.Linear`` draws it, full-batch SGD (momentum 0.9) on ``W, b``
  at ``4 N / lambda_max(X^T X)`` for 300 epochs, ``alpha [C]`` at ``250``
  times the mean class-mean text similarity and stepped every 10 epochs at
  ``N / (4 max_c sum_i (x_i t_c)^2)`` along its gradient summed over all
  epochs so far (the reference never zeroes it). The final epoch is kept
  (the reference picks the best on validation; there is none here).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

LP_EPOCHS = 300
LP_LR = 0.1
LP_BATCH = 256
LP_WARMUP_LR = 1e-5
MOMENTUM = 0.9
SS_LAMBDA_MIN = 1e-3
LPPP_EPOCHS = 300
LPPP_ALPHA_EVERY = 10
LPPP_ALPHA_INIT = 250.0
PENALTIES = ('none', 'clap', 'clap-phr')


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _np_unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def probe_logits(w_cd, x_nd, logit_scale):
  """``exp(logit_scale) cos(x, w_c)``: the probe of ZS-LP, CLAP and SS-Text."""
  return jnp.exp(logit_scale) * _unit(x_nd) @ _unit(w_cd).T


def predict_probe(w_cd, x_nd, logit_scale) -> np.ndarray:
  return np.asarray(jax.nn.softmax(probe_logits(
      jnp.asarray(w_cd, jnp.float32), jnp.asarray(x_nd, jnp.float32), logit_scale), -1))


def lp_learning_rates(epochs: int = LP_EPOCHS, lr: float = LP_LR) -> np.ndarray:
  """Per-epoch learning rate: 1e-5 for epoch 0, then a cosine from ``lr``.

  Dassl's constant warm-up hands over to a cosine of ``epochs`` periods that
  starts one epoch late, so epoch ``e >= 1`` runs at ``lr (1 + cos(pi (e -
  1) / epochs)) / 2``.
  """
  e = np.arange(epochs, dtype=np.float64)
  rates = lr * 0.5 * (1 + np.cos(np.pi * (e - 1) / epochs))
  rates[0] = LP_WARMUP_LR
  return rates.astype(np.float32)


def clap_multipliers(x_nd, y_n, text_cd, logit_scale, num_classes: int) -> np.ndarray:
  """CLAP's initial ``lambda [C]``: each class's mean zero-shot probability of
  itself over its support samples; a class without samples gets the mean of
  the others."""
  probs = predict_probe(text_cd, x_nd, logit_scale).astype(np.float64)
  onehot = np.eye(num_classes)[np.asarray(y_n)]
  counts = onehot.sum(0)
  with np.errstate(invalid='ignore', divide='ignore'):
    perf = (onehot * probs).sum(0) / counts
  perf[counts == 0] = perf[counts > 0].mean()
  return perf.astype(np.float32)


def epoch_batches(n: int, epochs: int, batch_size: int, seed: int = 0, orders=None):
  """``(indices [E, B_n, B], mask [E, B_n, B])``: each epoch's shuffled
  batches, the last one padded (mask 0)."""
  if orders is None:
    rng = np.random.default_rng(seed)
    orders = np.stack([rng.permutation(n) for _ in range(epochs)])
  orders = np.asarray(orders, np.int32).reshape(epochs, n)
  num_batches = -(-n // batch_size)
  padded = np.zeros((epochs, num_batches * batch_size), np.int32)
  mask = np.zeros(padded.shape, np.float32)
  padded[:, :n], mask[:, :n] = orders, 1
  shape = (epochs, num_batches, batch_size)
  return padded.reshape(shape), mask.reshape(shape)


@jax.jit
def _train_probe(w_cd, x_nd, y_n, text_cd, logit_scale, lam_c, phr, idx_ebb, mask_ebb, lr_e):
  # One program for the three variants: ZS-LP is CLAP with lambda = 0 (and
  # no PHR step, which would raise it).

  def loss_fn(w, lam, idx, mask):
    ce = optax.softmax_cross_entropy_with_integer_labels(
        probe_logits(w, x_nd[idx], logit_scale), y_n[idx])
    return jnp.sum(mask * ce) / jnp.sum(mask) + jnp.mean(lam * jnp.sum((w - text_cd) ** 2, -1))

  def epoch(carry, inputs):
    w, buf, lam, rho = carry
    idx_bb, mask_bb, lr = inputs

    def step(c, batch):
      w, buf = c
      loss, g = jax.value_and_grad(loss_fn)(w, lam, *batch)
      buf = MOMENTUM * buf + g  # torch SGD: the first step's buffer is the gradient
      return (w - lr * buf, buf), loss

    (w, buf), losses = jax.lax.scan(step, (w, buf), (idx_bb, mask_bb))
    # PHR outer step: lambda <- max(0, lambda + rho h), rho <- h, with h the
    # current squared distances to the prototypes (CLAP's outer_step).
    h = jnp.sum((w - text_cd) ** 2, -1)
    x = lam + rho * h
    lam, rho = jnp.where(phr, jnp.where(x >= 0, x, 0.0), lam), jnp.where(phr, h, rho)
    return (w, buf, lam, rho), losses

  init = (w_cd, jnp.zeros_like(w_cd), lam_c, jnp.zeros_like(lam_c))
  (w, _, lam, _), losses = jax.lax.scan(epoch, init, (idx_ebb, mask_ebb, lr_e))
  return w, lam, losses.reshape(-1)


def fit_probe(x_nd, y_n, text_cd, logit_scale, num_classes: int, *, penalty: str = 'none',
              epochs: int = LP_EPOCHS, lr: float = LP_LR, batch_size: int = LP_BATCH,
              seed: int = 0, orders=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """ZS-LP (``penalty='none'``), CLAP (``'clap'``) or CLAP with PHR updates.

  Args:
    orders: ``[epochs, N]`` sample order of each epoch (default: drawn from
      ``seed``).
  Returns:
    ``(w [C, D], final lambda [C], per-step losses)``.
  """
  if penalty not in PENALTIES:
    raise ValueError(f'penalty {penalty!r} unknown; expected one of {PENALTIES}')
  x_nd = _unit(jnp.asarray(x_nd, jnp.float32))
  text_cd = jnp.asarray(text_cd, jnp.float32)
  lam = (clap_multipliers(x_nd, y_n, text_cd, logit_scale, num_classes) if penalty != 'none'
         else np.zeros(num_classes, np.float32))
  idx, mask = epoch_batches(x_nd.shape[0], epochs, batch_size, seed, orders)
  w, lam, losses = _train_probe(
      text_cd, x_nd, jnp.asarray(y_n, jnp.int32), text_cd, jnp.float32(logit_scale),
      jnp.asarray(lam), jnp.asarray(penalty == 'clap-phr'), jnp.asarray(idx), jnp.asarray(mask),
      jnp.asarray(lp_learning_rates(epochs, lr)))
  return np.asarray(w), np.asarray(lam), np.asarray(losses)


def ss_text_weights(x_nd, y_n, text_cd, logit_scale, num_classes: int, *,
                    plus: bool = False) -> np.ndarray:
  """SS-Text's closed-form class weights ``[C, D]`` (float64); ``plus``:
  SS-Text+ (``lambda_c = 1 / n_c`` and the repel step)."""
  x_nd, text_cd = _np_unit(x_nd), np.asarray(text_cd, np.float64)
  onehot = np.eye(num_classes)[np.asarray(y_n)]
  n = x_nd.shape[0]
  vision_cd = onehot.T @ x_nd * np.exp(np.float64(logit_scale))  # sum_i x_i / tau
  counts = onehot.sum(0) if plus else np.full(num_classes, float(n))
  # (1 / N) / max(lambda, 1e-3) with lambda = 1 / count; a class without
  # samples (lambda infinite) adds nothing.
  coef_c = np.minimum(counts, 1 / SS_LAMBDA_MIN) / n
  w = text_cd + coef_c[:, None] * vision_cd
  if plus:
    delta = 2 * w - w.mean(0)
    w = w - delta / np.linalg.norm(delta, axis=-1, keepdims=True)
  return w


def lp_pp_init(x_nd, y_n, text_cd, num_classes: int, seed: int = 0) -> dict:
  """LP++'s start: ``W`` (class sums), ``b`` (torch ``nn.Linear`` draw),
  ``alpha``, and the two learning rates (float64 closed forms)."""
  x, t = _np_unit(x_nd), _np_unit(text_cd)
  onehot = np.eye(num_classes)[np.asarray(y_n)]
  n, d = x.shape
  xt_nc = x @ t.T
  counts = np.maximum(onehot.sum(0), 1)
  alpha_tilde = onehot.T @ xt_nc / counts[:, None]  # class means of x t_k; absent: 0
  bound = 1 / np.sqrt(d)
  bias = np.random.default_rng(seed).uniform(-bound, bound, num_classes)
  return {'w': onehot.T @ x, 'b': bias,
          'alpha': np.full(num_classes, LPPP_ALPHA_INIT * alpha_tilde.mean()),
          'lr_w': 4 * n / np.linalg.eigvalsh(x.T @ x).max(),
          'lr_alpha': n / (4 * np.max(np.sum(xt_nc ** 2, 0)))}


def lp_pp_logits(params, x_nd, text_cd):
  x, t = _unit(x_nd), _unit(text_cd)
  return x @ params['w'].T + params['b'] + params['alpha'] * (x @ t.T)


@functools.partial(jax.jit, static_argnames=('epochs',))
def _train_lp_pp(params, x_nd, y_n, text_cd, lr_w, lr_alpha, *, epochs):

  def loss_fn(p):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        lp_pp_logits(p, x_nd, text_cd), y_n))

  def epoch(carry, e):
    p, buf, alpha_grad = carry
    loss, g = jax.value_and_grad(loss_fn)(p)
    buf = {k: MOMENTUM * buf[k] + g[k] for k in ('w', 'b')}
    alpha_grad = alpha_grad + g['alpha']  # accumulates: never zeroed
    alpha = jnp.where((e + 1) % LPPP_ALPHA_EVERY == 0, p['alpha'] - lr_alpha * alpha_grad,
                      p['alpha'])
    p = {'w': p['w'] - lr_w * buf['w'], 'b': p['b'] - lr_w * buf['b'], 'alpha': alpha}
    return (p, buf, alpha_grad), loss

  buf = {'w': jnp.zeros_like(params['w']), 'b': jnp.zeros_like(params['b'])}
  (params, _, _), losses = jax.lax.scan(epoch, (params, buf, jnp.zeros_like(params['alpha'])),
                                        jnp.arange(epochs))
  return params, losses


def fit_lp_pp(x_nd, y_n, text_cd, num_classes: int, *, epochs: int = LPPP_EPOCHS,
              seed: int = 0, init: Optional[dict] = None) -> tuple[dict, np.ndarray]:
  """Trains LP++; returns ``(params {'w', 'b', 'alpha'}, per-epoch losses)``."""
  init = init or lp_pp_init(x_nd, y_n, text_cd, num_classes, seed)
  params = {k: jnp.asarray(init[k], jnp.float32) for k in ('w', 'b', 'alpha')}
  params, losses = _train_lp_pp(
      params, jnp.asarray(x_nd, jnp.float32), jnp.asarray(y_n, jnp.int32),
      jnp.asarray(text_cd, jnp.float32), jnp.float32(init['lr_w']),
      jnp.float32(init['lr_alpha']), epochs=epochs)
  return {k: np.asarray(v) for k, v in params.items()}, np.asarray(losses)


def predict_lp_pp(params, x_nd, text_cd) -> np.ndarray:
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  return np.asarray(jax.nn.softmax(lp_pp_logits(
      params, jnp.asarray(x_nd, jnp.float32), jnp.asarray(text_cd, jnp.float32)), -1))


METHODS = ('zs-lp', 'clap', 'clap-phr', 'ss-text', 'ss-text+', 'lp++')


def fit_predict(method: str, x_train, y_train, x_test, text_cd, logit_scale, num_classes: int,
                *, seed: int = 0) -> np.ndarray:
  """Adapts ``method`` on a support set; class probabilities ``[M, C]`` of ``x_test``."""
  if method in ('zs-lp', 'clap', 'clap-phr'):
    w, _, _ = fit_probe(x_train, y_train, text_cd, logit_scale, num_classes,
                        penalty={'zs-lp': 'none'}.get(method, method), seed=seed)
    if not np.all(np.isfinite(w)):
      # CLAP's mean over classes makes each class's penalty C times weaker
      # with 1000 classes than with a handful; here the PHR multipliers can
      # outgrow the step that SGD at lr 0.1 keeps stable.
      raise ValueError(f'{method} diverged (class weights not finite after {LP_EPOCHS} epochs); '
                       'its multiplier updates outgrew the SGD step, use clap')
    return predict_probe(w, x_test, logit_scale)
  if method in ('ss-text', 'ss-text+'):
    w = ss_text_weights(x_train, y_train, text_cd, logit_scale, num_classes,
                        plus=method == 'ss-text+')
    return predict_probe(w, x_test, logit_scale)
  if method == 'lp++':
    params, _ = fit_lp_pp(x_train, y_train, text_cd, num_classes, seed=seed)
    return predict_lp_pp(params, x_test, text_cd)
  raise ValueError(f'few-shot method {method!r} unknown; expected one of {METHODS}')
