"""The FLAIRModel API against a PyTorch FLAIR-equivalent model on the same weights."""

import importlib.resources
import json

import jax
import numpy as np
import pytest
import torch
import torchvision
from flax import nnx
from PIL import Image

import flair_jax
from data_pipelines.tokenizer import load_tokenizer
from flair_jax import encoder
from flair_jax.inference import FLAIRModel
from flair_jax.models import BertConfig, ModelConfig, VisionConfig, build_model
from tests import torch_flair

SIZE = 61  # canvas side (prime)
PROJ = 31
STAGES = (1, 1, 1, 1)
CLASSES = ['normal', 'glaucoma', 'no glaucoma', 'myopic maculopathy grade two', 'zebra stripes',
           'mild diabetic retinopathy']
PHOTOS = ['HRF_04_g.jpg', 'flair_normal_sample.png', 'skimage_microaneurysms.png']


def _knowledge():
  # FLAIR's dictionary as the package ships it (pinned by SHA-256 in test_captions).
  resource = importlib.resources.files('data_pipelines') / 'resources' / (
      'expert_knowledge_flair_repo.json')
  return json.loads(resource.read_text(encoding='utf-8'))


def vocab_file(directory, classes=tuple(CLASSES)):
  """A vocabulary of the words of the prompts of ``classes`` (few [UNK])."""
  words = set('a fundus photograph of'.split())
  knowledge = _knowledge()
  for c in classes:
    for text in [c] + knowledge.get(c, []):
      words |= set(text.lower().replace(',', ' , ').replace('.', ' . ').split())
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + sorted(words)
  path = directory / 'vocab.txt'
  path.write_text('\n'.join(vocab) + '\n', encoding='utf-8')
  return path


def tiny_pair(seed=0):
  """A TorchFLAIR and the same weights in a flair_jax FLAIR."""
  cfg = torch_flair.tiny_bert_config()
  torch.manual_seed(seed)
  tm = torch_flair.TorchFLAIR(cfg, layers=STAGES, proj_dim=PROJ).eval()
  torch_flair.randomize_batchnorm(tm, seed)
  with torch.no_grad():
    tm.logit_scale.fill_(3.1)
  fields = BertConfig.__dataclass_fields__
  build = lambda: build_model(ModelConfig(
      bert=BertConfig(**{k: v for k, v in cfg.items() if k in fields}),
      vision=VisionConfig(stages=STAGES), proj_dim=PROJ), rngs=nnx.Rngs(seed))
  # Shapes only, then zeros that copy_flair overwrites: eager NNX
  # initialisation would compile every initialiser (many seconds).
  graphdef, abstract = nnx.split(nnx.eval_shape(build))
  jm = nnx.merge(graphdef, jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype)),
                                        abstract))
  torch_flair.copy_flair(tm, jm)
  return tm, jm


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  vocab = vocab_file(tmp_path_factory.mktemp('vocab'))
  tokenizer = load_tokenizer(vocab)
  tm, jm = tiny_pair()
  return tm, FLAIRModel(jm, tokenizer, image_size=SIZE), tokenizer


@pytest.fixture(scope='module')
def photos(fundus_dir):
  return [np.asarray(Image.open(fundus_dir / name).convert('RGB')) for name in PHOTOS]


def flair_preprocess(image, size=SIZE):
  """PyTorch FLAIR's FLAIRModel.preprocess_image, transcribed."""
  image = np.float32(image)
  if image.max() > 0:
    image /= 255
  image = np.expand_dims(np.transpose(image, (2, 0, 1)), 0)
  image = torch.tensor(image)
  scale = max(image.shape[-2:]) / size
  image = torchvision.transforms.Resize(
      (int(image.shape[-2] / scale), int(image.shape[-1] / scale)), antialias=True)(image)
  return torch.nn.functional.pad(image, (0, size - image.shape[-1], 0, size - image.shape[-2]))


def flair_text_embeddings(tm, tokenizer, categories, domain_knowledge):
  """PyTorch FLAIR's compute_text_embeddings, transcribed."""
  definitions = _knowledge()
  protos = []
  for category in categories:
    if domain_knowledge and category in definitions:
      descriptions = definitions[category]
      if category not in descriptions and 'myopic maculopathy' not in category:
        descriptions.append(category)
    else:
      descriptions = [category]
    prompts = ['A fundus photograph of [CLS]'.replace('[CLS]', d) for d in descriptions]
    tokens = tokenizer(prompts, truncation=True, padding=True, return_tensors='pt')
    with torch.no_grad():
      emb = tm.text_model(tokens['input_ids'], tokens['attention_mask'])
    protos.append(emb.mean(0).unsqueeze(0))
  return torch.concat(protos)


def test_import_flair_jax_is_lazy():
  import subprocess
  import sys
  code = ('import sys, flair_jax; assert "jax" not in sys.modules, "jax imported"; '
          'assert "FLAIRModel" in dir(flair_jax)')
  subprocess.run([sys.executable, '-c', code], check=True)
  assert flair_jax.FLAIRModel is FLAIRModel


def test_call_matches_pytorch_flair_forward_on_photographs(setup, photos):
  tm, model, tokenizer = setup
  classes = CLASSES[:4]
  prompts = [f'A fundus photograph of {c}' for c in classes]
  tokens = tokenizer(prompts, truncation=True, padding=True, return_tensors='pt')
  for image in photos:
    with torch.no_grad():
      want = tm(flair_preprocess(image), tokens['input_ids'], tokens['attention_mask'])
    probs, logits = model(image, classes)
    assert probs.shape == logits.shape == (1, len(classes))
    np.testing.assert_allclose(logits, want.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(probs, want.softmax(-1).numpy(), atol=1e-5, rtol=0)


def test_batch_of_mixed_sizes_equals_single_calls_and_compiles_once(setup, photos):
  _, model, _ = setup
  batch = [photos[0], photos[1][:200, :150]]
  probs, logits = model(batch, CLASSES[:3])
  for i, image in enumerate(batch):
    p, l = model(image, CLASSES[:3])
    np.testing.assert_allclose(logits[i], l[0], atol=1e-5)
    np.testing.assert_allclose(probs[i], p[0], atol=1e-6)
  traced = dict(encoder.trace_counts)
  model(batch[::-1], CLASSES[:3])
  model(np.stack([photos[1], photos[1]]), CLASSES[:3])  # a [B, H, W, C] array
  assert dict(encoder.trace_counts) == traced  # same batch shape: no new trace


@pytest.mark.parametrize('domain_knowledge', [True, False])
def test_text_prototypes_match_pytorch_flair(setup, domain_knowledge):
  tm, model, tokenizer = setup
  by_name, protos = model.compute_text_embeddings(CLASSES, domain_knowledge=domain_knowledge)
  want = flair_text_embeddings(tm, tokenizer, CLASSES, domain_knowledge).numpy()
  assert protos.shape == (len(CLASSES), PROJ)
  np.testing.assert_allclose(protos, want, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(by_name['glaucoma'], protos[1:2])
  # averaged, not re-normalised: several descriptions give norms below one
  norms = np.linalg.norm(protos, axis=1)
  assert (norms[0] < 0.999) if domain_knowledge else np.allclose(norms, 1, atol=1e-5)


def test_knowledge_prompts_follow_flair_rules():
  from flair_jax.encoder import class_descriptions
  knowledge = _knowledge()
  assert class_descriptions('glaucoma', knowledge) == knowledge['glaucoma'] + ['glaucoma']
  assert class_descriptions('no glaucoma', knowledge) == ['no glaucoma']  # already listed
  mmac = 'myopic maculopathy grade two'
  assert class_descriptions(mmac, knowledge) == knowledge[mmac]  # name left out
  assert class_descriptions('zebra stripes', knowledge) == ['zebra stripes']
  assert class_descriptions('glaucoma', None) == ['glaucoma']


def save_tiny_checkpoint(jm, tokenizer, directory):
  """A flair_jax model folder ``directory/jax`` whose text tower and
  tokenizer live in ``directory/bert``; returns both paths."""
  from flair_jax import checkpoint
  bert_dir = directory / 'bert'
  tokenizer.save_pretrained(bert_dir)
  (bert_dir / 'config.json').write_text(json.dumps(torch_flair.tiny_bert_config()))
  config = ModelConfig(
      bert=BertConfig(**{k: v for k, v in torch_flair.tiny_bert_config().items()
                         if k in BertConfig.__dataclass_fields__}),
      bert_type=str(bert_dir), vision=VisionConfig(stages=STAGES), proj_dim=PROJ, image_size=SIZE)
  return checkpoint.save_model(jm, config, str(directory / 'jax')), bert_dir


def test_from_pretrained_flair_jax_checkpoint_and_pytorch_files(setup, photos, tmp_path):
  from safetensors.torch import save_file
  tm, model, tokenizer = setup
  _, bert_dir = save_tiny_checkpoint(model.model, tokenizer, tmp_path)
  # The PyTorch forms: a plain state dict and the hub folder.
  torch.save(tm.state_dict(), tmp_path / 'flair.pth')
  hub = tmp_path / 'hub'
  hub.mkdir()
  save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, hub / 'model.safetensors')
  (hub / 'config.json').write_text(json.dumps({'bert_type': str(bert_dir), 'image_size': SIZE,
                                               'proj_dim': PROJ}))
  want_state = jax.tree.leaves(nnx.state(model.model))
  for source, kwargs in [(hub, {}), (tmp_path / 'flair.pth', {'bert_type': str(bert_dir)})]:
    loaded = FLAIRModel.from_pretrained(source, **kwargs)
    assert len(loaded.tokenizer) == len(tokenizer)
    for got, want in zip(jax.tree.leaves(nnx.state(loaded.model)), want_state, strict=True):
      np.testing.assert_array_equal(got, want)
  loaded = FLAIRModel.from_pretrained(tmp_path / 'jax')
  assert loaded.image_size == SIZE and len(loaded.tokenizer) == len(tokenizer)
  np.testing.assert_allclose(loaded(photos[1], CLASSES[:3])[1], model(photos[1], CLASSES[:3])[1],
                             atol=1e-6)


def test_errors_name_the_problem(setup, tmp_path):
  _, model, _ = setup
  with pytest.raises(ValueError, match='class names'):
    model(np.zeros((5, 5, 3), np.uint8), [])
  with pytest.raises(ValueError, match=r'\[CLS\]'):
    FLAIRModel(model.model, model.tokenizer, caption='no placeholder')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    FLAIRModel.from_pretrained(tmp_path / 'nothing')
