"""timm's ``VisionTransformer`` in Flax NNX (no classifier).

Attribute names follow timm (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks[i].attn.qkv``, ``norm`` / ``fc_norm``) so that the
weight-conversion table (:data:`TORCH_ROWS`) is a plain renaming and a timm
state dict loads unchanged. The numerics are timm's: pre-norm blocks,
LayerNorm eps 1e-6, fused qkv, exact (erf) GELU, scaled dot-product
attention, a final norm before pooling ('token') or after it ('avg', timm's
``fc_norm``).

Unlike timm, the module takes FLAIR's [0, 1] canvas of any size: it resizes
it to ``image_size`` (bilinear, antialiased) and normalises it with the
weights' mean and std, so that training, evaluation and inference feed it
the same way.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flair_jax.models.layers import LayerNorm, Linear, block_runner, normalize_pixels
from flair_jax.models.torch_keys import Row
from flair_jax.models.tower import VisionTower

LN_EPS = 1e-6
POOLS = ('token', 'avg')
# timm names of the standard shapes: (patch, width, depth, heads) -> name stem.
TIMM_NAMES = {(16, 384, 12, 6): 'vit_small_patch16', (16, 768, 12, 12): 'vit_base_patch16',
              (16, 1024, 24, 16): 'vit_large_patch16', (32, 768, 12, 12): 'vit_base_patch32',
              (14, 1024, 24, 16): 'vit_large_patch14'}


def resize_images(images_bhwc, size: int):
  """``[B, H, W, C]`` -> ``[B, size, size, C]``, bilinear, antialiased when
  shrinking (``torch.nn.functional.interpolate(mode='bilinear',
  antialias=True)``'s sampling); a no-op at the same size."""
  b, h, w, c = images_bhwc.shape
  if (h, w) == (size, size):
    return images_bhwc
  return jax.image.resize(images_bhwc, (b, size, size, c), method='linear', antialias=True)


class PatchEmbed(nnx.Module):
  """A ``patch x patch`` stride-``patch`` convolution, as one matmul over
  flattened patches (exact: each output sums the same products)."""

  def __init__(self, patch: int, width: int, *, dtype, rngs):
    fan_in = 3 * patch * patch
    bound = 1.0 / np.sqrt(fan_in)
    self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (patch, patch, 3, width),
                                               jnp.float32, -bound, bound))
    self.bias = nnx.Param(jnp.zeros((width,), jnp.float32))
    self.patch = patch
    self.dtype = dtype

  def __call__(self, images_bhwc):
    b, h, w, c = images_bhwc.shape
    p = self.patch
    x = images_bhwc.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x_bnk = x.reshape(b, (h // p) * (w // p), p * p * c).astype(self.dtype)
    kernel_kd = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
    return jnp.dot(x_bnk, kernel_kd) + self.bias[...].astype(self.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection (timm's)."""

  def __init__(self, width: int, heads: int, *, dtype, rngs):
    self.qkv = Linear(width, 3 * width, init_std=0.02, dtype=dtype, rngs=rngs)
    self.proj = Linear(width, width, init_std=0.02, dtype=dtype, rngs=rngs)
    self.heads = heads

  def __call__(self, x_btd):
    b, t, d = x_btd.shape
    # timm's layout of the fused output: (3, heads, head_dim).
    qkv = self.qkv(x_btd).reshape(b, t, 3, self.heads, d // self.heads)
    q_btnh, k_btnh, v_btnh = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out_btnh = jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh)
    return self.proj(out_btnh.reshape(b, t, d))


class Mlp(nnx.Module):

  def __init__(self, width: int, hidden: int, *, dtype, rngs):
    self.fc1 = Linear(width, hidden, init_std=0.02, dtype=dtype, rngs=rngs)
    self.fc2 = Linear(hidden, width, init_std=0.02, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``."""

  def __init__(self, width: int, heads: int, mlp_hidden: int, *, dtype, rngs):
    self.norm1 = LayerNorm(width, epsilon=LN_EPS, dtype=dtype)
    self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
    self.norm2 = LayerNorm(width, epsilon=LN_EPS, dtype=dtype)
    self.mlp = Mlp(width, mlp_hidden, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class VisionTransformer(nnx.Module):
  """timm's ViT with a class token and learned absolute position embedding.

  Args:
    image_size: side the input is resized to; the patch grid is
      ``image_size // patch_size`` squared.
    patch_size, width, depth, heads, mlp_ratio: the shape (ViT-B/16 by default).
    pool: ``'token'`` (class token, final ``norm``) or ``'avg'`` (mean of
      the patch tokens, then ``fc_norm``), as timm's ``global_pool``.
    pixel_mean, pixel_std: input normalisation of the [0, 1] images (empty:
      none; ``VisionConfig`` gives timm's augreg 0.5 / 0.5).
    remat: rematerialise each block's activations in the backward pass.
    dtype: compute dtype; parameters stay float32.
  """

  def __init__(self, image_size: int = 224, patch_size: int = 16, width: int = 768,
               depth: int = 12, heads: int = 12, mlp_ratio: float = 4.0, pool: str = 'token',
               pixel_mean: Sequence[float] = (), pixel_std: Sequence[float] = (),
               remat: bool = False,
               *, dtype=jnp.float32, rngs: nnx.Rngs):
    if pool not in POOLS:
      raise ValueError(f'ViT pool {pool!r} unknown; expected one of {POOLS}')
    if image_size % patch_size or width % heads:
      raise ValueError(f'ViT image_size {image_size} must be a multiple of patch_size '
                       f'{patch_size} and width {width} of heads {heads}')
    tokens = (image_size // patch_size) ** 2 + 1
    self.patch_embed = PatchEmbed(patch_size, width, dtype=dtype, rngs=rngs)
    self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, width)))
    self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, tokens, width)))
    self.blocks = nnx.List([Block(width, heads, int(width * mlp_ratio), dtype=dtype, rngs=rngs)
                            for _ in range(depth)])
    final = LayerNorm(width, epsilon=LN_EPS, dtype=dtype)
    self.norm, self.fc_norm = (final, None) if pool == 'token' else (None, final)
    self.image_size = image_size
    self.pool = pool
    self.pixel_mean = tuple(pixel_mean)
    self.pixel_std = tuple(pixel_std)
    self.remat = remat
    self.out_features = width
    self.dtype = dtype

  def __call__(self, images_bhwc):
    """Maps ``[B, H, W, 3]`` images in [0, 1] to ``[B, width]`` float32."""
    x = resize_images(images_bhwc, self.image_size)
    x = normalize_pixels(x, self.pixel_mean, self.pixel_std)
    x_bnd = self.patch_embed(x)
    cls_b1d = jnp.broadcast_to(self.cls_token[...].astype(self.dtype),
                               (x_bnd.shape[0], 1, x_bnd.shape[2]))
    x_btd = jnp.concatenate([cls_b1d, x_bnd], axis=1) + self.pos_embed[...].astype(self.dtype)
    run = block_runner(self.remat)
    for block in self.blocks:
      x_btd = run(block, x_btd)
    if self.pool == 'token':
      out_bd = self.norm(x_btd)[:, 0]
    else:
      out_bd = self.fc_norm(jnp.mean(x_btd[:, 1:].astype(jnp.float32), axis=1))
    return out_bd.astype(jnp.float32)


# timm VisionTransformer (``head`` excluded) <-> VisionTransformer.
TORCH_ROWS = (
    Row('patch_embed.proj', 'patch_embed', 'conv'),
    Row('cls_token', 'cls_token', 'param'),
    Row('pos_embed', 'pos_embed', 'param'),
    Row('blocks.{l}.norm1', 'blocks/{l}/norm1', 'layernorm'),
    Row('blocks.{l}.attn.qkv', 'blocks/{l}/attn/qkv', 'linear'),
    Row('blocks.{l}.attn.proj', 'blocks/{l}/attn/proj', 'linear'),
    Row('blocks.{l}.norm2', 'blocks/{l}/norm2', 'layernorm'),
    Row('blocks.{l}.mlp.fc1', 'blocks/{l}/mlp/fc1', 'linear'),
    Row('blocks.{l}.mlp.fc2', 'blocks/{l}/mlp/fc2', 'linear'),
    Row('norm', 'norm', 'layernorm'),
    Row('fc_norm', 'fc_norm', 'layernorm'),
)
# The ImageNet classifier of a timm checkpoint (FLAIR replaces it).
TORCH_EXTRAS = ('head.weight', 'head.bias')


def build(config, *, dtype, rngs: nnx.Rngs) -> VisionTransformer:
  """The ViT of a ``VisionConfig`` of type ``'vit'``."""
  return VisionTransformer(
      config.image_size, config.patch_size, config.embed_dim, config.depth, config.heads,
      config.mlp_ratio, config.pool, config.pixel_mean, config.pixel_std, config.remat,
      dtype=dtype, rngs=rngs)


def shape_from_torch(shapes: Mapping[str, tuple]) -> dict:
  """The ``VisionConfig`` shape fields of a timm ViT state dict's shapes.

  The number of heads is not in the weights: it is taken as ``width // 64``
  (timm's S, B and L).
  """
  d, _, p, _ = shapes['patch_embed.proj.weight']
  depth = 1 + max(int(k.split('.')[1]) for k in shapes if k.startswith('blocks.'))
  grid = int(round(np.sqrt(shapes['pos_embed'][1] - 1)))
  return dict(patch_size=int(p), embed_dim=int(d), depth=depth, heads=max(1, int(d) // 64),
              mlp_ratio=shapes['blocks.0.mlp.fc1.weight'][0] / d, image_size=grid * int(p),
              pool='avg' if 'fc_norm.weight' in shapes else 'token')


def timm_name(config) -> str:
  """timm's model name of this shape (``vit_base_patch16_224``), or ''."""
  stem = TIMM_NAMES.get((config.patch_size, config.embed_dim, config.depth, config.heads))
  if stem is None or config.mlp_ratio != 4.0:
    return ''
  return f'{stem}_{config.image_size}' if config.image_size in (224, 384) else f'{stem}_224'


def timm_kwargs(config) -> dict:
  """``timm.create_model`` / ``VisionTransformer`` arguments of this tower."""
  return dict(img_size=config.image_size, patch_size=config.patch_size,
              embed_dim=config.embed_dim, depth=config.depth, num_heads=config.heads,
              mlp_ratio=config.mlp_ratio, global_pool=config.pool, num_classes=0)


def resample_grid(posemb_1nd: np.ndarray, new_grid: int, prefix: int = 1) -> np.ndarray:
  """timm's ``resample_abs_pos_embed``: the patch positions of a square grid
  resampled bicubically with antialiasing (PyTorch's
  ``interpolate(mode='bicubic', antialias=True)``), prefix tokens kept."""
  from flair_jax.models import resample  # pylint: disable=g-import-not-at-top
  head, grid_nd = posemb_1nd[:, :prefix], posemb_1nd[0, prefix:]
  old = int(round(np.sqrt(grid_nd.shape[0])))
  grid_hwd = grid_nd.reshape(old, old, -1).astype(np.float64)
  new_hwd = resample.resize_axis(resample.resize_axis(grid_hwd, new_grid, 1), new_grid, 0)
  body = new_hwd.reshape(1, new_grid * new_grid, -1).astype(posemb_1nd.dtype)
  return np.concatenate([head, body], axis=1)


def prepare_torch(sd: Mapping, config) -> dict:
  """A timm state dict fitted to ``config``: the position embedding
  resampled to its patch grid, as ``timm``'s ``checkpoint_filter_fn``."""
  sd = dict(sd)
  grid = config.image_size // config.patch_size
  pos = sd.get('pos_embed')
  if pos is not None and pos.shape[1] != grid * grid + 1:
    sd['pos_embed'] = resample_grid(np.asarray(pos, np.float32), grid)
  return sd


TOWER = VisionTower(name='ViT', build=build, torch_rows=TORCH_ROWS, torch_extras=TORCH_EXTRAS,
                    hub_types=('vit',), shape_from_torch=shape_from_torch,
                    prepare_torch=prepare_torch)
