"""FLAIR's label-aware contrastive loss, on one device or sharded over a mesh.

For a batch of B image-text pairs with category ids ``c``, the target is
``T[i, j] = [c_i == c_j] / sum_k [c_i == c_k]`` and the loss is the mean of
the soft-target cross-entropy of the text rows of
``logits = exp(logit_scale) * txt @ img.T`` and of its image rows (its
transpose), averaged over the two directions. Every id, 0 ("no category")
included, is an ordinary label: samples sharing it are positives.

Since the rows of ``T`` sum to one, a row's cross-entropy is
``logsumexp(logits_row) - sum_j T[i, j] logits[i, j]``, which needs no
``[rows, B]`` target or log-softmax array besides the logits themselves.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Hashable, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from flair_jax import parallel

AxisName = Union[Hashable, Sequence[Hashable]]
POSITIVES = ('auto', 'mask', 'segment')


def _category_index(category_r, category_k):
  """Rank of each id among the distinct ids of ``category_k``, and counts.

  Returns ``(index_r, index_k, count_r)``: ``index`` in ``[0, K)``, equal for
  equal ids; ``count_r[i] = sum_k [c_i == c_k]`` (every ``c_i`` occurs in
  ``category_k``). O(K log K), no ``[R, K]`` array.
  """
  order_k = jnp.argsort(category_k)
  sorted_k = category_k[order_k]
  new_k = jnp.concatenate([jnp.zeros(1, jnp.int32),
                           (sorted_k[1:] != sorted_k[:-1]).astype(jnp.int32)])
  rank_sorted_k = jnp.cumsum(new_k)
  index_k = jnp.zeros_like(rank_sorted_k).at[order_k].set(rank_sorted_k)
  first_r = jnp.searchsorted(sorted_k, category_r, side='left')
  count_r = jnp.searchsorted(sorted_k, category_r, side='right') - first_r
  return rank_sorted_k[first_r], index_k, count_r.astype(jnp.float32)


def _row_losses(query_rd, keys_kd, scale, category_r, category_k, index_r,
                index_k, count_r, positives):
  """Soft-target cross-entropy of each query row against all keys.

  Args:
    query_rd: ``[R, D]`` embeddings whose rows are scored.
    keys_kd: ``[K, D]`` embeddings of the other tower (the whole batch).
    scale: float32 scalar, ``exp(logit_scale)``.
    category_r, category_k: ``[R]``, ``[K]`` integer ids.
    index_r, index_k, count_r: from ``_category_index``.
    positives: ``'mask'`` or ``'segment'`` (see the loss).
  Returns:
    ``[R]`` float32 losses.
  """
  # The scale multiplies the [R, D] queries, not the [R, K] logits, so no
  # scaled copy of the block exists; RD,KD -> RK in float32 (bfloat16 keys
  # are promoted), and so is everything after it.
  query_rd = query_rd.astype(jnp.float32) * scale
  logits_rk = jnp.einsum('rd,kd->rk', query_rd, keys_kd, preferred_element_type=jnp.float32)
  if positives == 'mask':
    same_rk = category_r[:, None] == category_k[None, :]
    positive_r = jnp.sum(jnp.where(same_rk, logits_rk, 0.0), axis=1)
  else:
    # Keys summed per category: q . sum_{c_k = c} k is the sum of those logits.
    key_sum_kd = jax.ops.segment_sum(keys_kd.astype(jnp.float32), index_k,
                                     num_segments=keys_kd.shape[0])
    positive_r = jnp.einsum('rd,rd->r', query_rd, key_sum_kd[index_r])
  return jax.nn.logsumexp(logits_rk, axis=1) - positive_r / count_r


def _check_inputs(img_bd, txt_bd, category_b):
  if img_bd.ndim != 2 or img_bd.shape != txt_bd.shape:
    raise ValueError(f'image and text embeddings must both be [B, D]; got '
                     f'{img_bd.shape} and {txt_bd.shape}')
  if category_b.shape != img_bd.shape[:1]:
    raise ValueError(f'category ids must be [B] = {img_bd.shape[:1]}; got '
                     f'{category_b.shape}')
  if not jnp.issubdtype(category_b.dtype, jnp.integer):
    raise ValueError(f'category ids must be integers; got {category_b.dtype}')


def label_aware_contrastive_loss(img_bd, txt_bd, logit_scale, category_b,
                                 *, axis_name: AxisName | None = None,
                                 positives: str = 'auto'):
  """FLAIR's loss: mean soft-target cross-entropy over text and image rows.

  Without ``axis_name`` this is the loss of the whole batch on one device.
  With ``axis_name`` it is the per-device piece to call inside
  ``jax.shard_map`` (see ``sharded_label_aware_contrastive_loss``): the
  arguments are this device's rows, scored against the embeddings and ids
  all-gathered over ``axis_name``, and the result is the global loss.

  Args:
    img_bd: ``[B, D]`` projected, normalised image embeddings (any float).
    txt_bd: ``[B, D]`` projected, normalised text embeddings of the same pairs.
    logit_scale: scalar log-temperature, already clamped; its ``exp`` is used.
    category_b: ``[B]`` integer category ids.
    axis_name: mesh axis (or axes) the batch is split over, or None.
    positives: how each row's target-weighted logit sum is formed. ``'mask'``
      reduces the ``[R, B]`` logits under the same-category mask (free where
      XLA fuses the mask into the reduction, as on GPU and TPU; the CPU
      backend materialises it). ``'segment'`` sums the other tower's
      embeddings per category (an extra ``[B, D]`` per direction, no
      ``[R, B]`` array). ``'auto'``: segment when this device's rows
      R > 2 D (where the CPU backend's mask copies outgrow the key sums),
      else mask.
  Returns:
    float32 scalar.
  """
  _check_inputs(img_bd, txt_bd, category_b)
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  if axis_name is None:
    all_img_bd, all_txt_bd, all_category_b = img_bd, txt_bd, category_b
  else:
    gather = functools.partial(jax.lax.all_gather, axis_name=axis_name, tiled=True)
    all_img_bd, all_txt_bd, all_category_b = gather(img_bd), gather(txt_bd), gather(category_b)
  if positives not in POSITIVES:
    raise ValueError(f'positives={positives!r}; expected one of {POSITIVES}')
  if positives == 'auto':
    positives = 'segment' if img_bd.shape[0] > 2 * img_bd.shape[1] else 'mask'
  rows = functools.partial(_row_losses, scale=scale, category_r=category_b,
                           category_k=all_category_b, positives=positives)
  index_r, index_k, count_r = _category_index(category_b, all_category_b)
  # Text rows are rows of logits_per_text; image rows are rows of its
  # transpose. T is symmetric, so both use the query's own target row.
  text_r = rows(txt_bd, all_img_bd, index_r=index_r, index_k=index_k, count_r=count_r)
  image_r = rows(img_bd, all_txt_bd, index_r=index_r, index_k=index_k, count_r=count_r)
  total = jnp.sum(text_r) + jnp.sum(image_r)
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
  return total / (2 * all_category_b.shape[0])


def _axis_size(mesh: Mesh, axis: AxisName) -> int:
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  missing = [n for n in names if n not in mesh.shape]
  if missing:
    raise ValueError(f'mesh axes {missing} not in the mesh; it has {tuple(mesh.shape)}')
  return math.prod(mesh.shape[n] for n in names)


def sharded_label_aware_contrastive_loss(mesh: Mesh, axis: AxisName = 'data',
                                         positives: str = 'auto') -> Callable:
  """The loss with the batch split over ``axis`` of ``mesh``.

  Each device scores its own image rows and text rows against the
  all-gathered embeddings of the other tower and the all-gathered ids; the
  row losses are summed with ``psum``. Per device this holds the gathered
  ``[B, D]`` embeddings and ``[B/n, B]`` logits, never ``[B, B]``. The
  returned function may be called inside ``jax.jit`` (inputs sharded on
  ``axis``) or eagerly.

  Args:
    mesh: device mesh holding ``axis``.
    axis: the mesh axis name (or tuple of names) the batch is split over.
    positives: as in ``label_aware_contrastive_loss``.
  Returns:
    ``loss_fn(img_bd, txt_bd, logit_scale, category_b) -> float32 scalar``
    with the arguments of ``label_aware_contrastive_loss``; B must be a
    multiple of the size of ``axis``.
  """
  n = _axis_size(mesh, axis)
  batch, whole = parallel.batch_spec(axis), parallel.replicated_spec()
  body = functools.partial(label_aware_contrastive_loss, axis_name=axis,
                           positives=positives)
  sharded = jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, whole, batch),
                          out_specs=whole)

  def loss_fn(img_bd, txt_bd, logit_scale, category_b):
    if img_bd.shape[0] % n:
      raise ValueError(f'global batch {img_bd.shape[0]} is not a multiple of '
                       f'the {n} devices on mesh axis {axis!r}')
    return sharded(img_bd, txt_bd, jnp.asarray(logit_scale, jnp.float32), category_b)

  return loss_fn
