"""A PyTorch FLAIR-equivalent model, written for the tests from FLAIR_SPEC.

State-dict names equal PyTorch FLAIR's (`vision_model.model.*` torchvision
ResNet with ``fc`` = Identity, `text_model.model.*` transformers BertModel,
the two projection heads and ``logit_scale``), so a FLAIR state dict loads
into it with ``strict=True``. Also a small helper that copies its weights
into the flair_jax NNX model, independent of ``flair_jax.convert``.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision
import transformers

import jax.numpy as jnp

LOGIT_SCALE_MAX = 4.6052


class ProjectionLayer(torch.nn.Module):

  def __init__(self, cin, cout, projection=True, norm=True):
    super().__init__()
    self.projection = torch.nn.Linear(cin, cout, bias=False)
    self.apply_projection = projection
    self.norm_modality = projection and norm
    self.norm_projection = norm

  def forward(self, x):
    if self.norm_modality:
      x = x / x.norm(dim=-1, keepdim=True)
    if self.apply_projection:
      x = self.projection(x)
      if self.norm_projection:
        x = x / x.norm(dim=-1, keepdim=True)
    return x


class VisionModel(torch.nn.Module):

  def __init__(self, layers=(3, 4, 6, 3), proj_dim=512):
    super().__init__()
    self.model = torchvision.models.resnet.ResNet(
        torchvision.models.resnet.Bottleneck, list(layers))
    self.model.fc = torch.nn.Identity()
    self.projection_head_vision = ProjectionLayer(2048, proj_dim)

  def forward(self, pixel_values):
    return self.projection_head_vision(self.model(pixel_values))


class TextModel(torch.nn.Module):

  def __init__(self, bert_config: dict, proj_dim=512):
    super().__init__()
    cfg = transformers.BertConfig(**bert_config)
    self.model = transformers.BertModel(cfg, add_pooling_layer=True)
    self.projection_head_text = ProjectionLayer(cfg.hidden_size, proj_dim)

  def pool(self, input_ids, attention_mask):
    out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                     output_hidden_states=True)
    hs = out.hidden_states
    stack = torch.stack([hs[1], hs[2], hs[-1]])
    return stack.permute(1, 0, 2, 3).mean(2).mean(1)

  def forward(self, input_ids, attention_mask):
    return self.projection_head_text(self.pool(input_ids, attention_mask))


class TorchFLAIR(torch.nn.Module):
  """FLAIRModel's parameters and forward, without hub downloads."""

  def __init__(self, bert_config: dict, layers=(3, 4, 6, 3), proj_dim=512,
               logit_scale_init_value=0.07):
    super().__init__()
    self.vision_model = VisionModel(layers, proj_dim)
    self.text_model = TextModel(bert_config, proj_dim)
    self.logit_scale = torch.nn.Parameter(torch.log(torch.tensor(1 / logit_scale_init_value)))

  def compute_logits(self, img_emb, text_emb):
    self.logit_scale.data = torch.clamp(self.logit_scale.data, 0, LOGIT_SCALE_MAX)
    return (text_emb @ img_emb.t() * self.logit_scale.exp()).t()

  def forward(self, images_nchw, input_ids, attention_mask):
    img = self.vision_model(images_nchw)
    txt = self.text_model(input_ids, attention_mask)
    return self.compute_logits(img, txt)


def randomize_batchnorm(model: torch.nn.Module, seed=0):
  """Non-trivial BatchNorm affine parameters and running statistics."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(1 + 0.2 * torch.rand(n, generator=g))
        m.num_batches_tracked.fill_(7)


def _set(var, array):
  var[...] = jnp.asarray(array, dtype=var[...].dtype)


def _np(t):
  return t.detach().cpu().numpy().copy()  # never alias torch memory


def copy_resnet(tm: torch.nn.Module, jm) -> None:
  """torchvision ResNet -> flair_jax ResNet (in place)."""

  def conv(t, j):
    _set(j.kernel, _np(t.weight).transpose(2, 3, 1, 0))

  def bn(t, j):
    _set(j.scale, _np(t.weight))
    _set(j.bias, _np(t.bias))
    _set(j.mean, _np(t.running_mean))
    _set(j.var, _np(t.running_var))
    _set(j.num_batches_tracked, _np(t.num_batches_tracked))

  conv(tm.conv1, jm.conv1)
  bn(tm.bn1, jm.bn1)
  for i in range(jm.num_stages):
    for tb, jb in zip(getattr(tm, f'layer{i + 1}'), getattr(jm, f'layer{i + 1}')):
      for k in (1, 2, 3):
        conv(getattr(tb, f'conv{k}'), getattr(jb, f'conv{k}'))
        bn(getattr(tb, f'bn{k}'), getattr(jb, f'bn{k}'))
      if tb.downsample is not None:
        conv(tb.downsample[0], jb.downsample.conv)
        bn(tb.downsample[1], jb.downsample.bn)


def _linear(t, j):
  _set(j.kernel, _np(t.weight).T)
  if t.bias is not None:
    _set(j.bias, _np(t.bias))


def _layernorm(t, j):
  _set(j.scale, _np(t.weight))
  _set(j.bias, _np(t.bias))


def copy_bert(tm: transformers.BertModel, jm) -> None:
  """transformers BertModel -> flair_jax Bert (in place)."""
  e = tm.embeddings
  _set(jm.embeddings.word.embedding, _np(e.word_embeddings.weight))
  _set(jm.embeddings.position.embedding, _np(e.position_embeddings.weight))
  _set(jm.embeddings.token_type.embedding, _np(e.token_type_embeddings.weight))
  _layernorm(e.LayerNorm, jm.embeddings.norm)
  for tl, jl in zip(tm.encoder.layer, jm.layers):
    _linear(tl.attention.self.query, jl.query)
    _linear(tl.attention.self.key, jl.key)
    _linear(tl.attention.self.value, jl.value)
    _linear(tl.attention.output.dense, jl.attn_out)
    _layernorm(tl.attention.output.LayerNorm, jl.attn_norm)
    _linear(tl.intermediate.dense, jl.intermediate)
    _linear(tl.output.dense, jl.output)
    _layernorm(tl.output.LayerNorm, jl.out_norm)
  if tm.pooler is not None:
    _linear(tm.pooler.dense, jm.pooler)


def copy_flair(tm: TorchFLAIR, jm) -> None:
  """TorchFLAIR -> flair_jax FLAIRTowers (in place)."""
  copy_resnet(tm.vision_model.model, jm.vision_model)
  copy_bert(tm.text_model.model, jm.text_model)
  _linear(tm.vision_model.projection_head_vision.projection, jm.vision_projection.projection)
  _linear(tm.text_model.projection_head_text.projection, jm.text_projection.projection)
  _set(jm.logit_scale, _np(tm.logit_scale))


def tiny_bert_config(**overrides) -> dict:
  """A small BERT config with prime sizes; dropout off for parity."""
  cfg = dict(vocab_size=211, hidden_size=44, num_hidden_layers=3,
             num_attention_heads=4, intermediate_size=53,
             max_position_embeddings=97, type_vocab_size=2,
             layer_norm_eps=1e-12, hidden_act='gelu',
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  cfg.update(overrides)
  return cfg


def as_nchw(images_bhwc: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(images_bhwc.transpose(0, 3, 1, 2)))
