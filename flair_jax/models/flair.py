"""The FLAIR two-tower model: an image tower, the BERT text tower, projection
heads and the learnt temperature, with PyTorch FLAIR's exact pooling; and its
PyTorch key table, assembled from the towers' own.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from flair_jax.models import bert as bert_lib
from flair_jax.models.bert import Bert, BertConfig
from flair_jax.models.layers import Linear
from flair_jax.models.torch_keys import Row

LOGIT_SCALE_MAX = 4.6052  # FLAIR clamps the log-temperature into [0, ln 100].
TEXT_POOLINGS = ('flair', 'masked')


def l2_normalize(x, axis=-1):
  """``x / ||x||`` as torch computes it (no epsilon)."""
  return x / jnp.linalg.norm(x, axis=axis, keepdims=True)


def clamp_logit_scale(logit_scale):
  """Value clamped to ``[0, ln 100]``; gradient passes straight through.

  PyTorch FLAIR clamps ``logit_scale.data`` in place outside autograd before
  forming logits, so the gradient is that of ``exp(p)`` at the clamped value.
  """
  clamped = jnp.clip(logit_scale, 0.0, LOGIT_SCALE_MAX)
  return logit_scale + jax.lax.stop_gradient(clamped - logit_scale)


def flair_text_pool(hidden_states, attention_mask_bl, pooling='flair', length=None):
  """FLAIR's text embedding from BERT hidden states.

  ``'flair'``: mean over layers 1, 2 and last of the mean over the positions
  ``< max(lengths)`` of the batch (what PyTorch FLAIR computes with padding
  to the batch's longest sequence, padding positions included), so inputs
  may be padded to any static length. ``'masked'``: each sequence's own
  masked mean (a cleaner choice for new models).

  Args:
    hidden_states: tuple of ``[B, L, H]`` arrays, index 0 the embeddings.
    attention_mask_bl: ``[B, L]`` with 1 for real tokens.
    pooling: ``'flair'`` or ``'masked'``.
    length: for ``'flair'``, the longest sequence of the whole batch when
      these rows are a part of it (a micro-batch); default: of these rows.
  Returns:
    ``[B, H]`` float32.
  """
  layers_kbld = jnp.stack([hidden_states[1], hidden_states[2], hidden_states[-1]]).astype(jnp.float32)
  mask_bl = attention_mask_bl.astype(jnp.float32)
  if pooling == 'flair':
    if length is None:
      length = jnp.max(jnp.sum(mask_bl, axis=1))
    length = jnp.asarray(length, jnp.float32)
    positions_l = jnp.arange(mask_bl.shape[1])
    weight_bl = jnp.broadcast_to((positions_l < length).astype(jnp.float32) / length, mask_bl.shape)
  elif pooling == 'masked':
    weight_bl = mask_bl / jnp.sum(mask_bl, axis=1, keepdims=True)
  else:
    raise ValueError(f'text pooling {pooling!r} unknown; expected one of {TEXT_POOLINGS}')
  per_layer_kbh = jnp.einsum('kblh,bl->kbh', layers_kbld, weight_bl)
  return jnp.mean(per_layer_kbh, axis=0)


class ProjectionHead(nnx.Module):
  """FLAIR's ProjectionLayer: normalise, bias-free linear, normalise."""

  def __init__(self, in_features, proj_dim, *, projection=True, norm=True,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.projection = Linear(in_features, proj_dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.apply_projection = projection
    self.norm = norm

  def __call__(self, x):
    x = x.astype(jnp.float32)
    if not self.apply_projection:
      return x
    if self.norm:
      x = l2_normalize(x)
    x = self.projection(x).astype(jnp.float32)
    if self.norm:
      x = l2_normalize(x)
    return x


class FLAIRTowers(nnx.Module):
  """Image and text towers with projections and a learnt temperature.

  Args:
    vision_model: the image tower, built (with ``rngs``, before this) by
      ``flair_jax.models.build_model``: a module mapping ``[B, H, W, 3]``
      images to ``[B, vision_model.out_features]`` features.
    bert_config: shape of the text tower.
    proj_dim: joint embedding size.
    projection, norm: FLAIR's ``projection`` / ``norm_features`` switches.
    text_pooling: ``'flair'`` (the original) or ``'masked'``.
    logit_scale_init_value: the temperature; the parameter is log(1/value).
    dtype: compute dtype of both towers (parameters stay float32).
  """

  def __init__(self, vision_model: nnx.Module, bert_config: BertConfig, *,
               proj_dim: int = 512, projection: bool = True, norm: bool = True,
               text_pooling: str = 'flair', logit_scale_init_value: float = 0.07,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if text_pooling not in TEXT_POOLINGS:
      raise ValueError(f'text_pooling {text_pooling!r} unknown; expected one of {TEXT_POOLINGS}')
    self.vision_model = vision_model
    self.vision_projection = ProjectionHead(
        self.vision_model.out_features, proj_dim, projection=projection, norm=norm,
        dtype=dtype, rngs=rngs)
    self.text_model = Bert(bert_config, dtype=dtype, rngs=rngs)
    self.text_projection = ProjectionHead(
        bert_config.hidden_size, proj_dim, projection=projection, norm=norm,
        dtype=dtype, rngs=rngs)
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1.0 / logit_scale_init_value), jnp.float32))
    self.text_pooling = text_pooling

  def image_features(self, images_bhwc):
    """Un-projected image features ``[B, out_features]`` from float RGB in [0, 1]."""
    return self.vision_model(images_bhwc)

  def encode_image(self, images_bhwc):
    """Projected (and normalised) image embeddings ``[B, proj_dim]``."""
    return self.vision_projection(self.image_features(images_bhwc))

  def text_features(self, input_ids_bl, attention_mask_bl, *,
                    dropout_key: Optional[jax.Array] = None, pool_length=None):
    """Un-projected pooled text features ``[B, hidden]``.

    ``dropout_key``: as ``Bert``'s. ``pool_length``: as ``flair_text_pool``'s
    ``length``.
    """
    hidden, _ = self.text_model(input_ids_bl, attention_mask_bl, dropout_key=dropout_key)
    return flair_text_pool(hidden, attention_mask_bl, self.text_pooling, pool_length)

  def encode_text(self, input_ids_bl, attention_mask_bl, *,
                  dropout_key: Optional[jax.Array] = None, pool_length=None):
    """Projected (and normalised) text embeddings ``[B, proj_dim]``."""
    return self.text_projection(self.text_features(
        input_ids_bl, attention_mask_bl, dropout_key=dropout_key, pool_length=pool_length))

  def scale(self):
    """``exp`` of the clamped log-temperature (float32 scalar)."""
    return jnp.exp(clamp_logit_scale(self.logit_scale[...]))

  def logits(self, img_bd, txt_td):
    """``logits_per_image [B, T] = exp(logit_scale) * img @ txt.T``."""
    return self.scale() * jnp.einsum('bd,td->bt', img_bd, txt_td)

  def __call__(self, images_bhwc, input_ids_bl, attention_mask_bl, *,
               dropout_key: Optional[jax.Array] = None, pool_length=None):
    """Returns ``(img_bd, txt_bd, logit_scale)`` (scale clamped, not exp'd)."""
    img_bd = self.encode_image(images_bhwc)
    txt_bd = self.encode_text(input_ids_bl, attention_mask_bl, dropout_key=dropout_key,
                              pool_length=pool_length)
    return img_bd, txt_bd, clamp_logit_scale(self.logit_scale[...])


VISION_TORCH_PREFIX = 'vision_model.model.'
TEXT_TORCH_PREFIX = 'text_model.model.'
# PyTorch keys accepted on import and dropped: the text tower's own.
TORCH_EXTRAS = tuple(TEXT_TORCH_PREFIX + k for k in bert_lib.TORCH_EXTRAS)


def torch_rows(vision_rows: tuple) -> tuple:
  """PyTorch FLAIRModel <-> FLAIRTowers, for an image tower of ``vision_rows``."""
  return (
      Row(VISION_TORCH_PREFIX, 'vision_model/', vision_rows),
      Row('vision_model.projection_head_vision.projection', 'vision_projection/projection',
          'linear'),
      Row(TEXT_TORCH_PREFIX, 'text_model/', bert_lib.TORCH_ROWS),
      Row('text_model.projection_head_text.projection', 'text_projection/projection', 'linear'),
      Row('logit_scale', 'logit_scale', 'param'),
  )
