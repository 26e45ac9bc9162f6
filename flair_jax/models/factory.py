"""The image towers by ``VisionConfig.type``, and the one function that
builds a FLAIR model from its config.

A new image tower is a module in ``flair_jax/models/`` that declares a
``models.tower.VisionTower`` (builder, PyTorch key table, hub names), plus
one entry in :data:`VISION_TOWERS`.
"""

from __future__ import annotations

from typing import Mapping, Optional

import jax.numpy as jnp
from flax import nnx

from data_pipelines.console import UserError
from flair_jax.models import flair, resnet, vit
from flair_jax.models.config import ModelConfig, VisionConfig
from flair_jax.models.tower import VisionTower

VISION_TOWERS = {
    'resnet': resnet.TOWER,
    'vit': vit.TOWER,
}


class UnknownVisionTowerError(UserError, ValueError):
  """An image tower type no module provides."""


def vision_tower(config: VisionConfig) -> VisionTower:
  """The tower declaration of ``config.type``."""
  try:
    return VISION_TOWERS[config.type]
  except KeyError:
    raise UnknownVisionTowerError(f'vision type {config.type!r} unknown; expected one of '
                                  f'{sorted(VISION_TOWERS)}') from None


def describe_vision(config: VisionConfig) -> str:
  """The image tower in a few words, for messages."""
  name = vision_tower(config).name
  if config.type == 'vit':
    return (f'{name}-{config.patch_size} at {config.image_size}, width {config.embed_dim}, '
            f'depth {config.depth}, {config.heads} heads, {config.pool} pooling')
  return f'{name} stages {list(config.stages)}, width {config.width}'


def vision_type_of_hub(hub_type: str) -> str:
  """The ``VisionConfig.type`` of a PyTorch FLAIR ``vision_type``."""
  for name, tower in VISION_TOWERS.items():
    if hub_type in tower.hub_types:
      return name
  known = [t for tower in VISION_TOWERS.values() for t in tower.hub_types]
  raise UnknownVisionTowerError(f'vision_type {hub_type!r} is not supported; expected one of '
                                f'{known}')


def build_vision(config: VisionConfig, dtype=jnp.float32,
                 rngs: Optional[nnx.Rngs] = None) -> nnx.Module:
  """A freshly initialised image tower of ``config``."""
  return vision_tower(config).build(config, dtype=dtype,
                                    rngs=rngs if rngs is not None else nnx.Rngs(0))


def build_model(config: ModelConfig, dtype=jnp.float32,
                rngs: Optional[nnx.Rngs] = None) -> flair.FLAIRTowers:
  """A freshly initialised FLAIR model of ``config``'s shape (train mode).

  The image tower draws from ``rngs`` first, then the rest of the model.
  """
  if isinstance(config, Mapping):
    config = ModelConfig.from_dict(config)
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  return flair.FLAIRTowers(
      build_vision(config.vision, dtype, rngs), config.bert, proj_dim=config.proj_dim,
      projection=config.projection, norm=config.norm, text_pooling=config.text_pooling,
      logit_scale_init_value=config.logit_scale_init_value, dtype=dtype, rngs=rngs)


def torch_rows(config: ModelConfig) -> tuple:
  """The PyTorch FLAIRModel key table of ``config``'s towers."""
  return flair.torch_rows(vision_tower(config.vision).torch_rows)
