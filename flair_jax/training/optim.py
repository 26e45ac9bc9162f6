"""FLAIR's optimiser: learning-rate schedules, clipping + AdamW, parameter rules.

PyTorch FLAIR steps a chainable linear-warm-up + cosine scheduler once per
iteration, after the optimiser step, so iteration ``t`` (from 0) trains with
the scheduler's value after ``t`` steps. With ``W`` warm-up and ``M`` horizon
iterations that recursion equals, in exact arithmetic,

  lr(t) = base_lr * (t + 1) / W                          for t < W,
  lr(t) = base_lr * (1 + cos(pi * (t - W) / (M - W))) / 2  for t >= W

(the warm-up starts at ``base_lr / W`` and adds ``(base_lr - base_lr / W) /
(W - 1) = base_lr / W`` per step; the cosine ratios telescope, and the
recursion's special case at ``t = M + 1 (mod 2 (M - W))`` keeps the same
closed form past the horizon). optax counts updates from 0 as well, so
``schedule(t)`` is the rate of update ``t``.
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _flair_steps(steps_per_epoch, warmup_epochs, horizon_epochs):
  warmup = warmup_epochs * steps_per_epoch
  horizon = horizon_epochs * steps_per_epoch
  if int(warmup) != warmup or warmup < 1:
    raise ValueError(f'warm-up must be a whole number >= 1 of iterations; got '
                     f'{warmup_epochs} epochs x {steps_per_epoch} steps')
  if int(horizon) != horizon or horizon <= warmup:
    raise ValueError(f'cosine horizon must be a whole number of iterations after '
                     f'the {int(warmup)} warm-up iterations; got {horizon}')
  return int(warmup), int(horizon)


def flair_lr(step, base_lr: float, steps_per_epoch: int, warmup_epochs: int = 1,
             horizon_epochs: int = 100) -> np.ndarray:
  """FLAIR's per-iteration learning rate in float64 NumPy (exact form).

  Args:
    step: iteration index (or array of them), counted from 0.
    base_lr: peak learning rate.
    steps_per_epoch: iterations per epoch.
    warmup_epochs: epochs of linear warm-up (FLAIR: 1).
    horizon_epochs: cosine horizon in epochs (FLAIR: 100, whatever the run length).
  Returns:
    float64 array shaped like ``step``.
  """
  warmup, horizon = _flair_steps(steps_per_epoch, warmup_epochs, horizon_epochs)
  t = np.asarray(step, np.float64)
  warm = base_lr * (t + 1) / warmup
  cosine = base_lr * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (horizon - warmup)))
  return np.where(t < warmup, warm, cosine)


def flair_schedule(base_lr: float, steps_per_epoch: int, warmup_epochs: int = 1,
                   horizon_epochs: int = 100, dtype=jnp.float32) -> optax.Schedule:
  """FLAIR's learning rates as a jittable optax schedule.

  Computed in ``dtype``: in float32 each value is within a few float32 ulps
  (relative 4e-7) of ``flair_lr``; with ``jax.enable_x64`` and
  ``dtype=jnp.float64`` within 1e-12. The cosine uses ``cos^2`` of the
  half angle, reduced in integers, so no cancellation near its zeros.

  Args: as ``flair_lr``; ``dtype`` of the computation and result.
  Returns:
    ``schedule(step) -> lr`` scalar of ``dtype``.
  """
  warmup, horizon = _flair_steps(steps_per_epoch, warmup_epochs, horizon_epochs)
  period = 2 * (horizon - warmup)

  def schedule(step):
    step = jnp.asarray(step)
    warm = base_lr * (step.astype(dtype) + 1) / warmup
    # (1 + cos(pi k / (M - W))) / 2 == cos(pi k / (2 (M - W)))^2, k mod period.
    k = jnp.mod(step - warmup, period).astype(dtype)
    cosine = base_lr * jnp.square(jnp.cos(jnp.pi * k / period))
    return jnp.where(step < warmup, warm, cosine).astype(dtype)

  return schedule


def warmup_cosine_schedule(base_lr: float, warmup_steps: int, total_steps: int,
                           init_lr: Optional[float] = None,
                           end_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up then cosine decay to ``end_lr`` at the end of training.

  Args:
    base_lr: peak rate, reached at ``warmup_steps``.
    warmup_steps: iterations of linear warm-up.
    total_steps: iterations of the whole run (warm-up included).
    init_lr: rate of iteration 0; defaults to ``base_lr / warmup_steps``
      as FLAIR (0 when ``warmup_steps`` is 0).
    end_lr: rate at ``total_steps``.
  """
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f'need 0 <= warmup_steps < total_steps; got {warmup_steps}, {total_steps}')
  if init_lr is None:
    init_lr = base_lr / warmup_steps if warmup_steps else 0.0
  return optax.warmup_cosine_decay_schedule(
      init_value=init_lr, peak_value=base_lr, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=end_lr)


def clip_by_global_norm_torch(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
  """``torch.nn.utils.clip_grad_norm_``: scale by ``min(1, max / (norm + eps))``."""

  def update_fn(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    factor = jnp.minimum(1.0, max_norm / (norm + eps))
    return jax.tree.map(lambda g: (g * factor).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def make_optimizer(schedule: optax.ScalarOrSchedule, *, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 1e-5,
                   clip_norm: Optional[float] = 1.0, weight_decay_mask: Any = None,
                   trainable_mask: Any = None) -> optax.GradientTransformation:
  """Global-norm clipping then AdamW, as FLAIR's ``torch.optim.AdamW``.

  torch applies ``p -= lr * wd * p`` before the Adam step with the same
  ``lr``; optax's ``-lr * (adam + wd * p)`` is the same update.

  Args:
    schedule: learning rate or ``step -> lr``.
    b1, b2, eps, weight_decay: AdamW hyper-parameters (FLAIR's defaults).
    clip_norm: global-norm bound as torch's ``clip_grad_norm_``; None: no clip.
    weight_decay_mask: bool pytree (or callable params -> pytree), True
      where decay applies; None: every parameter, as FLAIR.
    trainable_mask: bool pytree (or callable), False for frozen parameters,
      which get zero updates, no optimiser state and no share in the
      clipping norm; None: all trainable.
  """
  chain = [clip_by_global_norm_torch(clip_norm)] if clip_norm is not None else []
  chain.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                           weight_decay=weight_decay, mask=weight_decay_mask))
  tx = optax.chain(*chain)
  if trainable_mask is None:
    return tx

  def labels(params):
    mask = trainable_mask(params) if callable(trainable_mask) else trainable_mask
    return jax.tree.map(lambda m: 'train' if m else 'freeze', mask)

  return optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)


def path_name(path) -> str:
  """'/'-joined names of a pytree key path, without NNX's trailing 'value'."""
  name = jax.tree_util.keystr(tuple(path), simple=True, separator='/')
  return name[:-len('/value')] if name.endswith('/value') else name


def tree_from_rules(tree, rules: Sequence[Tuple[str, Any]], default: Any = None):
  """Per-leaf values from an ordered ``(regex, value)`` list, first full match wins.

  Leaf names are '/'-joined paths (``vision/stem/conv/kernel``).

  Raises:
    ValueError: a leaf matches no rule and ``default`` is None.
  """
  compiled = [(re.compile(pattern), value) for pattern, value in rules]

  def value_for(path, _):
    name = path_name(path)
    for pattern, value in compiled:
      if pattern.fullmatch(name):
        return value
    if default is None:
      raise ValueError(f'parameter {name!r} matches none of the rules '
                       f'{[p for p, _ in rules]} and no default was given')
    return default

  return jax.tree_util.tree_map_with_path(value_for, tree)


def trainable_mask(params, frozen_regexes: Sequence[str]):
  """Bool pytree: False for leaves whose path fully matches a frozen regex."""
  return tree_from_rules(params, [(r, False) for r in frozen_regexes], default=True)
