"""Fine-tuning (FT, LP+FT): the step against a PyTorch transcription of
FLAIR's ``FineTuning.train_epoch``, FLAIR's class balancing, and the command
resuming after SIGKILL with the same metrics."""

import json
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from flair_jax import parallel
from flair_jax.evaluation import balance, finetune, splits
from tests import test_inference as ti
from tests import torch_flair
from tests.conftest import subprocess_env


def _flair_balanced_train(labels, shots_train, shots_test, seed):
  """FLAIR's get_dataloader_splits + balance_data, transcribed (global random)."""
  data = [{'i': i, 'label': int(l)} for i, l in enumerate(labels)]
  random.seed(seed)
  random.shuffle(data)
  labs = np.array([d['label'] for d in data])
  get_shots = lambda s, n: int(int(s[:-1]) / 100 * n) if '%' in s else int(s)
  train = []
  for label in np.unique(labs):
    idx = list(np.squeeze(np.argwhere(labs == label)))
    n_test, n_train = get_shots(shots_test, len(idx)), get_shots(shots_train, len(idx))
    train += [data[i] for i in idx[n_test:n_test + n_train]]
  train_labels = [d['label'] for d in train]
  counts = np.bincount(train_labels)
  out = []
  for label in np.unique(train_labels):
    idx = list(np.argwhere(np.array(train_labels) == label)[:, 0])
    if counts.max() - counts[label] > 0:
      idx += random.choices(idx, k=counts.max() - counts[label])
    out += [train[i]['i'] for i in idx]
  return out


@pytest.mark.parametrize('seed', [0, 3])
def test_balance_draws_the_samples_flair_draws(seed):
  labels = np.random.default_rng(seed).choice(4, size=83, p=[0.55, 0.25, 0.15, 0.05])
  split = splits.fold_split(labels, shots_train='70%', shots_val='0%', shots_test='20%', seed=seed)
  got = balance.balance(labels, split['train'], seed=seed)
  assert got.tolist() == _flair_balanced_train(labels, '70%', '20%', seed)
  assert len(set(np.bincount(labels[got]).tolist())) == 1


CANVAS = 29  # prime
STAGES, WIDTH = (1,), 8  # a one-stage ResNet: a stem and a bottleneck (compiles fast)
BATCHES = ((0, 4, 2), (5, 1, 3))  # two steps of 3 images (an odd batch)
CLASSES = 5


class _TorchResNet(torch.nn.Module):
  """torchvision's ResNet layers, one stage, ``fc`` left out (FLAIR's tower)."""

  def __init__(self):
    super().__init__()
    from torchvision.models.resnet import Bottleneck
    self.conv1 = torch.nn.Conv2d(3, WIDTH, 7, 2, 3, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(WIDTH)
    down = torch.nn.Sequential(torch.nn.Conv2d(WIDTH, WIDTH * 4, 1, bias=False),
                               torch.nn.BatchNorm2d(WIDTH * 4))
    self.layer1 = torch.nn.Sequential(Bottleneck(WIDTH, WIDTH, downsample=down))

  def forward(self, x):
    x = torch.nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    return self.layer1(x).mean((2, 3))


def _nnx_tower(torch_tower):
  """The flair_jax ResNet with the weights of ``torch_tower``."""
  from flair_jax.models import VisionConfig
  from flair_jax.models.factory import build_vision
  graphdef, abstract = nnx.split(nnx.eval_shape(
      lambda: build_vision(VisionConfig(stages=STAGES, width=WIDTH), rngs=nnx.Rngs(0))))
  tower = nnx.merge(graphdef, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract))
  torch_flair.copy_resnet(torch_tower, tower)
  return tower


def _torch_train_epoch(vision, classifier, images, labels, update_bn, freeze_classifier):
  """FLAIR's FineTuning.train_epoch (classification, fta off), transcribed;
  one output: LP+FT's binary cross-entropy."""
  for p in classifier.parameters():
    p.requires_grad = not freeze_classifier
  params = list(vision.parameters()) + list(classifier.parameters())
  optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-4)
  vision.train(update_bn)
  losses = []
  for rows in BATCHES:
    x = torch_flair.as_nchw(images[list(rows)])
    logits, y = classifier(vision(x)), torch.tensor(labels[list(rows)])
    if logits.shape[-1] == 1:
      loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y[:, None].float())
    else:
      loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1)  # skips the frozen (gradient-free) ones
    optimizer.step()
    optimizer.zero_grad()
    losses.append(loss.item())
  return losses


def _flat(module_or_tree):
  tree = module_or_tree
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)
  return {jax.tree_util.keystr(p): np.array(v)  # a copy: NNX may reuse the buffer
          for p, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(tree))}


@pytest.mark.parametrize('update_bn,outputs,freeze_classifier',
                         [(True, CLASSES, False), (False, CLASSES, False), (True, 1, True)])
def test_steps_match_flair_train_epoch(update_bn, outputs, freeze_classifier):
  torch.manual_seed(5)
  tvision = _TorchResNet()
  torch_flair.randomize_batchnorm(tvision, 5)
  classifier = torch.nn.Linear(WIDTH * 4, outputs)
  jvision = _nnx_tower(tvision)
  before = _flat(jvision)
  rng = np.random.default_rng(1)
  images = rng.random((6, CANVAS, CANVAS, 3), dtype=np.float32)
  labels = rng.integers(0, max(outputs, 2), 6)

  tower = finetune.Tower(jvision, mesh=parallel.make_mesh(devices=jax.devices()[:1]))
  start = {'kernel': classifier.weight.detach().numpy().T.copy(),
           'bias': classifier.bias.detach().numpy().copy()}
  tx = finetune.make_optimizer(freeze_classifier=freeze_classifier)
  state = finetune.create_state(tower, start, tx)
  step = finetune.make_train_step(tower.train_graphdef if update_bn else tower.eval_graphdef,
                                  tx, tower.mesh, augment=False)
  losses = []
  for rows in BATCHES:
    state, out = step(state, images[list(rows)], labels[list(rows)].astype(np.int32),
                      jax.random.key(0))
    losses.append(float(out['loss']))
  want_losses = _torch_train_epoch(tvision, classifier, images, labels, update_bn,
                                   freeze_classifier)
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)

  torch_flair.copy_resnet(tvision, jvision)  # the trained torch tower, in the NNX layout
  want = _flat(jvision)
  got = {**_flat(state.params['vision']), **_flat(state.batch_stats)}
  assert got.keys() == want.keys()
  for k in want:
    # An Adam update is ~lr g / (|g| + eps) with eps = 1e-4 ~ |g|: gradients
    # summed in another order (1e-3 of a small one) move it by lr / 1000;
    # each updated value is also rounded to float32 (2 ulps of the leaf).
    atol = max(1e-4 / 1000, 2 * np.spacing(np.abs(before[k]).max().astype(np.float32)))
    np.testing.assert_allclose(got[k] - before[k], want[k] - before[k], rtol=1e-3, atol=atol,
                               err_msg=k)
    statistic = k.endswith(("['mean']", "['var']", "['num_batches_tracked']"))
    # Every parameter moved, and the statistics in train mode only.
    assert np.array_equal(want[k], before[k]) == (statistic and not update_bn), k
  np.testing.assert_allclose(np.asarray(state.params['classifier']['kernel']),
                             classifier.weight.detach().numpy().T, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(state.params['classifier']['bias']),
                             classifier.bias.detach().numpy(), rtol=1e-4, atol=1e-7)
  moved = not np.array_equal(np.asarray(state.params['classifier']['kernel']), start['kernel'])
  assert moved != freeze_classifier


def _tiny_model_folder(root):
  """A flair_jax model folder with the one-stage tower and a tiny BERT
  (random weights, unit BatchNorm variances) and its tokenizer."""
  from data_pipelines.tokenizer import load_tokenizer
  from flair_jax import checkpoint
  from flair_jax.models import BertConfig, ModelConfig, VisionConfig, build_model
  bert = torch_flair.tiny_bert_config()
  bert_dir = root / 'bert'
  load_tokenizer(ti.vocab_file(root, SYNTH_CLASSES)).save_pretrained(bert_dir)
  (bert_dir / 'config.json').write_text(json.dumps(bert))
  config = ModelConfig(
      bert=BertConfig(**{k: v for k, v in bert.items() if k in BertConfig.__dataclass_fields__}),
      bert_type=str(bert_dir), vision=VisionConfig(stages=STAGES, width=WIDTH), proj_dim=7,
      image_size=CANVAS)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def value(path, s):
    name = jax.tree_util.keystr(path)
    if not np.issubdtype(s.dtype, np.floating):
      return np.zeros(s.shape, s.dtype)
    if name.endswith(("'var']", "'scale']")):
      return np.ones(s.shape, s.dtype)
    return (0.2 * rng.standard_normal(s.shape)).astype(s.dtype)

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(value, abstract))
  return checkpoint.save_model(model, config, str(root / 'model'))


SYNTH_CLASSES = ('normal', 'microaneurysms', 'haemorrhages', 'hard exudates', 'drusens', 'glaucoma')


@pytest.fixture(scope='module')
def synthetic_set(tmp_path_factory):
  from data_pipelines import build
  root = tmp_path_factory.mktemp('ft')
  report = build.build('fundus_classification', root / 'tfds', synthetic=True, n_test=37,
                       canvas=CANVAS, seed=4, verbose=False)
  return root, _tiny_model_folder(root), report['path']


def _ft_cmd(ckpt, data, out):
  # lp+ft with balancing and augmentation: every option of the fold's state.
  return [sys.executable, '-m', 'flair_jax.evaluate', '--checkpoint', ckpt, '--method', 'lp+ft',
          '--data', data, '--folds', '1', '--shots-train', '50%', '--shots-val', '30%',
          '--shots-test', '20%', '--balance', '--fta', '--epochs', '4', '--patience', '3',
          '--train-batch-size', '5',  # 30 balanced training images: one step shape
          '--out', str(out)]


def _committed_epochs(out):
  folder = out / 'finetune' / 'fold0' / 'checkpoints'
  if not folder.is_dir():
    return []
  return [p.name for p in folder.iterdir() if p.name.isdigit() and (p / 'commit_success.txt').exists()]


def test_sigkilled_fine_tuning_resumes_with_the_same_metrics_past_a_damaged_epoch(synthetic_set):
  root, ckpt, data = synthetic_set
  env = subprocess_env(1)
  whole = subprocess.run(_ft_cmd(ckpt, data, root / 'whole'), env=env, capture_output=True,
                         text=True, timeout=600)
  assert whole.returncode == 0, whole.stderr[-3000:]
  out = root / 'killed'
  proc = subprocess.Popen(_ft_cmd(ckpt, data, out), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while len(_committed_epochs(out)) < 2 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / 'finetune' / 'fold0' / 'result.npz').exists(), 'finished before the kill'
  # The newest epoch's array files cut in half (a read may need only the
  # first half of one file): the run resumes from the epoch before it and
  # still ends with the same metrics.
  folder = out / 'finetune' / 'fold0' / 'checkpoints'
  newest = folder / max(_committed_epochs(out), key=int)
  victims = [p for p in newest.rglob('*') if p.is_file() and p.parent.name == 'd']
  assert victims
  for victim in victims:
    with open(victim, 'r+b') as f:
      f.truncate(victim.stat().st_size // 2)
  resumed = subprocess.run(_ft_cmd(ckpt, data, out), env=env, capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed after epoch' in resumed.stderr
  assert [p.name.split('.')[0] for p in folder.iterdir() if '.damaged-' in p.name] == [newest.name]
  assert 'Traceback' not in resumed.stderr, resumed.stderr[-3000:]
  want = json.loads((root / 'whole' / 'metrics.json').read_text())
  got = json.loads((out / 'metrics.json').read_text())
  assert got['folds'] == want['folds'] and got['summary'] == want['summary']
  assert want['folds'][0]['epochs'] >= 2
  np.testing.assert_array_equal(np.load(out / 'predictions.npz')['fold0_probs'],
                                np.load(root / 'whole' / 'predictions.npz')['fold0_probs'])


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope='module')
def encodings():
  """Plain and augmented (3 rounds) encodings of 41 samples of 3 classes."""
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 3, 41)
  centres = rng.standard_normal((3, 11))
  feat = centres[labels] + rng.standard_normal((41, 11))
  aug = feat[:, None] + 0.3 * rng.standard_normal((41, 3, 11))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  split = splits.fold_split(labels, shots_train='60%', shots_val='0%', shots_test='40%', seed=1)
  return dict(labels=labels, feat=feat, aug=aug, emb=unit(feat), aug_emb=unit(aug),
              protos=unit(centres), split=split)


def test_tta_averages_the_logits_of_the_augmented_test_encodings(encodings):
  from flair_jax.evaluation import augmented, linear_probe
  e, split = encodings, encodings['split']
  train, test = split['train'], split['test']
  # FLAIR's ZeroShot.predict with tta: mean over rounds of exp(s) x text.T, then softmax.
  got = augmented.fold_probs('zero-shot', 1, split, e['feat'], e['emb'], e['labels'], e['protos'],
                             2.5, 3, aug_feat_naf=e['aug'], aug_emb_nad=e['aug_emb'], tta=True)
  want = _softmax(np.mean([np.exp(2.5) * e['aug_emb'][test, a] @ e['protos'].T
                           for a in range(3)], 0))
  np.testing.assert_allclose(got, want, atol=1e-5)  # float32 logits of ~12
  # FLAIR's LinearProbe.predict with tta, two classes: the mean of the one
  # output's scores, then a sigmoid.
  binary = (e['labels'] > 0).astype(np.int64)
  got = augmented.fold_probs('linear-probe', 1, split, e['feat'], e['emb'], binary, None, 0.0, 2,
                             aug_feat_naf=e['aug'], aug_emb_nad=e['aug_emb'], tta=True)
  clf = linear_probe.fit(e['feat'][train], binary[train])
  score = np.mean([e['aug'][test, a] @ clf.coef_[0] + clf.intercept_[0] for a in range(3)], 0)
  s = 1 / (1 + np.exp(-score))
  np.testing.assert_allclose(got, np.stack([1 - s, s], 1), atol=1e-6)


def test_fta_trains_on_every_round_of_the_training_encodings(encodings):
  from flair_jax.evaluation import augmented, linear_probe
  e, split = encodings, encodings['split']
  train, test = split['train'], split['test']
  got = augmented.fold_probs('linear-probe', 1, split, e['feat'], e['emb'], e['labels'], None,
                             0.0, 3, aug_feat_naf=e['aug'], aug_emb_nad=e['aug_emb'], fta=True)
  # FLAIR's AdapterWrapper.fit: the rounds' features concatenated, round after round.
  clf = linear_probe.fit(np.concatenate([e['aug'][train, a] for a in range(3)]),
                         np.tile(e['labels'][train], 3))
  np.testing.assert_allclose(got, clf.predict_proba(e['feat'][test]), atol=1e-12)
  with pytest.raises(ValueError, match='not with'):
    augmented.fold_probs('ft', 1, split, e['feat'], e['emb'], e['labels'], None, 0.0, 3, fta=True)


def test_augmented_encoder_draws_each_round_from_seed_batch_and_round():
  from flair_jax.evaluation import augmented
  from flair_jax.training import augment as augment_lib
  canvases = np.random.default_rng(2).random((2, 13, 13, 3), dtype=np.float32)
  encode = lambda x: (x.mean((1, 2)), x[:, 6, 6])
  feat, emb = augmented.augmented_encoder(encode, rounds=3, seed=4)(canvases)
  assert feat.shape == (2, 3, 3) and emb.shape == (2, 3, 3)
  key = jax.random.fold_in(jax.random.key(4), 0)  # batch 0
  augment = jax.jit(augment_lib.augment)  # the encoder's compilation, from JAX's cache
  for a in range(3):
    want = np.asarray(augment(jax.random.fold_in(key, a), canvases))
    np.testing.assert_allclose(feat[:, a], want.mean((1, 2)), atol=1e-6)
  assert not np.allclose(emb[:, 0], emb[:, 1])
