"""Hugging Face ``BertModel`` in Flax NNX, built from a ``config.json``.

Numerics follow transformers: word + position + token-type embeddings,
post-LayerNorm encoder, additive attention mask, exact erf GELU (``"gelu"``),
and the tanh pooler (kept so state dicts round-trip; FLAIR does not use it).
Dropout is applied only when a ``dropout_key`` is passed: one key for the
batch, or one key per row (``[B]`` keys), with which a row's draws depend on
its own key only, so that the rows of a batch split into parts draw as they
would together.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

from flair_jax.models.layers import LayerNorm, Linear, block_runner
from flair_jax.models.torch_keys import Row

_ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of a Hugging Face BERT ``config.json`` that shape the model."""
  vocab_size: int = 28996
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  initializer_range: float = 0.02
  pad_token_id: int = 0

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f'hidden_act {self.hidden_act!r} is not supported; '
                       f'expected one of {sorted(_ACTIVATIONS)}')
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size {self.hidden_size} is not a multiple of '
                       f'num_attention_heads {self.num_attention_heads}')

  @classmethod
  def from_dict(cls, d: dict) -> 'BertConfig':
    if d.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError('only absolute position embeddings are supported, got '
                       f"{d['position_embedding_type']!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(model_type='bert', architectures=['BertModel'],
             position_embedding_type='absolute')
    return d


def _split(key, num):
  """``num`` keys from one key, or from ``[B]`` per-row keys (each ``[B]``)."""
  if key is None:
    return [None] * num
  if key.ndim == 0:
    return list(jax.random.split(key, num))
  keys_bn = jax.vmap(lambda k: jax.random.split(k, num))(key)
  return [keys_bn[:, i] for i in range(num)]


def _dropout(x, rate, key):
  if key is None or rate == 0.0:
    return x
  if key.ndim == 0:
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  else:  # per-row keys
    keep = jax.vmap(lambda k, row: jax.random.bernoulli(k, 1.0 - rate, row.shape))(key, x)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Embedding(nnx.Module):
  """Lookup table; as torch's ``padding_idx``, the padding row is initialised
  to zeros and never receives a gradient."""

  def __init__(self, num, features, *, std, dtype, rngs, padding_idx=None):
    table = std * jax.random.normal(rngs.params(), (num, features), jnp.float32)
    if padding_idx is not None:
      table = table.at[padding_idx].set(0.0)
    self.embedding = nnx.Param(table)
    self.padding_idx = padding_idx
    self.dtype = dtype

  def __call__(self, ids):
    x = jnp.take(self.embedding[...], ids, axis=0)
    if self.padding_idx is not None:
      x = jnp.where((ids == self.padding_idx)[..., None], jax.lax.stop_gradient(x), x)
    return x.astype(self.dtype)


class BertEmbeddings(nnx.Module):
  def __init__(self, cfg: BertConfig, *, dtype, rngs):
    std = cfg.initializer_range
    self.word = Embedding(cfg.vocab_size, cfg.hidden_size, std=std, dtype=dtype, rngs=rngs,
                          padding_idx=cfg.pad_token_id)
    self.position = Embedding(cfg.max_position_embeddings, cfg.hidden_size, std=std, dtype=dtype, rngs=rngs)
    self.token_type = Embedding(cfg.type_vocab_size, cfg.hidden_size, std=std, dtype=dtype, rngs=rngs)
    self.norm = LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype)

  def __call__(self, ids_bl, token_type_bl):
    pos_l = jnp.arange(ids_bl.shape[1])
    # Summed in float32 like torch, then normalised.
    x = (self.word(ids_bl).astype(jnp.float32)
         + self.token_type(token_type_bl).astype(jnp.float32)
         + self.position(pos_l)[None].astype(jnp.float32))
    return self.norm(x)


class BertLayer(nnx.Module):
  """Self-attention + feed-forward, each followed by residual + LayerNorm."""

  def __init__(self, cfg: BertConfig, *, dtype, rngs):
    h, std = cfg.hidden_size, cfg.initializer_range
    lin = lambda i, o: Linear(i, o, init_std=std, dtype=dtype, rngs=rngs)
    self.query, self.key, self.value = lin(h, h), lin(h, h), lin(h, h)
    self.attn_out = lin(h, h)
    self.attn_norm = LayerNorm(h, epsilon=cfg.layer_norm_eps, dtype=dtype)
    self.intermediate = lin(h, cfg.intermediate_size)
    self.output = lin(cfg.intermediate_size, h)
    self.out_norm = LayerNorm(h, epsilon=cfg.layer_norm_eps, dtype=dtype)
    self.num_heads = cfg.num_attention_heads
    self.act = cfg.hidden_act
    self.hidden_dropout = cfg.hidden_dropout_prob
    self.attn_dropout = cfg.attention_probs_dropout_prob

  def __call__(self, x_bld, bias_b11l, key=None):
    b, l, d = x_bld.shape
    nh = self.num_heads
    hd = d // nh
    k1, k2, k3 = _split(key, 3)
    split = lambda t: t.reshape(b, l, nh, hd)
    q_blnh, k_blnh, v_blnh = split(self.query(x_bld)), split(self.key(x_bld)), split(self.value(x_bld))
    scores_bnqk = jnp.einsum('bqnh,bknh->bnqk', q_blnh, k_blnh,
                             preferred_element_type=jnp.float32) / math.sqrt(hd)
    probs_bnqk = jax.nn.softmax(scores_bnqk + bias_b11l, axis=-1)
    probs_bnqk = _dropout(probs_bnqk, self.attn_dropout, k1).astype(v_blnh.dtype)
    ctx_bld = jnp.einsum('bnqk,bknh->bqnh', probs_bnqk, v_blnh).reshape(b, l, d)
    attn = _dropout(self.attn_out(ctx_bld), self.hidden_dropout, k2)
    x_bld = self.attn_norm(attn.astype(jnp.float32) + x_bld.astype(jnp.float32))
    hidden = _ACTIVATIONS[self.act](self.intermediate(x_bld))
    out = _dropout(self.output(hidden), self.hidden_dropout, k3)
    return self.out_norm(out.astype(jnp.float32) + x_bld.astype(jnp.float32))


class Bert(nnx.Module):
  """``transformers.BertModel`` with ``output_hidden_states=True``.

  ``remat`` (an attribute, default False): rematerialise each layer in the
  backward pass.
  """

  def __init__(self, cfg: BertConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = cfg
    self.embeddings = BertEmbeddings(cfg, dtype=dtype, rngs=rngs)
    self.layers = nnx.List([BertLayer(cfg, dtype=dtype, rngs=rngs)
                            for _ in range(cfg.num_hidden_layers)])
    self.pooler = Linear(cfg.hidden_size, cfg.hidden_size,
                         init_std=cfg.initializer_range, dtype=dtype, rngs=rngs)
    self.dtype = dtype
    self.remat = False

  def __call__(self, input_ids_bl, attention_mask_bl, token_type_ids_bl=None,
               *, dropout_key: Optional[jax.Array] = None, with_pooler: bool = False):
    """Runs the encoder.

    Args:
      input_ids_bl: int token ids ``[B, L]``.
      attention_mask_bl: 1 for real tokens, 0 for padding, ``[B, L]``.
      token_type_ids_bl: optional ``[B, L]``; zeros when absent (as FLAIR).
      dropout_key: PRNG key enabling dropout (training), or ``[B]`` keys, one
        per row; None is eval mode.
      with_pooler: also compute the tanh pooler on the first token.

    Returns:
      ``(hidden_states, pooled)``: a tuple of ``num_hidden_layers + 1`` arrays
      ``[B, L, H]`` (index 0 is the embedding output) and ``[B, H]`` or None.
    """
    if token_type_ids_bl is None:
      token_type_ids_bl = jnp.zeros_like(input_ids_bl)
    # transformers' additive mask: 0 where attended, dtype-min where masked.
    bias_b11l = ((1.0 - attention_mask_bl[:, None, None, :].astype(jnp.float32))
                 * jnp.finfo(jnp.float32).min)
    keys = _split(dropout_key, len(self.layers) + 1)
    x = self.embeddings(input_ids_bl, token_type_ids_bl)
    x = _dropout(x, self.config.hidden_dropout_prob, keys[0])
    hidden_states = [x]
    run = block_runner(self.remat)
    for layer, key in zip(self.layers, keys[1:]):
      x = run(layer, x, bias_b11l, key)
      hidden_states.append(x)
    pooled = None
    if with_pooler:
      pooled = jnp.tanh(self.pooler(x[:, 0]).astype(jnp.float32))
    return tuple(hidden_states), pooled


# transformers BertModel <-> Bert.
TORCH_ROWS = (
    Row('embeddings.word_embeddings', 'embeddings/word', 'embedding'),
    Row('embeddings.position_embeddings', 'embeddings/position', 'embedding'),
    Row('embeddings.token_type_embeddings', 'embeddings/token_type', 'embedding'),
    Row('embeddings.LayerNorm', 'embeddings/norm', 'layernorm'),
    Row('encoder.layer.{l}.attention.self.query', 'layers/{l}/query', 'linear'),
    Row('encoder.layer.{l}.attention.self.key', 'layers/{l}/key', 'linear'),
    Row('encoder.layer.{l}.attention.self.value', 'layers/{l}/value', 'linear'),
    Row('encoder.layer.{l}.attention.output.dense', 'layers/{l}/attn_out', 'linear'),
    Row('encoder.layer.{l}.attention.output.LayerNorm', 'layers/{l}/attn_norm', 'layernorm'),
    Row('encoder.layer.{l}.intermediate.dense', 'layers/{l}/intermediate', 'linear'),
    Row('encoder.layer.{l}.output.dense', 'layers/{l}/output', 'linear'),
    Row('encoder.layer.{l}.output.LayerNorm', 'layers/{l}/out_norm', 'layernorm'),
    Row('pooler.dense', 'pooler', 'linear'),
)
# A buffer saved by transformers < 4.31 (recomputed, carries no weights).
TORCH_EXTRAS = ('embeddings.position_ids',)
