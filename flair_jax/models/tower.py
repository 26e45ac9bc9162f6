"""What an image tower module declares so that the rest of the package can
build, convert and name it without knowing which tower it is."""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping


@dataclasses.dataclass(frozen=True)
class VisionTower:
  """One kind of image tower (``VisionConfig.type``).

  The module ``build`` returns maps ``[B, H, W, 3]`` float images in [0, 1]
  to ``[B, out_features]`` float32 features and has an ``out_features``
  attribute.

  Attributes:
    name: the tower's name in messages.
    build: ``build(vision_config, *, dtype, rngs)`` -> the tower module.
    torch_rows: the tower's PyTorch key table (``models.torch_keys.Row``s).
    torch_extras: keys of the tower's own pre-trained PyTorch checkpoints
      that are dropped on load (e.g. an ImageNet classifier).
    hub_types: PyTorch FLAIR ``vision_type`` names this tower reads; the
      first is the one exports write.
    shape_from_torch: ``shape_from_torch(shapes)`` -> the ``VisionConfig``
      fields (besides ``type``) of a tower state dict given as
      ``{torch_key: shape}``, keys without any prefix.
    prepare_torch: ``prepare_torch(state_dict, vision_config)`` -> the
      tower's own pre-trained state dict fitted to the config before it is
      converted (e.g. a ViT's position embedding resampled to its patch
      grid); default: unchanged.
  """
  name: str
  build: Callable
  torch_rows: tuple
  torch_extras: tuple
  hub_types: tuple
  shape_from_torch: Callable[[Mapping[str, tuple]], dict]
  prepare_torch: Callable = lambda sd, config: sd
