"""Reading and writing PyTorch-side files as NumPy state dicts.

``.safetensors`` needs no torch (``safetensors.numpy``). ``.pth`` / ``.bin``
need the ``torch`` extra and are read with ``torch.load(weights_only=True)``:
a pickle that would build anything but tensors is refused. Floating tensors
of any precision (bf16, f16, f64) become float32.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from typing import Mapping

import numpy as np

from data_pipelines.console import UserError

SAFETENSORS = 'model.safetensors'
PTH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
# Weight files of a Hugging Face folder, in order of preference.
HF_WEIGHTS = ('model.safetensors', 'model.safetensors.index.json',
              'pytorch_model.bin', 'pytorch_model.bin.index.json')
TOKENIZER_FILES = ('vocab.txt', 'tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json', 'added_tokens.json')
_HUB_PATTERNS = ['*.json', '*.txt', '*.safetensors', 'pytorch_model.bin']


class TorchMissingError(UserError, ImportError):
  """A ``.pth`` file was asked for and PyTorch is not installed."""


def require_torch():
  """Imports torch or explains how to get it."""
  try:
    import torch
  except ImportError as e:
    raise TorchMissingError('.pth files need PyTorch: pip install "flair_jax[torch]" '
                            '(safetensors files do not)') from e
  return torch


def torch_available() -> bool:
  """Whether ``import torch`` works here."""
  try:
    require_torch()
  except Exception:  # pylint: disable=broad-except  # ImportError, or a broken install
    return False
  return True


def _as_numpy(a: np.ndarray) -> np.ndarray:
  # Integers and booleans stay; every float (incl. ml_dtypes bfloat16) -> f32.
  return a if a.dtype.kind in 'iub' else a.astype(np.float32)


def _read_safetensors(path: str) -> dict:
  from safetensors import SafetensorError
  from safetensors.numpy import load_file
  try:
    sd = load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise ValueError(f'{path} is not a readable safetensors file '
                     f'(truncated or corrupt?): {e}') from None
  return {k: _as_numpy(v) for k, v in sd.items()}


def _read_pth(path: str) -> dict:
  torch = require_torch()
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
        f'refused to load {path}: it is a pickle holding more than tensors, and '
        'unpickling it could run code (torch.load(weights_only=True) rejected it: '
        f'{reason}). Re-save it as a plain state dict of tensors or as safetensors.') from None
  except Exception as e:  # zip or pickle damage
    raise ValueError(f'{path} is not a readable PyTorch file '
                     f'(truncated or corrupt?): {e}') from None
  if not isinstance(obj, Mapping) or not all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
    raise ValueError(f'{path} does not hold a flat state dict {{name: tensor}}')
  out = {}
  for k, t in obj.items():
    t = t.detach().cpu()
    if t.is_floating_point():
      t = t.to(torch.float32)
    out[k] = t.numpy()
  return out


def read_state_dict(path: str) -> dict:
  """A ``.safetensors`` or ``.pth``-like file -> ``{key: np.ndarray}``."""
  path = os.path.expanduser(str(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'weights file {path} does not exist')
  if path.endswith('.safetensors'):
    return _read_safetensors(path)
  if path.endswith(PTH_SUFFIXES):
    return _read_pth(path)
  raise ValueError(f'{path}: unknown weights format; expected .safetensors '
                   f'or one of {PTH_SUFFIXES}')


def read_hf_weights(folder: str) -> dict:
  """The weights of a Hugging Face folder (single file or sharded)."""
  for name in HF_WEIGHTS:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      continue
    if not name.endswith('.index.json'):
      return read_state_dict(path)
    with open(path) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    sd = {}
    for shard in shards:
      sd.update(read_state_dict(os.path.join(folder, shard)))
    return sd
  raise FileNotFoundError(f'{folder} holds no weights; expected one of {HF_WEIGHTS}')


def write_safetensors(path: str, sd: Mapping[str, np.ndarray]) -> None:
  from safetensors.numpy import save_file
  save_file({k: np.array(v, order='C') for k, v in sd.items()}, path, metadata={'format': 'pt'})


def write_pth(path: str, sd: Mapping[str, np.ndarray]) -> None:
  torch = require_torch()
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, path)


def _looks_like_path(name: str) -> bool:
  return (name.startswith(('/', '.', '~')) or '\\' in name or name.count('/') > 1
          or name.endswith('/'))


def resolve_hf_folder(name_or_path: str) -> str:
  """A local folder for a Hugging Face model: the path itself or a hub snapshot.

  A hub id is looked up in the local cache first, then downloaded.

  Raises:
    FileNotFoundError: neither a folder nor a reachable hub model.
  """
  name = os.path.expanduser(str(name_or_path))
  if os.path.isdir(name):
    return os.path.abspath(name)
  if os.path.exists(name):
    raise NotADirectoryError(f'{name} is a file; expected a Hugging Face model folder '
                             '(config.json, weights, tokenizer files)')
  if _looks_like_path(name):
    raise FileNotFoundError(f'model folder {name} does not exist')
  from huggingface_hub import snapshot_download
  try:
    return snapshot_download(name, local_files_only=True, allow_patterns=_HUB_PATTERNS)
  except Exception:  # not cached (or not a valid id): try the hub
    pass
  try:
    return snapshot_download(name, allow_patterns=_HUB_PATTERNS)
  except Exception as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise FileNotFoundError(
        f'{name_or_path!r} is not a local folder, not in the Hugging Face cache, and could not '
        f'be downloaded ({type(e).__name__}: {reason}). Offline, pass a local folder holding '
        'config.json, model.safetensors or pytorch_model.bin, and the tokenizer files.') from None


def copy_tokenizer(src: str, dst: str) -> list:
  """Copies the tokenizer files of folder ``src`` into ``dst``; returns them."""
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
  if not names:
    raise FileNotFoundError(f'{src} holds no tokenizer files; expected some of {TOKENIZER_FILES}')
  for n in names:
    shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
  return names
