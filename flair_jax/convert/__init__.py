"""Weights between flair_jax and PyTorch: FLAIR, torchvision ResNet, HF BERT.

Command line: ``python -m flair_jax.convert {to-torch,from-torch} ...``.
"""

from flair_jax.convert.flair_torch import (export_to_torch, from_torch_state, hub_config,
                                     import_from_torch, read_torch_flair, to_torch_state)
from flair_jax.convert.pretrained import load_hf_bert, load_vision_weights
from flair_jax.convert.table import KeyMismatchError

__all__ = ['KeyMismatchError', 'export_to_torch', 'from_torch_state', 'hub_config',
           'import_from_torch', 'load_hf_bert', 'load_vision_weights',
           'read_torch_flair', 'to_torch_state']
