"""Whole-model conversion between flair_jax checkpoints and PyTorch FLAIR.

PyTorch FLAIR exports come in two forms, both with the 520 keys of
``FLAIRModel.state_dict()`` (Bio_ClinicalBERT text tower):

* ``hf``: ``model.safetensors`` + ``config.json`` holding the ``FLAIRModel``
  constructor arguments, as ``PyTorchModelHubMixin`` saves and
  ``FLAIRModel.from_pretrained(folder)`` loads;
* ``pth``: ``flair.pth``, a plain state dict for ``load_state_dict``.

An export of a ViT image tower (which PyTorch FLAIR does not build) also
holds each part in its library's own form: ``image_encoder.safetensors``
(what ``timm.create_model(name, num_classes=0, img_size=S)`` loads
strictly), the text tower as a Hugging Face BERT folder ``text_encoder/``,
and ``heads.safetensors`` (the projections and the log-temperature);
``config.json`` names them (``image_encoder``, ``text_encoder``, ``heads``)
with the timm model, its arguments and the input normalisation.
``flair_jax.torch_model.load_flair_torch`` reads either form.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping, Optional

import numpy as np

from data_pipelines.console import UserError
from data_pipelines.jsonio import write_json
from flair_jax import checkpoint, trees
from flair_jax.convert import table, torch_io
from flair_jax.convert.pretrained import read_bert_config
from flair_jax.models import DEFAULT_BERT_TYPE, BertConfig, ModelConfig, VisionConfig, factory, vit
from flair_jax.models.flair import TEXT_TORCH_PREFIX, TORCH_EXTRAS, VISION_TORCH_PREFIX
from flair_jax.models.state import abstract_model_state

FORMATS = ('hf', 'pth', 'both')
PTH_FILE = 'flair.pth'
HUB_CONFIG = 'config.json'
TEXT_ENCODER = 'text_encoder'
IMAGE_ENCODER_FILE = 'image_encoder.safetensors'
HEADS_FILE = 'heads.safetensors'
HEAD_KEYS = {'vision_projection.weight': 'vision_model.projection_head_vision.projection.weight',
             'text_projection.weight': 'text_model.projection_head_text.projection.weight',
             'logit_scale': 'logit_scale'}
# PyTorch FLAIR's vision_type when config.json names none.
DEFAULT_HUB_VISION_TYPE = 'resnet_v1'
_log = logging.getLogger(__name__)


class ExportError(UserError, ValueError):
  """An export that cannot be written as asked (the message says what to add)."""
_BERT_SHAPE = ('vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
               'intermediate_size', 'max_position_embeddings', 'type_vocab_size')


def hub_config(config: ModelConfig, bert_type: str) -> dict:
  """``FLAIRModel`` constructor arguments, as ``config.json`` of the hub form
  (a ViT's also names its parts, see the module docstring)."""
  vision_type = factory.vision_tower(config.vision).hub_types[0]
  d = dict(vision_type=vision_type, bert_type=bert_type, vision_pretrained=False,
           proj_dim=config.proj_dim, proj_bias=False,
           logit_scale_init_value=config.logit_scale_init_value,
           from_checkpoint=False, weights_path=None, out_path=None,
           image_size=config.image_size, caption=config.caption,
           projection=config.projection, norm_features=config.norm)
  if _has_parts(config):
    v = config.vision
    d.update(
        vision_config=v.to_dict(), text_pooling=config.text_pooling,
        image_encoder=dict(file=IMAGE_ENCODER_FILE, library='timm', timm_name=vit.timm_name(v),
                           timm_kwargs=vit.timm_kwargs(v), input_size=v.image_size,
                           mean=list(v.pixel_mean), std=list(v.pixel_std),
                           resize='bilinear, antialias'),
        text_encoder=TEXT_ENCODER, heads=HEADS_FILE)
  elif config.vision.pixel_mean:  # a normalising ResNet: PyTorch FLAIR's would not know
    d['vision_config'] = config.vision.to_dict()
  return d


def _has_parts(config: ModelConfig) -> bool:
  return config.vision.type == 'vit'


def _write_parts(folder: str, sd: Mapping) -> None:
  """The timm image tower and the heads of a FLAIR state dict ``sd``."""
  torch_io.write_safetensors(os.path.join(folder, IMAGE_ENCODER_FILE),
                             {k[len(VISION_TORCH_PREFIX):]: v for k, v in sd.items()
                              if k.startswith(VISION_TORCH_PREFIX)})
  torch_io.write_safetensors(os.path.join(folder, HEADS_FILE),
                             {k: sd[v] for k, v in HEAD_KEYS.items()})


def to_torch_state(state: Mapping, config: ModelConfig) -> dict:
  """Nested flair_jax model state of ``config``'s towers -> PyTorch FLAIR
  state dict (NumPy)."""
  flat = {k: np.asarray(v) for k, v in trees.flatten(state).items()}
  return table.to_torch(factory.torch_rows(config), flat)


def from_torch_state(sd: Mapping, config: ModelConfig, what: str = 'FLAIR state dict') -> dict:
  """PyTorch FLAIR state dict -> nested flair_jax model state (NumPy).

  Raises:
    table.KeyMismatchError: naming every missing, unexpected, mis-shaped key.
  """
  like = abstract_model_state(config)
  flat = table.from_torch(factory.torch_rows(config), trees.flatten(like), sd, TORCH_EXTRAS,
                          what)
  return trees.unflatten(flat, like)


def vision_config_from_torch(sd: Mapping, hub_vision_type: str,
                             saved: Optional[Mapping] = None) -> VisionConfig:
  """The image tower of a PyTorch FLAIR state dict: its type from the hub
  config's ``vision_type``, its shape from the weights (or the
  ``vision_config`` an export of ours wrote)."""
  if saved:
    return VisionConfig.from_dict(saved)
  vision_type = factory.vision_type_of_hub(hub_vision_type)
  tower = factory.VISION_TOWERS[vision_type]
  shapes = {k[len(VISION_TORCH_PREFIX):]: tuple(np.shape(v)) for k, v in sd.items()
            if k.startswith(VISION_TORCH_PREFIX)}
  return VisionConfig(type=vision_type, **tower.shape_from_torch(shapes))


def config_from_torch(sd: Mapping, bert: BertConfig, bert_type: str,
                      hub: Optional[Mapping] = None) -> ModelConfig:
  """The flair_jax config of a PyTorch FLAIR state dict and its hub config.

  The image tower's shape and ``proj_dim`` are read from the weights (the
  original always builds ResNet-50), the rest from ``hub``.
  """
  hub = dict(hub or {})
  if hub.get('proj_bias'):
    raise ValueError('proj_bias true is not supported: FLAIR projections have no bias')
  vision = vision_config_from_torch(sd, hub.get('vision_type', DEFAULT_HUB_VISION_TYPE),
                                    hub.get('vision_config'))
  proj = sd.get('vision_model.projection_head_vision.projection.weight')
  if vision != VisionConfig():
    _log.warning("the image tower is %s, not PyTorch FLAIR's ResNet-50",
                 factory.describe_vision(vision))
  return ModelConfig(
      bert=bert, bert_type=bert_type, vision=vision,
      proj_dim=int(hub.get('proj_dim') or (np.shape(proj)[0] if proj is not None else 512)),
      projection=bool(hub.get('projection', True)), norm=bool(hub.get('norm_features', True)),
      logit_scale_init_value=float(hub.get('logit_scale_init_value', 0.07)),
      text_pooling=hub.get('text_pooling', 'flair'), image_size=int(hub.get('image_size', 512)),
      caption=hub.get('caption', ModelConfig.caption))


def read_torch_flair(path: str, bert_type: Optional[str] = None) -> tuple:
  """Reads a PyTorch FLAIR export: ``(nested state, ModelConfig)``.

  Args:
    path: a ``.pth`` / ``.safetensors`` state dict, or a hub-form folder.
    bert_type: text tower folder or hub id; default: the folder's
      ``config.json``, else FLAIR's default Bio_ClinicalBERT.
  """
  path = os.path.expanduser(str(path))
  hub = {}
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, HUB_CONFIG)):
      with open(os.path.join(path, HUB_CONFIG)) as f:
        hub = json.load(f)
    sd = torch_io.read_hf_weights(path)
  elif os.path.exists(path):
    sd = torch_io.read_state_dict(path)
  else:
    raise FileNotFoundError(f'input {path} does not exist; expected a FLAIR .pth file or a '
                            'folder with config.json and model.safetensors')
  bert_type = bert_type or hub.get('bert_type') or DEFAULT_BERT_TYPE
  folder = torch_io.resolve_hf_folder(bert_type)
  local = os.path.isdir(os.path.expanduser(bert_type))
  config = config_from_torch(sd, read_bert_config(folder), folder if local else bert_type, hub)
  return from_torch_state(sd, config, f'FLAIR weights {path}'), config


def import_from_torch(path: str, out: str, bert_type: Optional[str] = None) -> str:
  """``from-torch``: a PyTorch FLAIR export -> flair_jax model folder ``out``."""
  state, config = read_torch_flair(path, bert_type)
  return checkpoint.save_state(state, config, out)


def _check_bert_type(bert_type: str, bert: BertConfig) -> None:
  folder = os.path.expanduser(bert_type)
  if not os.path.isdir(folder):
    return  # a hub id: FLAIRModel fetches it; strict loading checks shapes
  if not os.path.isfile(os.path.join(folder, 'config.json')):
    raise ExportError(
        f'the text tower was trained from scratch: {folder} holds its tokenizer but no BERT '
        'config.json, so config.json of the export could not name a loadable text tower; add '
        '--bundle-text-encoder (writes the tower into the export), or use --format pth')
  theirs = read_bert_config(folder)
  diff = [f'{k} {getattr(theirs, k)} (checkpoint: {getattr(bert, k)})'
          for k in _BERT_SHAPE if getattr(theirs, k) != getattr(bert, k)]
  if diff:
    raise ValueError(f'bert_type {bert_type} does not have the text tower of the checkpoint: '
                     + ', '.join(diff))


def _has_flair_shapes(config: ModelConfig) -> bool:
  return config.vision == VisionConfig() and config.bert.hidden_size == 768


def _warn_if_not_flair_shape(config: ModelConfig) -> None:
  if not _has_flair_shapes(config):
    _log.warning('PyTorch FLAIRModel builds ResNet-50 and a 768-wide text projection; this '
                 'export (%s, text hidden %d) loads only into a model of its own shape',
                 factory.describe_vision(config.vision), config.bert.hidden_size)
  if config.text_pooling != 'flair':
    _log.warning("text_pooling is %r; PyTorch FLAIR pools as 'flair'", config.text_pooling)


def export_to_torch(checkpoint_path: str, out: str, fmt: str = 'hf',
                    bert_type: Optional[str] = None, bundle_text_encoder: bool = False) -> str:
  """``to-torch``: a flair_jax checkpoint -> PyTorch FLAIR files in ``out``.

  Args:
    checkpoint_path: model folder, step folder or training workdir.
    out: new folder (written atomically).
    fmt: ``'hf'`` (``model.safetensors`` + ``config.json``), ``'pth'``
      (``flair.pth``, needs torch) or ``'both'`` (``flair.pth`` only where
      torch imports; otherwise one warning says how to add it).
    bert_type: overrides the checkpoint's text tower name in ``config.json``.
    bundle_text_encoder: also write ``out/text_encoder/`` (BERT config,
      tokenizer, weights) and point ``bert_type`` at it (works offline).
  Returns:
    The absolute output folder.
  """
  _check_format(fmt)
  state, config = checkpoint.load_state(checkpoint_path)
  return export_state(state, config, out, fmt, bert_type, bundle_text_encoder,
                      source=checkpoint_path)


def _check_format(fmt: str) -> None:
  if fmt not in FORMATS:
    raise ValueError(f'format {fmt!r} unknown; expected one of {FORMATS}')
  if fmt == 'pth':
    torch_io.require_torch()  # before anything is read or written


def _pth_wanted(fmt: str, source: str) -> bool:
  if fmt == 'hf':
    return False
  if fmt == 'pth' or torch_io.torch_available():
    return True
  _log.warning('%s not written: PyTorch is not installed (model.safetensors and config.json '
               'need no torch). To add it: pip install "flair_jax[torch]" && python -m '
               'flair_jax.convert to-torch --checkpoint %s --out DIR --format pth',
               PTH_FILE, source)
  return False


def export_state(state: Mapping, config: ModelConfig, out: str, fmt: str = 'hf',
                 bert_type: Optional[str] = None, bundle_text_encoder: bool = False,
                 source: str = 'CHECKPOINT') -> str:
  """:func:`export_to_torch` of a model state already in memory.

  Args:
    state: nested model state (parameters and BatchNorm statistics), host or
      device arrays, as :func:`flair_jax.models.state.model_state`.
    config: its model config.
    source: the checkpoint named in the hint when ``flair.pth`` is skipped.
    others: as :func:`export_to_torch`.
  """
  _check_format(fmt)
  with_pth = _pth_wanted(fmt, source)
  sd = to_torch_state(state, config)
  bert_type = bert_type or config.bert_type
  _warn_if_not_flair_shape(config)
  if _has_parts(config) and not bundle_text_encoder:
    _log.info('the text tower is written as a Hugging Face folder %s/ beside the timm image '
              'tower', TEXT_ENCODER)
    bundle_text_encoder = True
  out = os.path.abspath(os.path.expanduser(out))
  if bundle_text_encoder:
    text_src = torch_io.resolve_hf_folder(bert_type)
    bert_json = {}
    if os.path.isfile(os.path.join(text_src, 'config.json')):
      with open(os.path.join(text_src, 'config.json')) as f:
        bert_json = json.load(f)
    bert_json.update(config.bert.to_dict())
    bert_type = os.path.join(out, TEXT_ENCODER)
  elif fmt != 'pth':  # a bare state dict names no text tower
    _check_bert_type(bert_type, config.bert)
  with checkpoint.atomic_directory(out) as tmp:
    if fmt in ('hf', 'both'):
      torch_io.write_safetensors(os.path.join(tmp, torch_io.SAFETENSORS), sd)
    if fmt in ('hf', 'both') or _has_parts(config):
      write_json(os.path.join(tmp, HUB_CONFIG), hub_config(config, bert_type))
    if with_pth:
      torch_io.write_pth(os.path.join(tmp, PTH_FILE), sd)
    if _has_parts(config):
      _write_parts(tmp, sd)
    if bundle_text_encoder:
      text_dir = os.path.join(tmp, TEXT_ENCODER)
      os.mkdir(text_dir)
      torch_io.copy_tokenizer(text_src, text_dir)
      write_json(os.path.join(text_dir, 'config.json'), bert_json)
      torch_io.write_safetensors(
          os.path.join(text_dir, torch_io.SAFETENSORS),
          {k[len(TEXT_TORCH_PREFIX):]: v for k, v in sd.items() if k.startswith(TEXT_TORCH_PREFIX)})
  return out


def loads_into_pytorch_flair(config: ModelConfig) -> bool:
  """Whether PyTorch FLAIR's own ``FLAIRModel`` builds this export's shapes
  (ResNet-50 image tower, 768-wide BERT, FLAIR's pooling)."""
  return _has_flair_shapes(config) and config.text_pooling == 'flair'


def describe_export(config: ModelConfig) -> str:
  """One sentence for users: what the export is and what loads it."""
  if _has_parts(config):
    name = vit.timm_name(config.vision) or 'timm VisionTransformer(**timm_kwargs)'
    return (f'the image tower as {IMAGE_ENCODER_FILE} ({name}, num_classes=0, img_size='
            f'{config.vision.image_size}; strict), the text tower as the BERT folder '
            f'{TEXT_ENCODER}/, projections and temperature in {HEADS_FILE}, all named in '
            f'{HUB_CONFIG}; flair_jax.torch_model.load_flair_torch(folder) loads it')
  layout = ("PyTorch FLAIR's key layout (the 520-key FLAIRModel state dict, "
            'hub form: config.json + model.safetensors')
  if loads_into_pytorch_flair(config):
    return (f'{layout}); PyTorch FLAIR\'s FLAIRModel loads it unchanged '
            '(FLAIRModel.from_pretrained(folder))')
  return (f'{layout}); FLAIRModel loads it unchanged only for FLAIR\'s shapes (ResNet-50, '
          f'768-wide BERT); these towers ({factory.describe_vision(config.vision)}, text hidden '
          f'{config.bert.hidden_size}) load into a module of their own shape')
