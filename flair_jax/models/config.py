"""What shapes a FLAIR model: the image tower's config, the text tower's
(``BertConfig``), and the settings of the two-tower model and its inputs.

``ModelConfig.to_dict`` is the content of ``model_config.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from data_pipelines import captions as captions_lib
from data_pipelines.console import UserError
from flair_jax.models.bert import BertConfig
from flair_jax.models.resnet import RESNET50_STAGES

DEFAULT_BERT_TYPE = 'emilyalsentzer/Bio_ClinicalBERT'
# Keys of model_config.json before the image tower had its own config.
_LEGACY_VISION_KEYS = {'resnet_stages': 'stages', 'resnet_width': 'width'}


class ModelConfigError(UserError, ValueError):
  """A model config that names keys or values no model has."""


def _check_keys(d: Mapping, known: set, what: str) -> None:
  unknown = sorted(set(d) - known)
  if unknown:
    raise ModelConfigError(f'{what} has unknown keys {unknown}; expected some of {sorted(known)}')


# Input normalisations by name (``model.vision_norm``): timm's augreg ViTs
# take 0.5/0.5 (IMAGENET_INCEPTION), most other ImageNet weights ImageNet's
# mean/std; FLAIR's ResNet takes its [0, 1] input as it is.
PIXEL_NORMS = {
    'none': ((), ()),
    'inception': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    'imagenet': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# The normalisation of each tower type's usual weights, when none is given.
DEFAULT_PIXEL_NORM = {'resnet': 'none', 'vit': 'inception'}
_RESNET_FIELDS = ('stages', 'width')
_VIT_FIELDS = ('image_size', 'patch_size', 'embed_dim', 'depth', 'heads', 'mlp_ratio', 'pool')


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The image tower.

  Attributes:
    type: which tower (``flair_jax.models.factory.VISION_TOWERS``).
    stages, width: a ResNet's bottlenecks per stage and stem width
      (ResNet-50 by default).
    image_size, patch_size, embed_dim, depth, heads, mlp_ratio, pool: a
      ViT's input side (the canvas is resized to it on the device), patch,
      width, blocks, heads, MLP ratio and timm ``global_pool``
      (``'token'`` / ``'avg'``); ViT-B/16 at 224 by default.
    pixel_mean, pixel_std: normalisation of the [0, 1] input inside the
      tower (empty: none); ``None`` takes the type's default
      (:data:`DEFAULT_PIXEL_NORM`).
    remat: rematerialise each block in the backward pass (a ViT's; not
      saved with the model).
  """
  type: str = 'resnet'
  stages: tuple = RESNET50_STAGES
  width: int = 64
  image_size: int = 224
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  pool: str = 'token'
  pixel_mean: Optional[tuple] = None
  pixel_std: Optional[tuple] = None
  remat: bool = dataclasses.field(default=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, 'stages', tuple(int(s) for s in self.stages))
    if self.pixel_mean is None or self.pixel_std is None:
      mean, std = PIXEL_NORMS[DEFAULT_PIXEL_NORM.get(self.type, 'none')]
      object.__setattr__(self, 'pixel_mean', mean if self.pixel_mean is None else self.pixel_mean)
      object.__setattr__(self, 'pixel_std', std if self.pixel_std is None else self.pixel_std)
    object.__setattr__(self, 'pixel_mean', tuple(float(v) for v in self.pixel_mean))
    object.__setattr__(self, 'pixel_std', tuple(float(v) for v in self.pixel_std))
    if len(self.pixel_mean) not in (0, 3) or len(self.pixel_std) != len(self.pixel_mean):
      raise ModelConfigError(f'pixel_mean {self.pixel_mean} and pixel_std {self.pixel_std} '
                             'must both hold 3 values (RGB) or both be empty')

  def to_dict(self) -> dict:
    """The fields of this type's tower (a ResNet's without normalisation
    as before: ``type``, ``stages``, ``width``)."""
    d = dict(type=self.type)
    for name in _VIT_FIELDS if self.type == 'vit' else _RESNET_FIELDS:
      value = getattr(self, name)
      d[name] = list(value) if isinstance(value, tuple) else value
    if self.pixel_mean or self.type == 'vit':
      d.update(pixel_mean=list(self.pixel_mean), pixel_std=list(self.pixel_std))
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> 'VisionConfig':
    _check_keys(d, {f.name for f in dataclasses.fields(cls)} - {'remat'}, 'vision config')
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything needed to rebuild a FLAIR model and its text inputs.

  Attributes:
    bert: shape of the text tower.
    bert_type: Hugging Face id or local folder of the text tower's tokenizer
      (and of its original weights).
    vision: the image tower (ResNet-50 by default).
    proj_dim, projection, norm, text_pooling, logit_scale_init_value: as
      :class:`flair_jax.models.FLAIRTowers`.
    image_size: side of the square input canvas.
    caption: the prompt template, ``[CLS]`` replaced by a class name.
  """
  bert: BertConfig = BertConfig()
  bert_type: str = DEFAULT_BERT_TYPE
  vision: VisionConfig = VisionConfig()
  proj_dim: int = 512
  projection: bool = True
  norm: bool = True
  text_pooling: str = 'flair'
  logit_scale_init_value: float = 0.07
  image_size: int = 512
  caption: str = captions_lib.PROMPT_TEMPLATE

  def to_dict(self) -> dict:
    """The ``model_config.json`` form: towers as ``bert_config`` / ``vision_config``."""
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d['bert_config'] = d.pop('bert').to_dict()
    d['vision_config'] = d.pop('vision').to_dict()
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> 'ModelConfig':
    """Reads :meth:`to_dict`'s form, and the older one whose ResNet shape
    is ``resnet_stages`` / ``resnet_width`` at the top level."""
    d = dict(d)
    known = ({f.name for f in dataclasses.fields(cls)} - {'bert', 'vision'}
             | {'bert_config', 'vision_config'} | set(_LEGACY_VISION_KEYS))
    _check_keys(d, known, 'model config')
    legacy = {new: d.pop(old) for old, new in _LEGACY_VISION_KEYS.items() if old in d}
    if legacy and 'vision_config' in d:
      raise ModelConfigError(f'model config has both vision_config and '
                             f'{sorted(_LEGACY_VISION_KEYS)}; keep only vision_config')
    if 'bert_config' in d:
      d['bert'] = BertConfig.from_dict(d.pop('bert_config'))
    if legacy or 'vision_config' in d:
      d['vision'] = VisionConfig.from_dict(d.pop('vision_config', legacy))
    return cls(**d)
