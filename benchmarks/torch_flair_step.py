"""A PyTorch FLAIR-equivalent training step, for the throughput benchmark.

The model has PyTorch FLAIR's architecture (torchvision bottleneck ResNet
with ``fc`` removed, a transformers ``BertModel`` pooled over hidden states
1, 2 and last, bias-free projection heads, clamped ``logit_scale``) with the
tower sizes as arguments; the step is FLAIR's ``train_epoch`` body: on-device
augmentation (flip, affine, colour jitter, standing in for its kornia stack)
and the forward under autocast, soft-target CLIP loss, ``GradScaler``,
``clip_grad_norm_(1.0)``, AdamW, ``loss.item()`` and, on CUDA,
``torch.cuda.empty_cache()`` every iteration as FLAIR does.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import transformers

LOGIT_SCALE_MAX = 4.6052


def _normalize(x):
  return x / x.norm(dim=-1, keepdim=True)


class ResNetTower(torch.nn.Module):
  """torchvision's ResNet layout with a configurable width (64: ResNet-50)."""

  def __init__(self, stages: Sequence[int], width: int):
    super().__init__()
    block = torchvision.models.resnet.Bottleneck
    self.stem = torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(width),
        torch.nn.ReLU(inplace=True), torch.nn.MaxPool2d(3, 2, 1))
    layers, cin = [], width
    for i, n in enumerate(stages):
      planes = width * 2**i
      for b in range(n):
        stride = 2 if (b == 0 and i > 0) else 1
        down = None
        if stride != 1 or cin != planes * block.expansion:
          down = torch.nn.Sequential(
              torch.nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
              torch.nn.BatchNorm2d(planes * block.expansion))
        layers.append(block(cin, planes, stride, down))
        cin = planes * block.expansion
    self.layers = torch.nn.Sequential(*layers)
    self.out_features = cin

  def forward(self, images_bchw):
    return self.layers(self.stem(images_bchw)).mean((2, 3))


class ViTTower(torch.nn.Module):
  """timm's VisionTransformer without classifier, after the input normalisation."""

  def __init__(self, vit_kwargs: dict):
    super().__init__()
    from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
    self.vit = VisionTransformer(**vit_kwargs, num_classes=0)
    self.out_features = self.vit.num_features

  def forward(self, images_bchw):
    return self.vit((images_bchw - 0.5) / 0.5)


class TorchFLAIRModel(torch.nn.Module):
  """Both towers, FLAIR's projection heads and temperature.

  ``vit``: timm ``VisionTransformer`` arguments for a ViT image tower
  (``stages`` and ``width`` are then unused), or None for the ResNet.
  """

  def __init__(self, bert_config: dict, stages: Sequence[int], width: int, proj_dim: int,
               vit: dict = None):
    super().__init__()
    self.vision = ViTTower(vit) if vit else ResNetTower(stages, width)
    self.bert = transformers.BertModel(transformers.BertConfig(**bert_config),
                                       add_pooling_layer=False)
    self.vision_proj = torch.nn.Linear(self.vision.out_features, proj_dim, bias=False)
    self.text_proj = torch.nn.Linear(bert_config['hidden_size'], proj_dim, bias=False)
    self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))

  def forward(self, images_bchw, ids_bl, mask_bl):
    img_bd = _normalize(self.vision_proj(_normalize(self.vision(images_bchw))))
    hs = self.bert(input_ids=ids_bl, attention_mask=mask_bl,
                   output_hidden_states=True).hidden_states
    pooled_bh = torch.stack([hs[1], hs[2], hs[-1]]).mean(2).mean(0)
    txt_bd = _normalize(self.text_proj(_normalize(pooled_bh)))
    self.logit_scale.data = torch.clamp(self.logit_scale.data, 0, LOGIT_SCALE_MAX)
    return self.logit_scale.exp() * img_bd @ txt_bd.t()


def augment(images_bchw):
  """Flip p=.5, affine p=.25 (+-5 deg, scale [0.9, 1]), jitter p=.25, per sample.

  Each transform runs on the whole batch (the identity where not drawn), as
  flair_jax's augmentation does.
  """
  b, dev = images_bchw.shape[0], images_bchw.device
  u = lambda lo, hi: lo + (hi - lo) * torch.rand(b, device=dev)
  x = torch.where((torch.rand(b, device=dev) < 0.5)[:, None, None, None],
                  images_bchw.flip(-1), images_bchw)
  on = torch.rand(b, device=dev) < 0.25
  angle = torch.deg2rad(u(-5, 5)) * on
  inv_scale = torch.where(on, 1 / u(0.9, 1.0), torch.ones(b, device=dev))
  cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
  zero = torch.zeros_like(cos)
  theta = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1)], 1)
  grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
  x = F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
  jitter = (torch.rand(b, device=dev) < 0.25)[:, None, None, None]
  bright = (x * u(0.8, 1.2)[:, None, None, None]).clamp(0, 1)
  grey = (0.299 * bright[:, 0] + 0.587 * bright[:, 1] + 0.114 * bright[:, 2]).mean((1, 2))
  grey = grey[:, None, None, None]
  c = u(0.8, 1.2)[:, None, None, None]
  contrast = (c * bright + (1 - c) * grey).clamp(0, 1)  # brightness first, then contrast
  return torch.where(jitter, contrast, x)


class TorchBatch:
  """A pre-training batch on the torch device, as FLAIR's loop builds it."""

  def __init__(self, batch: dict, device, channels_last: bool = False):
    lengths = np.asarray(batch['lengths'])
    longest = int(lengths.max())  # FLAIR pads each batch to its longest caption
    images = torch.from_numpy(np.ascontiguousarray(batch['image'].transpose(0, 3, 1, 2)))
    self.images = images.to(device).float().div_(255)
    if channels_last:
      self.images = self.images.contiguous(memory_format=torch.channels_last)
    self.ids = torch.from_numpy(batch['input_ids'][:, :longest].astype(np.int64)).to(device)
    mask = (np.arange(longest)[None] < lengths[:, None]).astype(np.int64)
    self.mask = torch.from_numpy(mask).to(device)
    cat = np.asarray(batch['category'])
    cooc = (cat[None, :] == cat[:, None]).astype(np.float32)
    self.target = torch.from_numpy(cooc / cooc.sum(-1)).to(device)


class TorchTrainer:
  """FLAIR's training iteration around a ``TorchFLAIRModel``.

  Args:
    model: the model, already on ``device``.
    device: ``'cpu'`` or ``'cuda'``.
    amp: fp16 autocast + GradScaler (FLAIR's setting on a GPU).
    augment_images: apply the augmentation inside the step.
    flair_loop_extras: ``loss.item()`` and (CUDA) ``empty_cache()`` per step.
  """

  def __init__(self, model, device, *, amp: bool, augment_images: bool = True,
               flair_loop_extras: bool = True, lr: float = 1e-4, weight_decay: float = 1e-5):
    self.model, self.device, self.amp = model, torch.device(device), amp
    self.augment_images, self.extras = augment_images, flair_loop_extras
    self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp)
    model.train()

  def step(self, b: TorchBatch):
    """One iteration; returns the loss (a float with the FLAIR loop extras)."""
    with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
      images = augment(b.images) if self.augment_images else b.images
      logits_per_text = self.model(images, b.ids, b.mask).t()
      loss = (F.cross_entropy(logits_per_text, b.target)
              + F.cross_entropy(logits_per_text.t(), b.target)) / 2
    self.scaler.scale(loss).backward()
    self.scaler.unscale_(self.optimizer)
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.scaler.step(self.optimizer)
    self.scaler.update()
    self.optimizer.zero_grad()
    if self.extras:
      loss = loss.item()
      if self.device.type == 'cuda':
        torch.cuda.empty_cache()
    return loss

  def synchronize(self):
    """Waits for the GPU's queued work (nothing to wait for on the CPU)."""
    if self.device.type == 'cuda':
      torch.cuda.synchronize()


def count_flops(model_args: tuple, host_batch: dict, *, augment_images: bool = True) -> int:
  """Matmul/convolution FLOPs (2 per multiply-add) of one forward + backward.

  Counted by ``torch.utils.flop_counter`` on the ``meta`` device: nothing is
  computed, so any size is cheap. The optimiser adds no such FLOPs.

  Args:
    model_args: ``TorchFLAIRModel`` arguments ``(bert_config, stages, width, proj_dim,
      vit)``.
    host_batch: a pipeline batch (its captions set the padded length).
  """
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top

  with torch.device('meta'):
    model = TorchFLAIRModel(*model_args)
  model.train()
  b = TorchBatch(host_batch, 'meta')
  with FlopCounterMode(display=False) as counter:
    images = augment(b.images) if augment_images else b.images
    # No mask: transformers reads a mask's values to pick a kernel, which a
    # meta tensor does not have; masking changes no matmul's size.
    logits_per_text = model(images, b.ids, None).t()
    loss = (F.cross_entropy(logits_per_text, b.target)
            + F.cross_entropy(logits_per_text.t(), b.target)) / 2
    loss.backward()
  return int(counter.get_total_flops())
