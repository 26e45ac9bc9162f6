"""The training state and the jitted, device-sharded FLAIR training step.

The model is split once (``nnx.split``) into a static graph definition and
pytrees of parameters and BatchNorm statistics; ``train_step`` is a pure
function of ``(state, batch, key)``, compiled once by ``jax.jit`` with the
batch sharded on the mesh axis ``'data'``, the state replicated and donated.
BatchNorm statistics are therefore those of the global batch, as on one
PyTorch device.

With ``accumulation_steps = K > 1`` the global batch is split into K
micro-batches and the gradient is that of the whole batch's loss, which
scores every row against every other row of the batch (not of its
micro-batch):

1. the whole batch through both towers without a gradient (BatchNorm in
   train mode: its statistics, the running statistics' update and the
   embeddings are the whole batch's, as with K = 1);
2. the loss and its gradient with respect to the ``[B, D]`` embeddings and
   the temperature (the sharded loss, unchanged);
3. each micro-batch recomputed with gradients (``lax.scan``), its VJP taken
   against its rows of those embedding gradients, the K results summed;
4. one optimiser update.

The augmentation and dropout draws are the whole batch's: augmentation is
applied to the whole batch once, dropout draws from one key per row
(``fold_in(key, row)``), so every row draws the same whatever K and the
number of devices. The gradient equals the whole batch's up to float32
rounding, except through BatchNorm's batch statistics: a micro-batch is
normalised with the whole batch's statistics, but its gradient through them
comes only from its own rows (``models.layers.GivenMoments``); the exact
gradient would need the other micro-batches' backward pass at every
BatchNorm layer. Towers without train-mode BatchNorm (BERT, LayerNorm
towers, a frozen ResNet) get the exact gradient.
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
from flair_jax.models import LOGIT_SCALE_MAX, layers

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
    remat: rematerialise each block of the towers in the backward pass.
    accumulation_steps: micro-batches per step (see the module docstring);
      the global batch must be a multiple of it times the devices.
  """
  augment: bool = True
  text_dropout: bool = True
  remat: bool = False
  accumulation_steps: int = 1


def split_model(model: nnx.Module):
  """``(graphdef, params, batch_stats)`` of a model in train mode."""
  model.train()
  return nnx.split(model, nnx.Param, nnx.BatchStat)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation,
                       mesh: Optional[Mesh] = None):
  """Splits the model once; returns ``(graphdef, state)``.

  With a mesh, the state is placed replicated on all of its devices (by a
  jitted function: on several processes ``device_put`` cannot place it).
  The model's arrays may be anywhere: a model loaded from disk, committed
  to one device, is first placed on the mesh by :func:`parallel.place`.
  """
  graphdef, params, batch_stats = split_model(model)
  if mesh is not None:
    params, batch_stats = parallel.place((params, batch_stats), parallel.replicated(mesh))

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


def _towers(options: StepOptions):
  """``towers(model, images, ids, mask, drop_keys, pool_length)``, each block
  rematerialised if asked (rematerialising whole towers would recompute as
  much and keep nearly every activation: the backward pass of a tower needs
  all of them at once)."""
  def towers(model, images, ids, mask, drop_keys, pool_length):
    if options.remat:
      layers.remat_blocks(model)
    return model(images, ids, mask, dropout_key=drop_keys, pool_length=pool_length)
  return towers


def _prepare(batch, key, options: StepOptions, compute_dtype):
  """The step's inputs drawn from ``key``: augmented images, attention mask
  and the per-row dropout keys (``None`` without dropout)."""
  k_aug, k_drop = jax.random.split(key)
  if options.augment:
    images = augment_lib.augment(k_aug, batch['image'], dtype=compute_dtype)
  else:
    images = augment_lib.to_unit_float(batch['image'], compute_dtype)
  mask = attention_mask(batch['lengths'], batch['input_ids'].shape[1])
  rows = jnp.arange(batch['image'].shape[0])
  return images, mask, (k_drop, rows) if options.text_dropout else None


def _row_keys(drop):
  """Per-row dropout keys ``fold_in(key, row)`` of ``(key, rows)``, or None."""
  if drop is None:
    return None
  key, rows = drop
  return jax.vmap(jax.random.fold_in, (None, 0))(key, rows)


def make_loss_fn(graphdef, mesh: Mesh, *, options: StepOptions = StepOptions(),
                 compute_dtype=jnp.float32) -> Callable:
  """``loss_fn(params, batch_stats, batch, key) -> (loss, (batch_stats, scale))``.

  The forward pass of the step: augmentation, both towers in train mode, the
  sharded label-aware contrastive loss. Differentiate w.r.t. ``params``.
  """
  contrastive = losses.sharded_label_aware_contrastive_loss(mesh, 'data')
  towers = _towers(options)

  def loss_fn(params, batch_stats, batch, key):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    images, mask, drop = _prepare(batch, key, options, compute_dtype)
    img_bd, txt_bd, logit_scale = towers(model, images, batch['input_ids'], mask,
                                         _row_keys(drop), None)
    loss = contrastive(img_bd, txt_bd, logit_scale, batch['category'])
    return loss, (nnx.state(model, nnx.BatchStat), logit_scale)

  return loss_fn


def _micro_batches(x, steps: int, mesh: Mesh):
  """``[B, ...]`` -> ``[K, B / K, ...]``, micro-batch ``k`` holding rows
  ``k * m ... (k + 1) * m - 1`` of every device's ``B / D`` rows (``m =
  B / (K D)``), so each micro-batch stays split over all devices and no row
  moves between devices."""
  shards = mesh.shape[parallel.BATCH_AXIS]
  b = x.shape[0]
  x = x.reshape(shards, steps, b // (shards * steps), *x.shape[1:])
  x = jnp.swapaxes(x, 0, 1).reshape(steps, b // steps, *x.shape[3:])
  return jax.lax.with_sharding_constraint(
      x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.BATCH_AXIS)))


def make_accumulated_grad_fn(graphdef, mesh: Mesh, *, options: StepOptions = StepOptions(),
                             compute_dtype=jnp.float32) -> Callable:
  """``grad_fn(params, batch_stats, batch, key) -> ((loss, (batch_stats, scale)), grads)``
  of the whole batch in ``options.accumulation_steps`` micro-batches (see the
  module docstring); the same signature as ``value_and_grad(make_loss_fn(...))``."""
  contrastive = losses.sharded_label_aware_contrastive_loss(mesh, 'data')
  towers = _towers(options)
  steps = options.accumulation_steps

  def whole_batch(params, batch_stats, images, ids, mask, drop_keys):
    model = nnx.merge(graphdef, params, batch_stats, copy=True)
    layers.record_moments(model)
    img_bd, txt_bd, scale = model(images, ids, mask, dropout_key=drop_keys)
    return (img_bd, txt_bd, scale), nnx.state(model, nnx.BatchStat), layers.recorded_moments(model)

  def grad_fn(params, batch_stats, batch, key):
    images, mask, drop = _prepare(batch, key, options, compute_dtype)
    ids, category = batch['input_ids'], batch['category']
    (img_bd, txt_bd, scale), new_stats, moments = whole_batch(
        params, batch_stats, images, ids, mask, _row_keys(drop))
    loss, cotangents = jax.value_and_grad(
        lambda i, t, s: contrastive(i, t, s, category), argnums=(0, 1, 2))(img_bd, txt_bd, scale)
    g_img, g_txt, g_scale = cotangents
    # FLAIR pools text over the longest sequence of the whole batch.
    pool_length = jnp.max(jnp.sum(mask.astype(jnp.float32), axis=1))
    micro = lambda x: _micro_batches(x, steps, mesh)
    xs = dict(images=micro(images), ids=micro(ids), mask=micro(mask), g_img=micro(g_img),
              g_txt=micro(g_txt), rows=None if drop is None else micro(drop[1]),
              # The temperature is used once per batch: its cotangent goes in once.
              g_scale=jnp.where(jnp.arange(steps) == 0, g_scale, 0.0))

    def micro_step(grads, x):
      drop_keys = None if drop is None else _row_keys((drop[0], x['rows']))

      def forward(params):
        model = nnx.merge(graphdef, params, batch_stats, copy=True)
        layers.use_moments(model, moments, 1.0 / steps)
        return towers(model, x['images'], x['ids'], x['mask'], drop_keys, pool_length)

      _, vjp = jax.vjp(forward, params)
      (g,) = vjp((x['g_img'], x['g_txt'], x['g_scale']))
      return jax.tree.map(jnp.add, grads, g), None

    # A loop, not K unrolled copies: one micro-batch's activations live at a
    # time. (XLA:CPU runs convolutions inside loops several times slower than
    # outside; see benchmarks/README.md.)
    grads, _ = jax.lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), xs)
    return (loss, (new_stats, scale)), grads

  return grad_fn


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
    options: augmentation, dropout, rematerialisation, accumulation.
    compute_dtype: dtype of the augmented images fed to the towers.

  The per-step randomness is ``fold_in(key, state.step)``, so a resumed run
  draws the same augmentation and dropout as an uninterrupted one.
  """
  if options.accumulation_steps > 1:
    grad_fn = make_accumulated_grad_fn(graphdef, mesh, options=options,
                                       compute_dtype=compute_dtype)
  else:
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
