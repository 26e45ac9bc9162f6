"""A model's state as a nested dict (the ``nnx.to_pure_dict`` form): read it,
describe its shapes without allocating, write one into a model.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.console import UserError
from flair_jax import trees
from flair_jax.models.config import ModelConfig
from flair_jax.models.factory import build_model


class StateMismatchError(UserError, ValueError):
  """A state that does not fit the model it is meant for."""


def model_state(model: nnx.Module) -> dict:
  """The checkpoint item: nested dict of all parameters and BatchNorm stats."""
  return nnx.to_pure_dict(nnx.state(model))


def abstract_state(module_fn, sharding=None) -> dict:
  """Nested ``ShapeDtypeStruct`` state of ``module_fn()``, nothing allocated.

  ``sharding`` (default: the first device) is attached to every leaf, as
  orbax restores need.
  """
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = nnx.to_pure_dict(nnx.state(nnx.eval_shape(module_fn)))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), state)


def abstract_model_state(config: ModelConfig, sharding=None) -> dict:
  """:func:`abstract_state` of the FLAIR model of ``config``."""
  return abstract_state(lambda: build_model(config), sharding)


def assign_state(module: nnx.Module, state: Mapping) -> None:
  """Writes a nested state dict (arrays) into ``module`` in place.

  Raises:
    StateMismatchError: naming every path whose presence or shape differs.
  """
  current = nnx.state(module)
  have = {k: np.shape(v) for k, v in trees.flatten(nnx.to_pure_dict(current)).items()}
  got = {k: np.shape(v) for k, v in trees.flatten(state).items()}
  problems = trees.mismatches(
      have, got, describe=lambda k, found, want: f'{k} has shape {found}, expected {want}')
  if problems:
    raise StateMismatchError(f'state does not fit {type(module).__name__}: '
                             + '; '.join(problems.lines()))
  nnx.replace_by_pure_dict(current, jax.tree.map(jnp.asarray, dict(state)))
  nnx.update(module, current)
