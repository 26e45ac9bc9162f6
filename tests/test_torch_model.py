"""Exports loaded back in PyTorch: ``load_flair_torch`` gives flair_jax's
logits for both image towers, and a ViT export's parts load into timm and
transformers on their own."""

import json
import os

import numpy as np
import pytest
import timm
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from flax import nnx

from flair_jax import checkpoint, trees
from flair_jax.convert.flair_torch import export_to_torch, read_torch_flair
from flair_jax.convert.pretrained import read_bert_config
from flair_jax.inference import FLAIRModel
from flair_jax.models import ModelConfig, VisionConfig, build_model
from flair_jax.torch_model import load_flair_torch
from tests.torch_flair import tiny_bert_config

# Small photographs (a colour JPEG, a colour PNG, a greyscale PNG): decoding
# the large ones would take most of the test's time.
SMALL_PHOTOS = ('flair_severe_nonprol_dr.jpg', 'flair_normal_sample.png',
                'skimage_microaneurysms.png')
CLASSES = ['normal', 'glaucoma', 'macular hole', 'diabetic retinopathy', 'drusen']
# ViT-S/16 (timm's vit_small_patch16_224) at 64 px: 16 patches; canvas 80
# so that both sides resize on the way in.
VIT = VisionConfig(type='vit', image_size=64, patch_size=16, embed_dim=384, depth=12, heads=6,
                   pool='token', pixel_mean=(0.485, 0.456, 0.406), pixel_std=(0.229, 0.224, 0.225))
RESNET = VisionConfig(stages=(1, 1, 1, 1), width=64)


@pytest.fixture(scope='module')
def bert_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('torch_model') / 'bert'
  folder.mkdir()
  words = sorted({w for c in CLASSES + ['a fundus photograph of'] for w in c.split()})
  (folder / 'vocab.txt').write_text(
      '\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words) + '\n')
  transformers.BertTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
  torch.manual_seed(1)
  transformers.BertModel(transformers.BertConfig(**tiny_bert_config())).save_pretrained(
      str(folder))
  return folder


@pytest.fixture(scope='module')
def photos(fundus_dir):
  return [np.asarray(Image.open(fundus_dir / n).convert('RGB'))
          for n in SMALL_PHOTOS]


def _export(vision, size, bert_dir, tmp_path):
  config = ModelConfig(bert=read_bert_config(str(bert_dir)), bert_type=str(bert_dir),
                       vision=vision, proj_dim=23, image_size=size)
  model = build_model(config, rngs=nnx.Rngs(3))
  model.eval()
  ckpt = checkpoint.save_model(model, config, str(tmp_path / 'ckpt'))
  out = export_to_torch(ckpt, str(tmp_path / 'export'), 'hf', bundle_text_encoder=True)
  return ckpt, out


@pytest.mark.parametrize('vision,size', [(VIT, 80), (RESNET, 64)], ids=['vit', 'resnet'])
def test_load_flair_torch_logits_equal_flair_jax(vision, size, bert_dir, photos, tmp_path):
  ckpt, out = _export(vision, size, bert_dir, tmp_path)
  probs, logits = load_flair_torch(out)(photos, CLASSES)
  want_probs, want_logits = FLAIRModel.from_pretrained(ckpt)(photos, CLASSES)
  # float32 towers in two frameworks (ViT: 12 blocks): measured ~3e-6 of the
  # logits' scale; 1e-5 leaves room for other BLAS builds.
  scale = np.abs(want_logits).max()
  np.testing.assert_allclose(logits, want_logits, atol=1e-5 * scale)
  np.testing.assert_allclose(probs, want_probs, atol=1e-5)
  if vision.type == 'vit':
    _check_parts(out, bert_dir)
    _check_reads_back(out, ckpt)


def _check_reads_back(out, ckpt):
  """from-torch of the ViT export gives the checkpoint back, bitwise."""
  state, config = read_torch_flair(out)
  want_state, want_config = checkpoint.load_state(ckpt)
  assert config.vision == want_config.vision and config.image_size == want_config.image_size
  got, want = trees.flatten(state), trees.flatten(want_state)
  assert sorted(got) == sorted(want)
  for k in want:
    assert np.array_equal(np.asarray(got[k]), np.asarray(want[k])), k


def _check_parts(out, bert_dir):
  """timm and transformers load the ViT export's parts, strictly."""
  hub = json.load(open(os.path.join(out, 'config.json')))
  spec = hub['image_encoder']
  assert spec['timm_name'] == 'vit_small_patch16_224'
  model = timm.create_model(spec['timm_name'], pretrained=False, num_classes=0, img_size=64)
  model.load_state_dict(load_file(os.path.join(out, spec['file'])), strict=True)
  bert = transformers.BertModel.from_pretrained(os.path.join(out, hub['text_encoder']))
  assert bert.config.hidden_size == tiny_bert_config()['hidden_size']
  heads = load_file(os.path.join(out, hub['heads']))
  assert sorted(heads) == ['logit_scale', 'text_projection.weight', 'vision_projection.weight']
