"""A PyTorch FLAIR model from an export folder (``python -m flair_jax.convert
to-torch`` or a training run's ``export_torch/``), for users of PyTorch.

    from flair_jax.torch_model import load_flair_torch
    model = load_flair_torch('runs/demo/export_torch')
    probs, logits = model(image_uint8_hwc, ['normal', 'glaucoma'])

The API is PyTorch FLAIR's ``FLAIRModel.forward``: the image goes on FLAIR's
canvas (``data_pipelines.images.flair_inference_canvas``), each class name
into the caption, all captions are one padded batch pooled as FLAIR does
(mean of layers 1, 2 and last over the batch's positions), and
``logits = exp(clamped logit_scale) * img @ txt.T``. The image tower is a
torchvision ResNet or a timm ViT (resized on the canvas to its input size,
normalised as its weights expect). torch, torchvision, transformers and
(for a ViT) timm are imported only here, when this module is used.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from data_pipelines import images as images_lib
from data_pipelines.console import UserError

LOGIT_SCALE_MAX = 4.6052
VISION_PREFIX = 'vision_model.model.'
TEXT_PREFIX = 'text_model.model.'


class ExportFolderError(UserError, ValueError):
  """A folder that is not a flair_jax export PyTorch can load."""


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _resnet(sd, torch):
  import torchvision  # pylint: disable=g-import-not-at-top
  from flair_jax.models import resnet  # no JAX work: the shape rule only
  shape = resnet.shape_from_torch({k: tuple(v.shape) for k, v in sd.items()})
  if shape['width'] != 64:
    raise ExportFolderError(f'the ResNet has stem width {shape["width"]}; torchvision builds 64')
  model = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck,
                                           list(shape['stages']))
  model.fc = torch.nn.Identity()
  model.load_state_dict(sd, strict=True)
  return model


def _vit(sd, spec):
  import timm  # pylint: disable=g-import-not-at-top
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  name, kwargs = spec.get('timm_name'), dict(spec['timm_kwargs'])
  model = (timm.create_model(name, pretrained=False, **kwargs) if name
           else VisionTransformer(**kwargs))
  model.load_state_dict(sd, strict=True)
  return model


def _module_class(torch):
  F = torch.nn.functional

  class Module(torch.nn.Module):
    """The towers, heads and text pipeline of one export."""

    def __init__(self, vision, bert, tokenizer, heads, hub, norm):
      super().__init__()
      self.vision_model = vision
      self.text_model = bert
      self.vision_projection = torch.nn.Parameter(heads['vision_projection.weight'])
      self.text_projection = torch.nn.Parameter(heads['text_projection.weight'])
      self.logit_scale = torch.nn.Parameter(heads['logit_scale'])
      self.tokenizer = tokenizer
      self.image_size = int(hub.get('image_size', 512))
      self.caption = hub.get('caption', 'A fundus photograph of [CLS]')
      self.projection = bool(hub.get('projection', True))
      self.norm = bool(hub.get('norm_features', True))
      self.text_pooling = hub.get('text_pooling', 'flair')
      self.input_size, mean, std = norm
      self.register_buffer('mean', torch.tensor(mean or [0.0] * 3).view(1, 3, 1, 1))
      self.register_buffer('std', torch.tensor(std or [1.0] * 3).view(1, 3, 1, 1))

    def _project(self, x, weight):
      if not self.projection:
        return x
      if self.norm:
        x = x / x.norm(dim=-1, keepdim=True)
      x = x @ weight.t()
      return x / x.norm(dim=-1, keepdim=True) if self.norm else x

    def preprocess_image(self, image):
      """FLAIR's canvas(es) ``[B, 3, S, S]`` from uint8 image(s)."""
      batch = image if isinstance(image, (list, tuple)) or np.ndim(image) == 4 else [image]
      canvases = np.stack([images_lib.flair_inference_canvas(np.asarray(im), self.image_size)
                           for im in batch])
      return torch.from_numpy(canvases).permute(0, 3, 1, 2)

    def encode_image(self, canvases_bchw):
      x = canvases_bchw
      if self.input_size and x.shape[-1] != self.input_size:
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode='bilinear',
                          antialias=True, align_corners=False)
      x = (x - self.mean) / self.std
      return self._project(self.vision_model(x), self.vision_projection)

    def encode_text(self, texts: Sequence[str]):
      tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=77,
                              return_tensors='pt')
      out = self.text_model(input_ids=tokens['input_ids'],
                            attention_mask=tokens['attention_mask'], output_hidden_states=True)
      hidden = out.hidden_states
      layers = torch.stack([hidden[1], hidden[2], hidden[-1]])  # [3, T, L, H]
      if self.text_pooling == 'flair':  # the padded batch's positions, padding included
        pooled = layers.mean(dim=2)
      else:
        mask = tokens['attention_mask'][None, :, :, None].to(layers.dtype)
        pooled = (layers * mask).sum(2) / mask.sum(2)
      return self._project(pooled.mean(0), self.text_projection)

    def forward(self, image, texts: Sequence[str]):
      """``(probs [B, C], logits [B, C])`` NumPy, PyTorch FLAIR's ``forward``."""
      self.eval()
      with torch.no_grad():
        img = self.encode_image(self.preprocess_image(image))
        txt = self.encode_text([self.caption.replace('[CLS]', c) for c in texts])
        scale = self.logit_scale.clamp(0, LOGIT_SCALE_MAX).exp()
        logits = scale * img @ txt.t()
        return logits.softmax(dim=-1).numpy(), logits.numpy()

  return Module


def _text_folder(folder, hub):
  for candidate in (hub.get('text_encoder'), 'text_encoder', hub.get('bert_type')):
    if not candidate:
      continue
    path = candidate if os.path.isabs(candidate) else os.path.join(folder, candidate)
    if os.path.isfile(os.path.join(path, 'config.json')):
      return path
  raise ExportFolderError(f'{folder} names no local BERT folder (config.json, weights, '
                          'tokenizer); export with --bundle-text-encoder')


def load_flair_torch(folder: str):
  """The ``torch.nn.Module`` of a flair_jax export folder (ResNet or ViT).

  Args:
    folder: holds ``config.json`` and ``model.safetensors`` (PyTorch FLAIR's
      key layout), and the BERT folder it names (``text_encoder/``).
  Returns:
    A module in eval mode: ``probs, logits = model(image, class_names)``.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from flair_jax.convert import torch_io  # pylint: disable=g-import-not-at-top
  folder = os.path.abspath(os.path.expanduser(folder))
  config_path = os.path.join(folder, 'config.json')
  if not os.path.isfile(config_path):
    raise ExportFolderError(f'{folder} has no config.json; expected a flair_jax export '
                            '(python -m flair_jax.convert to-torch)')
  hub = _read_json(config_path)
  sd = {k: torch.from_numpy(np.array(v)) for k, v in torch_io.read_hf_weights(folder).items()}
  vision_sd = {k[len(VISION_PREFIX):]: v for k, v in sd.items() if k.startswith(VISION_PREFIX)}
  if hub.get('vision_type') == 'vit':
    spec = hub['image_encoder']
    vision = _vit(vision_sd, spec)
    norm = (int(spec['input_size']), spec['mean'], spec['std'])
  else:
    vision = _resnet(vision_sd, torch)
    mean = hub.get('vision_config', {}).get('pixel_mean', [])
    norm = (0, mean, hub.get('vision_config', {}).get('pixel_std', []))
  text_dir = _text_folder(folder, hub)
  bert = transformers.BertModel(transformers.BertConfig.from_pretrained(text_dir),
                                add_pooling_layer=True)
  text_sd = {k[len(TEXT_PREFIX):]: v for k, v in sd.items() if k.startswith(TEXT_PREFIX)}
  missing, unexpected = bert.load_state_dict(text_sd, strict=False)
  if unexpected or [k for k in missing if not k.endswith('position_ids')]:
    raise ExportFolderError(f'{folder}: the text tower does not match {text_dir}: missing '
                            f'{missing}, unexpected {unexpected}')
  tokenizer = transformers.AutoTokenizer.from_pretrained(text_dir)
  heads = {'vision_projection.weight': sd['vision_model.projection_head_vision.projection.weight'],
           'text_projection.weight': sd['text_model.projection_head_text.projection.weight'],
           'logit_scale': sd['logit_scale']}
  model = _module_class(torch)(vision, bert, tokenizer, heads, hub, norm)
  return model.eval()
