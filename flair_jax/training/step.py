"""The training state and the jitted, device-sharded FLAIR training step.

The model is split once (``nnx.split``) into a static graph definition and
pytrees of parameters and BatchNorm statistics; ``train_step`` is a pure
function of ``(state, batch, key)``, compiled once by ``jax.jit`` with the
batch sharded on the mesh axis ``'data'``, the state replicated and donated.
BatchNorm statistics are therefore those of the global batch, as on one
PyTorch device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from flair_jax import parallel
from flair_jax.training import augment as augment_lib, losses
from flair_jax.models import LOGIT_SCALE_MAX

# Batch keys the step reads, with their per-example shapes.
BATCH_KEYS = ('image', 'input_ids', 'lengths', 'category')


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: parameters, BatchNorm statistics, optimiser."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """Static choices of the step.

  Attributes:
    augment: FLAIR's on-device augmentation (flip, affine, colour jitter).
    text_dropout: BERT dropout as in PyTorch FLAIR's train mode.
    remat: rematerialise the towers' activations in the backward pass.
  """
  augment: bool = True
  text_dropout: bool = True
  remat: bool = False


def split_model(model: nnx.Module):
  """``(graphdef, params, batch_stats)`` of a model in train mode."""
  model.train()
  return nnx.split(model, nnx.Param, nnx.BatchStat)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation,
                       mesh: Optional[Mesh] = None):
  """Splits the model once; returns ``(graphdef, state)``.

  With a mesh, the state is placed replicated on all of its devices (by a
  jitted function: on several processes ``device_put`` cannot place it).
  """
  graphdef, params, batch_stats = split_model(model)

  def init(params, batch_stats):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=batch_stats, opt_state=tx.init(params))

  if mesh is None:
    return graphdef, init(params, batch_stats)
  return graphdef, jax.jit(init, out_shardings=parallel.replicated(mesh))(params, batch_stats)


def attention_mask(lengths_b, length: int):
  """``[B, length]`` int32 mask: 1 for positions ``< lengths_b``."""
  return (jnp.arange(length)[None, :] < lengths_b[:, None]).astype(jnp.int32)


def _clamp_logit_scale(path, value):
  if path and getattr(path[0], 'key', None) == 'logit_scale':
    return jnp.clip(value, 0.0, LOGIT_SCALE_MAX)
  return value


def make_loss_fn(graphdef, mesh: Mesh, *, options: StepOptions = StepOptions(),
                 compute_dtype=jnp.float32) -> Callable:
  """``loss_fn(params, batch_stats, batch, key) -> (loss, (batch_stats, scale))``.

  The forward pass of the step: augmentation, both towers in train mode, the
  sharded label-aware contrastive loss. Differentiate w.r.t. ``params``.
  """
  contrastive = losses.sharded_label_aware_contrastive_loss(mesh, 'data')

  def loss_fn(params, batch_stats, batch, key):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    k_aug, k_drop = jax.random.split(key)
    if options.augment:
      images = augment_lib.augment(k_aug, batch['image'], dtype=compute_dtype)
    else:
      images = augment_lib.to_unit_float(batch['image'], compute_dtype)
    mask = attention_mask(batch['lengths'], batch['input_ids'].shape[1])

    def towers(model, images, ids, mask, k_drop):
      return model(images, ids, mask, dropout_key=k_drop if options.text_dropout else None)

    if options.remat:
      towers = nnx.remat(towers)
    img_bd, txt_bd, logit_scale = towers(model, images, batch['input_ids'], mask, k_drop)
    loss = contrastive(img_bd, txt_bd, logit_scale, batch['category'])
    return loss, (nnx.state(model, nnx.BatchStat), logit_scale)

  return loss_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh: Mesh, *,
                    schedule: Optional[Callable] = None,
                    options: StepOptions = StepOptions(),
                    compute_dtype=jnp.float32) -> Callable:
  """Builds ``train_step(state, batch, key) -> (state, metrics)``, jitted.

  Args:
    graphdef: from :func:`create_train_state`.
    tx: the optimiser (e.g. ``flair_jax.training.optim.make_optimizer``).
    mesh: the device mesh; the batch is split over its ``'data'`` axis.
    schedule: ``step -> lr``, only to report the learning rate.
    options: augmentation, dropout, rematerialisation.
    compute_dtype: dtype of the augmented images fed to the towers.

  The per-step randomness is ``fold_in(key, state.step)``, so a resumed run
  draws the same augmentation and dropout as an uninterrupted one.
  """
  grad_fn = jax.value_and_grad(
      make_loss_fn(graphdef, mesh, options=options, compute_dtype=compute_dtype),
      has_aux=True)

  def train_step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    (loss, (batch_stats, logit_scale)), grads = grad_fn(
        state.params, state.batch_stats, batch, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # PyTorch FLAIR clamps the log-temperature before every use.
    params = jax.tree_util.tree_map_with_path(_clamp_logit_scale, params)
    metrics = {
        'loss': loss,
        'logit_scale': logit_scale,
        'l2_grads': optax.tree.norm(grads),
        'l2_params': optax.tree.norm(params),
        'l2_updates': optax.tree.norm(updates),
    }
    if schedule is not None:
      metrics['lr'] = jnp.asarray(schedule(state.step), jnp.float32)
    new_state = TrainState(step=state.step + 1, params=params,
                           batch_stats=batch_stats, opt_state=opt_state)
    return new_state, metrics

  replicated, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  return jax.jit(train_step,
                 in_shardings=(replicated, data, replicated),
                 out_shardings=(replicated, replicated),
                 donate_argnums=(0,))
