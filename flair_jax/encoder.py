"""The jitted image and text towers of a FLAIR model, and its prompts.

An ``Encoder`` is built once from a model's graph definition; the weights
are an argument of its jitted functions, so new weights (a training run's
periodic evaluation) never re-trace. Both towers run in eval mode with the
batch split over a mesh of this process's devices.

Zero-shot prompts follow PyTorch FLAIR: a class's prototype is the mean of
the projected, normalised embeddings of its prompts (the mean is not
re-normalised). With expert knowledge, a class found in the dictionary is
prompted by its descriptions followed by its own name (unless the
descriptions already hold it, or it is one of MMAC's "myopic maculopathy"
grades, whose names FLAIR leaves out as uninformative); otherwise by its
name alone. Each prompt is the caption with ``[CLS]`` replaced. Scores are
``exp(logit_scale) * img @ prototypes.T``, softmaxed.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines import captions as captions_lib
from data_pipelines import tokenizer as tokenizer_lib
from flair_jax import parallel
from flair_jax.models import clamp_logit_scale

CAPTION = captions_lib.PROMPT_TEMPLATE
UNINFORMATIVE_NAMES = ('myopic maculopathy',)  # MMAC's grade names.
TEXT_ROWS_MULTIPLE = 8  # text batches are padded to a multiple: fewer compilations

# (tower, input shapes) -> times traced, over every Encoder of the process.
trace_counts: collections.Counter = collections.Counter()


def _eval_model(graphdef, state):
  model = nnx.merge(graphdef, state)
  model.eval()  # the graph may come from training (dropout on, batch statistics updated)
  return model


class Encoder:
  """The image and text towers of one model graph, jitted over a mesh.

  Args:
    graphdef: the model's ``nnx`` graph definition (train or eval mode).
    mesh: default: this process's devices on the ``'data'`` axis.
  """

  def __init__(self, graphdef, mesh=None):
    self.mesh = mesh or parallel.make_mesh(devices=jax.local_devices())
    self.num_shards = self.mesh.shape[parallel.BATCH_AXIS]
    self._replicated = parallel.replicated(self.mesh)
    self._batch = parallel.batch_sharding(self.mesh)

    def images_fn(state, images_bhwc):
      trace_counts['image', images_bhwc.shape] += 1
      model = _eval_model(graphdef, state)
      feat_bf = model.image_features(images_bhwc)
      return feat_bf.astype(jnp.float32), model.vision_projection(feat_bf)

    def texts_fn(state, ids_bl, mask_bl):
      trace_counts['text', ids_bl.shape] += 1
      return _eval_model(graphdef, state).encode_text(ids_bl, mask_bl)

    self._images_fn = jax.jit(images_fn, in_shardings=(self._replicated, self._batch),
                              out_shardings=(self._batch, self._batch))
    # Text batches are a few dozen prompts: each device encodes all of them,
    # which gives a single device's numbers (a split batch moves them by ulps).
    self._texts_fn = jax.jit(texts_fn, in_shardings=self._replicated,
                             out_shardings=self._replicated)

  def place(self, state):
    """``state`` replicated on the mesh (do it once per set of weights)."""
    return jax.device_put(state, self._replicated)

  def round_batch(self, batch_size: int, limit: Optional[int] = None) -> int:
    """``min(batch_size, limit)`` rounded up to a multiple of the shards."""
    rows = max(min(batch_size, limit) if limit is not None else batch_size, 1)
    return -(-rows // self.num_shards) * self.num_shards

  def image_features(self, state, images_bhwc) -> tuple[np.ndarray, np.ndarray]:
    """``(features [B, F], embeddings [B, D])`` float32 of canvases ``[B, S, S, 3]``.

    B is padded with zero canvases to a multiple of the shards.
    """
    images_bhwc = np.asarray(images_bhwc, np.float32)
    count = images_bhwc.shape[0]
    rows = self.round_batch(count)
    if rows != count:
      images_bhwc = np.concatenate(
          [images_bhwc, np.zeros((rows - count, *images_bhwc.shape[1:]), np.float32)])
    feat_bf, emb_bd = self._images_fn(state, jax.device_put(images_bhwc, self._batch))
    return np.asarray(feat_bf)[:count], np.asarray(emb_bd)[:count]

  def text_embeddings(self, state, ids_tl, lengths_t) -> np.ndarray:
    """Embeddings ``[T, D]`` of token ids ``[T, L]`` encoded as ONE batch.

    FLAIR pads a batch to its longest text and its pooling averages over
    those positions; ids padded to any longer length with the ``'flair'``
    pooling give the same numbers. The ids are cut to their text bucket
    (``data_pipelines.tokenizer.bucket_length``) and rows are padded to a
    multiple of 8 with copies of the first text (same longest length): few
    shapes, few compilations.
    """
    count = len(ids_tl)
    if not count:
      raise ValueError('no texts to encode')
    lengths_t = np.asarray(lengths_t)
    ids_tl = tokenizer_lib.cut_to_bucket(np.asarray(ids_tl), lengths_t)
    rows = -(-count // TEXT_ROWS_MULTIPLE) * TEXT_ROWS_MULTIPLE
    pad = np.zeros(rows - count, np.int64)
    ids_tl = np.concatenate([ids_tl, ids_tl[pad]])
    lengths_t = np.concatenate([lengths_t, lengths_t[pad]])
    mask_tl = (np.arange(ids_tl.shape[1])[None] < lengths_t[:, None]).astype(np.int32)
    emb = self._texts_fn(state, jnp.asarray(ids_tl), jnp.asarray(mask_tl))
    return np.asarray(emb)[:count]


def logit_scale(state, clamped: bool = True) -> float:
  """The log-temperature of a model's state; FLAIR clamps it into [0, ln 100]
  in ``forward`` (its adapters exponentiate the stored value)."""
  value = state['logit_scale'][...]
  return float(clamp_logit_scale(value) if clamped else value)


def class_descriptions(category: str,
                       knowledge: Optional[Mapping[str, Sequence[str]]] = None) -> list[str]:
  """The texts that stand for ``category`` (before the caption)."""
  if knowledge is None or category not in knowledge:
    return [category]
  descriptions = list(knowledge[category])
  if category not in descriptions and not any(w in category for w in UNINFORMATIVE_NAMES):
    descriptions.append(category)
  return descriptions


def class_prompts(category: str, knowledge: Optional[Mapping[str, Sequence[str]]] = None,
                  caption: str = CAPTION) -> list[str]:
  """The captions whose embeddings average into ``category``'s prototype."""
  return [caption.replace('[CLS]', d) for d in class_descriptions(category, knowledge)]


@dataclasses.dataclass(frozen=True)
class ClassPrompts:
  """Every class's prompts, tokenized once: ``tokens[c] = (ids [T, L], lengths [T])``."""
  categories: tuple[str, ...]
  tokens: tuple[tuple[np.ndarray, np.ndarray], ...]

  @classmethod
  def build(cls, tokenizer, categories: Sequence[str],
            knowledge: Optional[Mapping[str, Sequence[str]]] = None,
            caption: str = CAPTION) -> 'ClassPrompts':
    """The prompts of ``categories`` (label order) with ``knowledge`` (or none)."""
    return cls(tuple(categories), tuple(
        tokenizer_lib.tokenize(tokenizer, class_prompts(c, knowledge, caption))
        for c in categories))

  def prototypes(self, encoder: Encoder, state) -> np.ndarray:
    """``[C, D]``: each class's prompts encoded as their own batch, averaged."""
    protos = [encoder.text_embeddings(state, ids, lengths).mean(0) for ids, lengths in self.tokens]
    return np.stack(protos) if protos else np.zeros((0, 0), np.float32)


def zero_shot_logits(img_nd, prototypes_cd, logit_scale_value):
  """``exp(logit_scale) * img @ prototypes.T`` -> ``(probs_nc, logits_nc)``.

  ``logit_scale_value`` is the log-temperature as the caller wants it
  (FLAIR's zero-shot adapter exponentiates the stored parameter; its
  ``forward`` clamps it first).
  """
  logits_nc = jnp.exp(jnp.asarray(logit_scale_value, jnp.float32)) * jnp.einsum(
      'nd,cd->nc', jnp.asarray(img_nd, jnp.float32), jnp.asarray(prototypes_cd, jnp.float32))
  return jax.nn.softmax(logits_nc, axis=-1), logits_nc
