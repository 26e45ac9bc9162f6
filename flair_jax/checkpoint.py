"""flair_jax checkpoints: the model's state in orbax plus ``model_config.json``.

Layout (every form holds an orbax item folder ``model/`` with the nested
state dict of :func:`model_state`: all parameters and BatchNorm statistics,
keyed like ``nnx.to_pure_dict``)::

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
import dataclasses
import json
import os
import shutil
import uuid
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines import captions as captions_lib
from data_pipelines.console import UserError
from data_pipelines.jsonio import write_json
from flair_jax import trees
from flair_jax.models import FLAIR, RESNET50_STAGES, BertConfig

MODEL_ITEM = 'model'
CONFIG_FILE = 'model_config.json'
CHECKPOINTS_DIR = 'checkpoints'
# Written by orbax last, when every item of a step is complete.
COMMIT_MARKER = 'commit_success.txt'
DEFAULT_BERT_TYPE = 'emilyalsentzer/Bio_ClinicalBERT'
DEFAULT_CAPTION = captions_lib.PROMPT_TEMPLATE


class MismatchError(UserError, ValueError):
  """A state or config that does not fit the model it is meant for."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything needed to rebuild a FLAIR model and its text inputs.

  Attributes:
    bert: shape of the text tower.
    bert_type: Hugging Face id or local folder of the text tower's tokenizer
      (and of its original weights).
    resnet_stages, resnet_width: shape of the image tower (ResNet-50 default).
    proj_dim, projection, norm, text_pooling, logit_scale_init_value: as
      :class:`flair_jax.models.FLAIR`.
    image_size: side of the square input canvas.
    caption: the prompt template, ``[CLS]`` replaced by a class name.
  """
  bert: BertConfig = BertConfig()
  bert_type: str = DEFAULT_BERT_TYPE
  resnet_stages: tuple = RESNET50_STAGES
  resnet_width: int = 64
  proj_dim: int = 512
  projection: bool = True
  norm: bool = True
  text_pooling: str = 'flair'
  logit_scale_init_value: float = 0.07
  image_size: int = 512
  caption: str = DEFAULT_CAPTION

  def __post_init__(self):
    object.__setattr__(self, 'resnet_stages', tuple(int(s) for s in self.resnet_stages))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d['bert_config'] = self.bert.to_dict()
    del d['bert']
    d['resnet_stages'] = list(self.resnet_stages)
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> 'ModelConfig':
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)} - {'bert'} | {'bert_config'}
    unknown = sorted(set(d) - known)
    if unknown:
      raise MismatchError(f'model config has unknown keys {unknown}; '
                          f'expected some of {sorted(known)}')
    if 'bert_config' in d:
      d['bert'] = BertConfig.from_dict(d.pop('bert_config'))
    return cls(**d)



def build_model(config: ModelConfig, dtype=jnp.float32, rngs: Optional[nnx.Rngs] = None) -> FLAIR:
  """A freshly initialised FLAIR of ``config``'s shape (train mode)."""
  if isinstance(config, Mapping):
    config = ModelConfig.from_dict(config)
  return FLAIR(config.bert, resnet_stages=config.resnet_stages,
               resnet_width=config.resnet_width, proj_dim=config.proj_dim,
               projection=config.projection, norm=config.norm,
               text_pooling=config.text_pooling,
               logit_scale_init_value=config.logit_scale_init_value,
               dtype=dtype, rngs=rngs if rngs is not None else nnx.Rngs(0))


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
    ValueError: naming every path whose presence or shape differs.
  """
  current = nnx.state(module)
  have = {k: np.shape(v) for k, v in trees.flatten(nnx.to_pure_dict(current)).items()}
  got = {k: np.shape(v) for k, v in trees.flatten(state).items()}
  problems = ([f'missing {k}' for k in have if k not in got]
              + [f'unexpected {k}' for k in got if k not in have]
              + [f'{k} has shape {got[k]}, expected {have[k]}'
                 for k in have if k in got and got[k] != have[k]])
  if problems:
    raise MismatchError(f'state does not fit {type(module).__name__}: ' + '; '.join(problems))
  nnx.replace_by_pure_dict(current, jax.tree.map(jnp.asarray, dict(state)))
  nnx.update(module, current)


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


def save_model(model: FLAIR, config: ModelConfig, directory: str) -> str:
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
    raise MismatchError(f'checkpoint {item_dir} does not fit the model of {config_path}: '
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
  return ([f'missing {k}' for k in want if k not in stored]
          + [f'unexpected {k}' for k in stored if k not in want]
          + [f'{k} is {_spec(*stored[k])}, expected {_spec(*want[k])}'
             for k in want if k in stored and stored[k] != want[k]])


def _spec(shape, dtype) -> str:
  return f'{dtype}{list(shape)}'


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
