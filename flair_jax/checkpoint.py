"""flair_jax checkpoints: the model's state in orbax plus ``model_config.json``.

Layout (every form holds an orbax item folder ``model/`` with the nested
state dict of :func:`flair_jax.models.state.model_state`: all parameters and
BatchNorm statistics, keyed like ``nnx.to_pure_dict``)::

  MODEL_DIR/                      save_model(), convert from-torch
    model/                        orbax StandardCheckpointer item
    model_config.json             ModelConfig.to_dict()
  WORKDIR/                        the trainer (orbax CheckpointManager)
    model_config.json             or inside each step folder
    checkpoints/<step>/model/     item 'model'; other items may sit beside it

:func:`resolve_checkpoint` accepts any of: a model folder, a step folder,
``WORKDIR/checkpoints`` or ``WORKDIR`` (its highest finished step).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.jsonio import write_json
from flair_jax import trees
from flair_jax.models import FLAIRTowers, ModelConfig, build_model
from flair_jax.models.state import (StateMismatchError, abstract_model_state, assign_state,
                                    model_state)

MODEL_ITEM = 'model'
CONFIG_FILE = 'model_config.json'
CHECKPOINTS_DIR = 'checkpoints'
# Written by orbax last, when every item of a step is complete.
COMMIT_MARKER = 'commit_success.txt'


@contextlib.contextmanager
def atomic_directory(directory: str):
  """Yields a fresh sibling folder that becomes ``directory`` on success.

  On any error the sibling is removed: nothing half-written remains.
  ``directory`` must not exist, or be an empty folder.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
    raise FileExistsError(f'{directory} already exists and is not empty; '
                          'choose a new output folder')
  parent = os.path.dirname(directory)
  if not os.path.isdir(parent):
    raise FileNotFoundError(f'parent folder {parent} of the output does not exist')
  tmp = os.path.join(parent, f'.{os.path.basename(directory)}.tmp-{uuid.uuid4().hex[:12]}')
  os.mkdir(tmp)
  try:
    yield tmp
    if os.path.isdir(directory):
      os.rmdir(directory)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_state(directory: str, state: Mapping, config: ModelConfig) -> None:
  """Writes ``state`` (nested arrays) into an existing empty folder."""
  import orbax.checkpoint as ocp  # heavy; needed only here
  state = jax.tree.map(jnp.asarray, dict(state))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(os.path.abspath(directory), MODEL_ITEM), state)
    ckpt.wait_until_finished()
  save_model_config(config, os.path.join(directory, CONFIG_FILE))


def save_state(state: Mapping, config: ModelConfig, directory: str) -> str:
  """Writes a model folder atomically from a nested state dict."""
  with atomic_directory(directory) as tmp:
    write_state(tmp, state, config)
  return os.path.abspath(directory)


def save_model(model: FLAIRTowers, config: ModelConfig, directory: str) -> str:
  """Writes ``model`` as a flair_jax model folder (atomically); returns it."""
  return save_state(model_state(model), config, directory)


def is_committed(step_dir: str) -> bool:
  """Whether orbax finished writing this step folder (its commit marker)."""
  return os.path.isfile(os.path.join(step_dir, COMMIT_MARKER))


def _steps(folder: str) -> list:
  """Finished orbax steps (integer names, committed, holding an item ``model``)."""
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder)
                if n.isdigit() and os.path.isdir(os.path.join(folder, n, MODEL_ITEM))
                and is_committed(os.path.join(folder, n)))


def resolve_checkpoint(path: str) -> tuple:
  """Finds the ``model`` item folder and ``model_config.json`` of ``path``.

  Args:
    path: a model folder, a step folder ``WORKDIR/checkpoints/<step>``,
      ``WORKDIR/checkpoints`` or a training ``WORKDIR`` (highest step).
  Returns:
    ``(item_dir, config_path)``.
  Raises:
    FileNotFoundError: ``path`` is none of the above or lacks its config.
  """
  path = os.path.abspath(os.path.expanduser(str(path)))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'checkpoint {path} does not exist')
  step_dir = None
  if os.path.isdir(os.path.join(path, MODEL_ITEM)):
    step_dir = path
  else:
    for steps_dir in (os.path.join(path, CHECKPOINTS_DIR), path):
      steps = _steps(steps_dir)
      if steps:
        step_dir = os.path.join(steps_dir, str(steps[-1]))
        break
  if step_dir is None:
    raise FileNotFoundError(
        f'{path} is not a flair_jax checkpoint: expected a folder holding {MODEL_ITEM}/ '
        f'and {CONFIG_FILE}, a step folder WORKDIR/{CHECKPOINTS_DIR}/<step>/{MODEL_ITEM}/, '
        f'or a training workdir with finished steps in {CHECKPOINTS_DIR}/')
  # The config sits in the step, or in the workdir two levels up.
  candidates = [os.path.join(step_dir, CONFIG_FILE)]
  if step_dir != path or os.path.basename(os.path.dirname(step_dir)) == CHECKPOINTS_DIR:
    candidates.append(os.path.join(os.path.dirname(os.path.dirname(step_dir)), CONFIG_FILE))
  for c in candidates:
    if os.path.isfile(c):
      return os.path.join(step_dir, MODEL_ITEM), c
  raise FileNotFoundError(f'checkpoint {step_dir} has no {CONFIG_FILE}; looked at {candidates}')


def load_state(path: str, sharding=None) -> tuple:
  """Restores ``(nested state of jax arrays, ModelConfig)`` from any layout."""
  import orbax.checkpoint as ocp
  item_dir, config_path = resolve_checkpoint(path)
  config = load_model_config(config_path)
  target = abstract_model_state(config, sharding)
  problems = shape_problems(item_dir, target)
  if problems:
    raise StateMismatchError(f'checkpoint {item_dir} does not fit the model of {config_path}: '
                             + '; '.join(problems))
  with ocp.StandardCheckpointer() as ckpt:
    state = ckpt.restore(item_dir, target)
  return state, config


def shape_problems(item_dir: str, target: Mapping) -> list:
  """Every path whose presence, shape or dtype differs between the orbax item
  ``item_dir`` (read from its metadata, no arrays) and nested ``target``.

  Raises:
    whatever orbax raises when the metadata cannot be read (a damaged item).
  """
  import orbax.checkpoint as ocp
  from etils import epath
  # The handler reads the item's own metadata (the checkpointer would also
  # look for, and warn about, step metadata that an item folder does not have).
  stored = _stored_shapes(ocp.StandardCheckpointHandler().metadata(epath.Path(item_dir)))
  want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in trees.flatten(target).items()}
  return trees.mismatches(want, stored, describe=_describe_difference).lines()


def _describe_difference(path: str, found: tuple, want: tuple) -> str:
  (found_shape, found_dtype), (want_shape, want_dtype) = found, want
  return f'{path} is {found_dtype}{list(found_shape)}, expected {want_dtype}{list(want_shape)}'


def _stored_shapes(metadata) -> dict:
  """``{path: (shape, dtype)}`` of an orbax item's metadata tree."""
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if hasattr(v, 'shape'):
        out[f'{prefix}{k}'] = (tuple(v.shape), np.dtype(v.dtype))
      else:
        walk(v, f'{prefix}{k}/')

  walk(getattr(metadata, 'item_metadata', metadata), '')
  return out


def load_model(path: str, dtype=jnp.float32) -> tuple:
  """Rebuilds ``(model, ModelConfig)`` from a checkpoint; model in eval mode."""
  state, config = load_state(path)
  model = nnx.eval_shape(lambda: build_model(config, dtype))
  assign_state(model, state)
  model.eval()
  return model, config


def save_model_config(config: ModelConfig, path: str) -> None:
  """Writes ``model_config.json`` (atomically)."""
  write_json(path, config.to_dict())


def load_model_config(path: str) -> ModelConfig:
  """Reads a ``model_config.json``."""
  with open(path) as f:
    return ModelConfig.from_dict(json.load(f))
