"""What shapes a FLAIR model: the image tower's config, the text tower's
(``BertConfig``), and the settings of the two-tower model and its inputs.

``ModelConfig.to_dict`` is the content of ``model_config.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

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


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The image tower.

  Attributes:
    type: which tower (``flair_jax.models.factory.VISION_TOWERS``).
    stages, width: a ResNet's bottlenecks per stage and stem width
      (ResNet-50 by default).
  """
  type: str = 'resnet'
  stages: tuple = RESNET50_STAGES
  width: int = 64

  def __post_init__(self):
    object.__setattr__(self, 'stages', tuple(int(s) for s in self.stages))

  def to_dict(self) -> dict:
    return dict(type=self.type, stages=list(self.stages), width=self.width)

  @classmethod
  def from_dict(cls, d: Mapping) -> 'VisionConfig':
    _check_keys(d, {f.name for f in dataclasses.fields(cls)}, 'vision config')
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
