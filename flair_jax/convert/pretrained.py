"""Initial tower weights for pre-training: torchvision ResNet, Hugging Face BERT.

Both return a nested state dict (NumPy arrays, keyed like
``nnx.to_pure_dict``) for one tower; write it into a model with
``flair_jax.checkpoint.assign_state(model.vision_model, state)`` (or
``model.text_model``).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from flax import nnx

from flair_jax import trees
from flair_jax.checkpoint import abstract_state
from flair_jax.convert import table, torch_io
from flair_jax.models import RESNET50_STAGES, Bert, BertConfig, ResNet

BERT_PREFIX = 'bert.'
HEADS_PREFIX = 'cls.'  # BertForPreTraining / BertForMaskedLM heads


def _convert(tbl, module_fn, sd, extras, what):
  like = abstract_state(module_fn)
  flat = table.from_torch(tbl, trees.flatten(like), sd, extras, what)
  return trees.unflatten(flat, like)


def load_torchvision_resnet(path: str, stages: Sequence[int] = RESNET50_STAGES,
                            width: int = 64) -> dict:
  """Image tower state from a torchvision ResNet state dict file.

  Args:
    path: ``.pth`` (e.g. torchvision's ``resnet50-11ad3fa6.pth``) or
      ``.safetensors``; the ``fc`` classifier is dropped.
    stages, width: the ResNet's shape (ResNet-50 by default).
  Returns:
    Nested state of :class:`flair_jax.models.ResNet`.
  """
  sd = torch_io.read_state_dict(path)
  return _convert(table.RESNET, lambda: ResNet(stages, width, rngs=nnx.Rngs(0)), sd,
                  table.RESNET_EXTRAS, f'ResNet weights {path}')


def bert_state_dict(sd: dict) -> dict:
  """Drops the ``bert.`` prefix and exactly the ``cls.*`` pre-training heads."""
  return {k[len(BERT_PREFIX):] if k.startswith(BERT_PREFIX) else k: v
          for k, v in sd.items() if not k.startswith(HEADS_PREFIX)}


def read_bert_config(folder: str) -> BertConfig:
  """``BertConfig`` of a Hugging Face folder; refuses other model types."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{folder} has no config.json; expected a Hugging Face BERT folder')
  with open(path) as f:
    d = json.load(f)
  if d.get('model_type', 'bert') != 'bert':
    raise ValueError(f'{path}: model_type {d["model_type"]!r} is not supported; expected "bert"')
  return BertConfig.from_dict(d)


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
  state = _convert(table.BERT, lambda: Bert(cfg, rngs=nnx.Rngs(0)), sd,
                   table.BERT_EXTRAS, f'BERT weights in {folder}')
  return cfg, state
