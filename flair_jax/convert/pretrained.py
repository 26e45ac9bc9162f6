"""Initial tower weights for pre-training: an image tower's own PyTorch
checkpoint (torchvision ResNet, timm ViT), a Hugging Face BERT.

Both return a nested state dict (NumPy arrays, keyed like
``nnx.to_pure_dict``) for one tower; write it into a model with
``flair_jax.models.state.assign_state(model.vision_model, state)`` (or
``model.text_model``).
"""

from __future__ import annotations

import json
import os

from flax import nnx

from flair_jax import trees
from flair_jax.convert import table, torch_io
from flair_jax.models import bert as bert_lib
from flair_jax.models.factory import build_vision, vision_tower
from flair_jax.models.config import VisionConfig
from flair_jax.models.state import abstract_state

BERT_PREFIX = 'bert.'
HEADS_PREFIX = 'cls.'  # BertForPreTraining / BertForMaskedLM heads


def _convert(rows, module_fn, sd, extras, what):
  like = abstract_state(module_fn)
  flat = table.from_torch(rows, trees.flatten(like), sd, extras, what)
  return trees.unflatten(flat, like)


def load_vision_weights(path: str, config: VisionConfig) -> dict:
  """Image tower state from the tower's own PyTorch state dict file.

  Args:
    path: ``.pth`` or ``.safetensors``; for a ResNet, torchvision's (e.g.
      ``resnet50-11ad3fa6.pth``), whose ``fc`` classifier is dropped; for a
      ViT, timm's (``head`` dropped; a position embedding of another patch
      grid is resampled as timm does on load).
    config: the tower's shape (ResNet-50 for ``VisionConfig()``).
  Returns:
    Nested state of the tower ``models.factory.build_vision(config)`` builds.
  """
  tower = vision_tower(config)
  sd = tower.prepare_torch(torch_io.read_state_dict(path), config)
  return _convert(tower.torch_rows, lambda: build_vision(config, rngs=nnx.Rngs(0)), sd,
                  tower.torch_extras, f'{tower.name} weights {path}')


def bert_state_dict(sd: dict) -> dict:
  """Drops the ``bert.`` prefix and exactly the ``cls.*`` pre-training heads."""
  return {k[len(BERT_PREFIX):] if k.startswith(BERT_PREFIX) else k: v
          for k, v in sd.items() if not k.startswith(HEADS_PREFIX)}


def read_bert_config(folder: str) -> bert_lib.BertConfig:
  """``BertConfig`` of a Hugging Face folder; refuses other model types."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{folder} has no config.json; expected a Hugging Face BERT folder')
  with open(path) as f:
    d = json.load(f)
  if d.get('model_type', 'bert') != 'bert':
    raise ValueError(f'{path}: model_type {d["model_type"]!r} is not supported; expected "bert"')
  return bert_lib.BertConfig.from_dict(d)


def load_hf_bert(name_or_path: str) -> tuple:
  """Text tower config and state from a Hugging Face BERT folder or hub id.

  Accepts ``BertModel`` keys with or without the ``bert.`` prefix, ignores
  the ``cls.*`` pre-training heads and the ``embeddings.position_ids``
  buffer of older transformers; anything else must match exactly.

  Returns:
    ``(BertConfig, nested state of flair_jax.models.Bert)``.
  """
  folder = torch_io.resolve_hf_folder(name_or_path)
  cfg = read_bert_config(folder)
  sd = bert_state_dict(torch_io.read_hf_weights(folder))
  state = _convert(bert_lib.TORCH_ROWS, lambda: bert_lib.Bert(cfg, rngs=nnx.Rngs(0)), sd,
                   bert_lib.TORCH_EXTRAS, f'BERT weights in {folder}')
  return cfg, state
