"""The ViT image tower against timm: features, weight import with position
embedding resampling, and the key table both ways."""


import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models import vision_transformer as timm_vit

import jax.numpy as jnp

from data_pipelines import images
from flair_jax import trees
from flair_jax.convert import table, torch_io
from flair_jax.convert.pretrained import load_vision_weights
from flair_jax.models import VisionConfig, factory, resample, vit
from flair_jax.models.config import PIXEL_NORMS
from flair_jax.models.state import assign_state

# Small photographs (a colour JPEG, a colour PNG, a greyscale PNG): decoding
# the large ones would take most of the test's time.
SMALL_PHOTOS = ('flair_severe_nonprol_dr.jpg', 'flair_normal_sample.png',
                'skimage_microaneurysms.png')
# A small ViT of odd sizes (3 heads of 20) so that no axis can be swapped.
SHAPE = dict(patch_size=16, embed_dim=60, depth=2, heads=3, mlp_ratio=3.0)


def _timm(img_size, pool='token', seed=0):
  torch.manual_seed(seed)
  model = timm_vit.VisionTransformer(
      img_size=img_size, patch_size=SHAPE['patch_size'], embed_dim=SHAPE['embed_dim'],
      depth=SHAPE['depth'], num_heads=SHAPE['heads'], mlp_ratio=SHAPE['mlp_ratio'],
      global_pool=pool, num_classes=0)
  with torch.no_grad():  # LayerNorms and biases start at 1 / 0: move them
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _config(img_size, pool='token', norm='inception'):
  mean, std = PIXEL_NORMS[norm]
  return VisionConfig(type='vit', image_size=img_size, pool=pool, pixel_mean=mean,
                      pixel_std=std, **SHAPE)


def _photos(fundus_dir, size):
  return np.stack([images.flair_inference_canvas(np.asarray(Image.open(fundus_dir / n)), size)
                   for n in SMALL_PHOTOS]).astype(np.float32)


def _timm_features(model, photos_bhwc, mean, std):
  x = (torch.from_numpy(photos_bhwc) - torch.tensor(mean)) / torch.tensor(std)
  with torch.no_grad():
    return model(x.permute(0, 3, 1, 2)).numpy()


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope='module')
def sd_224(tmp_path_factory):
  """A 224 timm state dict with an ImageNet head, as .safetensors."""
  model = _timm(224)
  model.reset_classifier(7)  # a classifier the import must drop
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  path = tmp_path_factory.mktemp('vit') / 'vit224.safetensors'
  torch_io.write_safetensors(str(path), sd)
  return str(path), model


@pytest.mark.parametrize('pool,norm', [('token', 'inception'), ('avg', 'imagenet')])
def test_features_equal_timm_on_photographs_at_224(pool, norm, fundus_dir, tmp_path):
  tm = _timm(224, pool)
  path = tmp_path / 'w.safetensors'
  torch_io.write_safetensors(str(path), {k: v.numpy() for k, v in tm.state_dict().items()})
  config = _config(224, pool, norm)
  jm = factory.build_vision(config)
  assign_state(jm, load_vision_weights(str(path), config))
  photos = _photos(fundus_dir, 224)
  ours = np.asarray(jm(jnp.asarray(photos)))
  theirs = _timm_features(tm, photos, config.pixel_mean, config.pixel_std)
  # float32 through 2 blocks of 60-wide matmuls: a few ulps of the feature scale.
  assert _rel_err(ours, theirs) < 1e-5


def test_pos_embed_resampling_equals_torch_bicubic_antialias():
  rng = np.random.default_rng(0)
  for old, new in ((14, 32), (14, 23), (24, 14)):  # up, odd up, down
    x = rng.normal(size=(old, old, 5)).astype(np.float32)
    ours = resample.resize_axis(resample.resize_axis(x, new, 1), new, 0)
    theirs = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=(new, new),
                           mode='bicubic', antialias=True, align_corners=False)
    # PyTorch weighs and sums in float32 and rounds between the two passes:
    # up to ~10 float32 ulps of the largest value (|x| ~ 4).
    np.testing.assert_allclose(ours, theirs[0].permute(1, 2, 0).numpy(),
                               atol=1e-6 * np.abs(x).max())


def test_224_weights_at_512_equal_timm_checkpoint_filter(sd_224, fundus_dir):
  path, _ = sd_224
  t512 = _timm(512)
  sd = {k: torch.from_numpy(v) for k, v in torch_io.read_state_dict(path).items()
        if not k.startswith('head.')}
  t512.load_state_dict(timm_vit.checkpoint_filter_fn(sd, t512), strict=True)
  config = _config(512)
  state = load_vision_weights(path, config)
  np.testing.assert_allclose(state['pos_embed'], t512.pos_embed.detach().numpy(), atol=1e-6)
  jm = factory.build_vision(config)
  assign_state(jm, state)
  photos = _photos(fundus_dir, 512)
  theirs = _timm_features(t512, photos, config.pixel_mean, config.pixel_std)
  assert _rel_err(jm(jnp.asarray(photos)), theirs) < 1e-5


def test_timm_round_trip_is_bitwise_for_every_tensor(sd_224):
  path, tm = sd_224
  config = _config(224)
  flat = trees.flatten(load_vision_weights(path, config))
  back = table.to_torch(vit.TORCH_ROWS, flat)
  theirs = {k: v.numpy() for k, v in tm.state_dict().items() if not k.startswith('head.')}
  assert sorted(back) == sorted(theirs)
  for k, v in theirs.items():
    assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
  fresh = timm_vit.VisionTransformer(
      img_size=224, patch_size=16, embed_dim=60, depth=2, num_heads=3, mlp_ratio=3.0,
      num_classes=0)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_shape_is_read_back_from_the_weights_but_heads(sd_224):
  path, _ = sd_224
  shapes = {k: v.shape for k, v in torch_io.read_state_dict(path).items()}
  got = vit.TOWER.shape_from_torch(shapes)
  assert got.pop('heads') == max(1, 60 // 64)  # not in the weights: width // 64 guessed
  want = _config(224).to_dict()
  assert got == {k: want[k] for k in got}


def test_canvas_is_resized_on_device_like_torch_bilinear_antialias():
  x = np.random.default_rng(1).uniform(size=(2, 96, 96, 3)).astype(np.float32)
  ours = np.asarray(vit.resize_images(jnp.asarray(x), 48))
  theirs = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(48, 48),
                         mode='bilinear', antialias=True, align_corners=False)
  np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_vision_config_round_trips_and_names_timm_models():
  config = VisionConfig(type='vit')
  assert config.pixel_mean == (0.5, 0.5, 0.5)  # timm's augreg default
  assert VisionConfig.from_dict(config.to_dict()) == config
  assert VisionConfig().to_dict() == {'type': 'resnet', 'stages': [3, 4, 6, 3], 'width': 64}
  assert vit.timm_name(config) == 'vit_base_patch16_224'
  model = timm.create_model(vit.timm_name(config), pretrained=False, **vit.timm_kwargs(config))
  abstract = {k: v.shape for k, v in model.state_dict().items()}
  assert abstract['pos_embed'] == (1, 197, 768) and 'head.weight' not in abstract


def test_config_keys_choose_the_tower_its_normalisation_and_weights():
  from configs import common, flair_vit  # pylint: disable=g-import-not-at-top
  from flair_jax.training import setup  # pylint: disable=g-import-not-at-top
  cfg = flair_vit.get_config()
  got = setup.vision_config(cfg.model)
  assert (got.type, got.image_size, got.embed_dim, got.pixel_mean) == ('vit', 224, 768, (0.5,) * 3)
  cfg.model.vision_norm = 'imagenet'
  assert setup.vision_config(cfg.model).pixel_std == PIXEL_NORMS['imagenet'][1]
  cfg.model.vision_norm = 'imagenett'
  with pytest.raises(setup.ConfigError, match='vision_norm'):
    setup.vision_config(cfg.model)
  base = common.base_config()
  assert setup.vision_config(base.model) == VisionConfig()  # ResNet-50, FLAIR's raw input
  base.model.resnet_weights = 'r50.pth'  # the older name still works
  assert setup.vision_weights(base.model) == 'r50.pth'
  base.model.vision_weights = 'other.pth'
  with pytest.raises(setup.ConfigError, match='different files'):
    setup.vision_weights(base.model)


def test_block_rematerialisation_leaves_the_gradients_unchanged():
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 40, 40, 3)), jnp.float32)

  def grads(remat):
    model = vit.VisionTransformer(32, 8, 24, 2, 3, 2.0, 'avg', remat=remat, rngs=nnx.Rngs(0))
    return jax.tree.leaves(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model))

  # The same operations recomputed: equal up to XLA fusing them differently.
  for a, b in zip(grads(False), grads(True)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
