"""Transfer evaluation: metrics against scikit-learn, FLAIR's shot splits, the
linear probe, the adapters against PyTorch transcriptions of FLAIR's, and the
command end to end on a tiny downstream set."""

import json
import random

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from flair_jax.evaluation import adapters, linear_probe, metrics, splits


def _random_fold(seed, n=97, c=5, drop_class=None):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n)
  if drop_class is not None:
    labels[labels == drop_class] = (drop_class + 1) % c
  logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[labels]  # better than chance
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  return labels, probs


@pytest.mark.parametrize('seed', [0, 1])
def test_fold_metrics_equal_sklearn(seed):
  labels, probs = _random_fold(seed)
  preds = probs.argmax(1)
  got = metrics.classification_metrics(labels, probs)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12)
  close(got['aca'], skm.balanced_accuracy_score(labels, preds))
  close(got['kappa'], skm.cohen_kappa_score(labels, preds, weights='quadratic'))
  close(got['f1_class'], skm.f1_score(labels, preds, average=None))
  close(got['f1_avg'], skm.f1_score(labels, preds, average='macro'))
  close(got['sensitivity_class'], skm.recall_score(labels, preds, average=None))
  close(got['acc_class'], skm.recall_score(labels, preds, average=None))
  mcm = skm.multilabel_confusion_matrix(labels, preds)  # [C, 2, 2]: tn fp / fn tp
  close(got['specificity_class'], mcm[:, 0, 0] / (mcm[:, 0, 0] + mcm[:, 0, 1]))
  close(got['auc_class'], [skm.roc_auc_score(labels == k, probs[:, k]) for k in range(5)])
  close(got['auc_avg'], skm.roc_auc_score(labels, probs, multi_class='ovr'))
  np.testing.assert_array_equal(got['cm'], skm.confusion_matrix(labels, preds))
  close(got['cm_norm'], skm.confusion_matrix(labels, preds, normalize='true'))
  # Closed forms, independent of scikit-learn.
  cm = skm.confusion_matrix(labels, preds).astype(float)
  w = np.subtract.outer(np.arange(5), np.arange(5)) ** 2
  expected = np.outer(cm.sum(1), cm.sum(0)) / cm.sum()
  close(got['kappa'], 1 - (w * cm).sum() / (w * expected).sum())
  for k in range(5):  # AUC = P(score of a positive > score of a negative)
    pos, neg = probs[labels == k, k], probs[labels != k, k]
    close(got['auc_class'][k], np.mean(pos[:, None] > neg[None, :]))


@pytest.mark.filterwarnings('ignore:y_pred contains classes not in y_true')
def test_class_missing_from_references_is_left_out_of_averages():
  labels, probs = _random_fold(2, drop_class=3)
  preds = probs.argmax(1)
  got = metrics.classification_metrics(labels, probs)
  assert np.isnan(got['f1_class'][3]) and np.isnan(got['auc_class'][3])
  present = [0, 1, 2, 4]
  np.testing.assert_allclose(got['aca'], skm.balanced_accuracy_score(labels, preds), rtol=1e-12)
  np.testing.assert_allclose(got['f1_avg'], np.mean(skm.f1_score(labels, preds, labels=present,
                                                                 average=None)), rtol=1e-12)
  assert np.asarray(got['cm']).shape == (5, 5)


def test_fold_average_is_mean_and_population_std():
  folds = [metrics.classification_metrics(*_random_fold(s)) for s in range(3)]
  summary = metrics.average_folds(folds)
  for name in ('aca', 'kappa', 'f1_avg', 'auc_avg'):
    values = [f[name] for f in folds]
    np.testing.assert_allclose(summary[name]['mean'], np.mean(values), rtol=1e-12)
    np.testing.assert_allclose(summary[name]['std'], np.std(values), rtol=1e-12)
  np.testing.assert_allclose(summary['f1_class']['mean'],
                             np.mean([f['f1_class'] for f in folds], 0), rtol=1e-12)


def _flair_splits(labels, shots_train, shots_val, shots_test, seed):
  """PyTorch FLAIR's get_dataloader_splits, transcribed on sample records."""

  def get_shots(s, n):
    return int(int(s[:-1]) / 100 * n) if '%' in str(s) else int(s)

  data = [{'id': i, 'label': int(y)} for i, y in enumerate(labels)]
  random.seed(seed)
  random.shuffle(data)
  shuffled = [d['label'] for d in data]
  out = {'train': [], 'val': [], 'test': []}
  for label in np.unique(shuffled):
    idx = list(np.squeeze(np.argwhere(np.asarray(shuffled) == label)))
    tr, va, te = (get_shots(shots_train, len(idx)), get_shots(shots_val, len(idx)),
                  get_shots(shots_test, len(idx)))
    out['test'] += [data[i]['id'] for i in idx[:te]]
    out['train'] += [data[i]['id'] for i in idx[te:te + tr]]
    out['val'] += [data[i]['id'] for i in idx[te + tr:te + tr + va]]
  return out


@pytest.mark.parametrize('shots', [('80%', '0%', '20%'), ('3', '2', '5'), ('0%', '0%', '100%'),
                                   ('50%', '10%', '30%')])
@pytest.mark.parametrize('seed', [0, 3])
def test_fold_split_matches_flair_rule(shots, seed):
  labels = np.repeat([0, 1, 2], [23, 11, 7])[np.random.default_rng(5).permutation(41)]
  got = splits.fold_split(labels, shots_train=shots[0], shots_val=shots[1], shots_test=shots[2],
                          seed=seed)
  want = _flair_splits(labels, *shots, seed)
  for part in ('train', 'val', 'test'):
    assert got[part].tolist() == want[part]


def test_fold_split_known_example():
  # random.seed(0); random.shuffle(8 samples) orders them 4 1 5 2 0 3 7 6:
  # class 0 -> 4 1 2 0 3, class 1 -> 5 7 6. 40% of 5 -> 2 test, of 3 -> 1.
  labels = np.array([0, 0, 0, 0, 0, 1, 1, 1])
  got = splits.fold_split(labels, shots_train='2', shots_val='1', shots_test='40%', seed=0)
  assert got['test'].tolist() == [4, 1, 5]
  assert got['train'].tolist() == [2, 0, 7, 6]
  assert got['val'].tolist() == [3]  # class 1 has nothing left


def test_shots_reject_malformed_values():
  assert splits.num_shots('20%', 9) == 1 and splits.num_shots(4, 9) == 4
  with pytest.raises(ValueError, match='percentage'):
    splits.num_shots('twenty', 9)


def test_linear_probe_separates_separable_features():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 37)) * 4
  labels = np.repeat([0, 1, 2], [19, 13, 11])
  feats = (centres[labels] + rng.normal(size=(labels.size, 37))).astype(np.float32)
  split = splits.fold_split(labels, shots_train='70%', shots_test='30%', seed=1)
  clf = linear_probe.fit(feats[split['train']], labels[split['train']])
  probs = linear_probe.predict(clf, feats[split['test']], 4)
  assert probs.shape == (split['test'].size, 4)
  np.testing.assert_array_equal(probs.argmax(1), labels[split['test']])
  assert np.all(probs[:, 3] == 0)  # a class unseen in training never scores
  assert clf.C == 0.316 and clf.class_weight == 'balanced' and clf.max_iter == 1000


def test_linear_probe_binary_scores_are_flairs_sigmoid():
  rng = np.random.default_rng(1)
  labels = np.repeat([0, 1], [17, 7])
  feats = (rng.normal(size=(24, 11)) + 2.0 * labels[:, None]).astype(np.float32)
  clf = linear_probe.fit(feats, labels)
  probs = linear_probe.predict(clf, feats, 2)
  score = 1 / (1 + np.exp(-(feats @ clf.coef_.T + clf.intercept_)))  # FLAIR's binary head
  np.testing.assert_allclose(probs, np.concatenate([1 - score, score], 1), atol=1e-6)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope='module')
def adapter_data():
  rng = np.random.default_rng(7)
  d, c = 24, 3
  text = _unit(rng.normal(size=(c, d))).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2, 0])
  x = _unit(text[labels] + 0.6 * rng.normal(size=(labels.size, d))).astype(np.float32)
  return x, labels, text, np.float32(np.log(1 / 0.07))


def test_tip_adapter_equals_numpy(adapter_data):
  x, labels, text, _ = adapter_data
  keys, values = adapters.tip_cache(x, labels, 3)
  query = x[:4] * 0.9 + x[3:] * 0.1
  got = adapters.predict_tip_adapter(query, text, keys, values)
  logits = 100 * query @ text.T + np.exp(-5 * (1 - query @ x.T)) @ np.eye(3)[labels]
  want = np.exp(logits - logits.max(1, keepdims=True))
  np.testing.assert_allclose(got, want / want.sum(1, keepdims=True), atol=1e-5)


def test_clip_adapter_training_matches_torch(adapter_data):
  x, labels, text, logit_scale = adapter_data
  epochs, order = 3, np.array([4, 0, 6, 2, 5, 1, 3])
  params = adapters.clip_adapter_init(x.shape[1], seed=1)
  got, losses = adapters.fit_clip_adapter(x, labels, text, logit_scale, epochs=epochs,
                                          params=params, order=order)
  # FLAIR's ClipAdapter.train, transcribed.
  net = torch.nn.Sequential(torch.nn.Linear(24, 6, bias=False), torch.nn.ReLU(),
                            torch.nn.Linear(6, 24, bias=False), torch.nn.ReLU())
  with torch.no_grad():
    net[0].weight.copy_(torch.from_numpy(np.asarray(params['w1']).T.copy()))
    net[2].weight.copy_(torch.from_numpy(np.asarray(params['w2']).T.copy()))
  opt = torch.optim.AdamW(net.parameters(), lr=1e-3, eps=1e-4)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * x.shape[0])
  tx, tt, scale = torch.from_numpy(x), torch.from_numpy(text), float(np.exp(logit_scale))
  want_losses = []
  for _ in range(epochs):
    for i in order:
      xb = tx[i].unsqueeze(0)
      xb = 0.2 * net(xb) + 0.8 * xb
      xb = xb / xb.norm(dim=-1, keepdim=True)
      loss = torch.nn.functional.cross_entropy(scale * xb @ tt.t(), torch.tensor([labels[i]]))
      opt.zero_grad()
      loss.backward()
      opt.step()
      sched.step()
      want_losses.append(loss.item())
  np.testing.assert_allclose(losses, want_losses, atol=2e-5)
  np.testing.assert_allclose(np.asarray(got['w1']), net[0].weight.detach().numpy().T, atol=2e-6)
  np.testing.assert_allclose(np.asarray(got['w2']), net[2].weight.detach().numpy().T, atol=2e-6)


def test_tip_adapter_f_training_matches_torch(adapter_data):
  x, labels, text, logit_scale = adapter_data
  epochs, order = 2, np.array([2, 5, 0, 3, 6, 1, 4])
  keys, values, losses = adapters.fit_tip_adapter_f(x, labels, text, logit_scale, 3,
                                                    epochs=epochs, order=order)
  # FLAIR's TipAdapter.train with train=True, transcribed (the trainable
  # weight aliases cache_keys, as in the original).
  tx = torch.from_numpy(x.copy())
  cache_keys = torch.transpose(tx, 1, 0).to(torch.float32)
  cache_values = torch.nn.functional.one_hot(torch.from_numpy(labels)).to(torch.float32)
  layer = torch.nn.Linear(cache_keys.shape[0], cache_keys.shape[1], bias=False)
  layer.weight = torch.nn.Parameter(cache_keys.t())
  opt = torch.optim.AdamW(layer.parameters(), lr=1e-3, eps=1e-4)
  scale, tt = float(np.exp(logit_scale)), torch.from_numpy(text)
  want_losses = []
  for _ in range(epochs):
    for i in order:
      image = cache_keys[:, i].unsqueeze(0)
      target = cache_values[i, :].argmax().unsqueeze(0)
      clip_logits = scale * (image @ tt.t())
      cache_logits = torch.exp(-(5 - 5 * layer(image))) @ cache_values / x.shape[0] * scale
      loss = torch.nn.functional.cross_entropy(clip_logits + cache_logits, target)
      opt.zero_grad()
      loss.backward()
      opt.step()
      want_losses.append(loss.item())
  np.testing.assert_allclose(losses, want_losses, atol=2e-5)
  np.testing.assert_allclose(np.asarray(keys), layer.weight.detach().numpy(), atol=2e-6)
  probs = adapters.predict_tip_adapter(x, text, keys, values)
  with torch.no_grad():  # fresh test features (tx now holds the trained keys)
    tq = torch.from_numpy(x)
    logits = 100 * tq @ tt.t() + torch.exp(-(5 - 5 * layer(tq))) @ cache_values
  np.testing.assert_allclose(probs, torch.softmax(logits, -1).numpy(), atol=1e-5)


SYNTH_CLASSES = ('normal', 'microaneurysms', 'haemorrhages', 'hard exudates', 'drusens', 'glaucoma')


def flair_transfer_canvas(image_u8, size):
  """PyTorch FLAIR's transfer loader (LoadImage + ImageScaling), transcribed."""
  import torchvision
  img = np.transpose(np.asarray(image_u8, float) / 255, (2, 0, 1))
  img = torch.tensor(img)
  if img.shape[-1] == img.shape[-2]:
    img = torchvision.transforms.Resize((size, size))(img)
  else:
    scale = max(img.shape[-2:]) / size
    size_hw = (int(img.shape[-2] / scale), int(img.shape[-1] / scale))
    img = torchvision.transforms.Resize(size_hw)(img)
    img = torch.nn.functional.pad(img, (0, size - img.shape[-1], 0, size - img.shape[-2], 0, 0))
  return img.to(torch.float32)


@pytest.fixture(scope='module')
def downstream(tmp_path_factory):
  """A built synthetic downstream set, a tiny checkpoint and the PyTorch
  FLAIR-equivalent model's features and prototypes on it."""
  from data_pipelines import build
  from data_pipelines.tokenizer import load_tokenizer
  from flair_jax.evaluation import data
  from tests import test_inference as ti

  root = tmp_path_factory.mktemp('downstream')
  report = build.build('fundus_classification', root / 'tfds', synthetic=True, n_test=31,
                       canvas=ti.SIZE, seed=3, verbose=False)
  tokenizer = load_tokenizer(ti.vocab_file(root, SYNTH_CLASSES))
  tm, jm = ti.tiny_pair(seed=1)
  ckpt, _ = ti.save_tiny_checkpoint(jm, tokenizer, root)
  dataset = data.from_tfds(report['path'])
  assert dataset.class_names == SYNTH_CLASSES
  canvases = torch.stack([flair_transfer_canvas(dataset.images[i], ti.SIZE)
                          for i in range(len(dataset.images))])
  with torch.no_grad():
    raw = tm.vision_model.model(canvases)
    emb = tm.vision_model.projection_head_vision(raw)
  protos = ti.flair_text_embeddings(tm, tokenizer, list(SYNTH_CLASSES), True)
  with torch.no_grad():  # FLAIR's ZeroShot.predict
    zero_shot = torch.softmax(emb @ protos.t() * tm.logit_scale.exp(), -1).numpy()
  return dict(root=root, path=report['path'], ckpt=ckpt, dataset=dataset, raw=raw.numpy(),
              emb=emb.numpy(), zero_shot=zero_shot, protos=protos.numpy())


def _run_cli(args, out):
  from flair_jax import evaluate
  results = evaluate.main([*args, '--out', str(out)])
  with open(out / 'metrics.json', encoding='utf-8') as f:
    written = json.load(f)
  assert (out / 'confusion_matrix.png').stat().st_size > 1000
  return results, written, np.load(out / 'predictions.npz')


def test_zero_shot_command_matches_pytorch_flair(downstream, capsys):
  out = downstream['root'] / 'zs'
  results, written, preds = _run_cli(['--checkpoint', downstream['ckpt'], '--method', 'zero-shot',
                                      '--data', downstream['path'], '--batch-size', '5'], out)
  labels = downstream['dataset'].labels
  indices, probs = preds['fold0_indices'], preds['fold0_probs']
  assert sorted(indices.tolist()) == list(range(31))  # 100% test, one fold
  np.testing.assert_allclose(probs, downstream['zero_shot'][indices], atol=1e-5, rtol=0)
  want = metrics.classification_metrics(labels[indices], downstream['zero_shot'][indices])
  assert written['summary']['aca']['mean'] == pytest.approx(want['aca'])
  assert written['summary']['kappa']['std'] == 0.0
  assert written['class_names'] == list(SYNTH_CLASSES)
  assert 'ACA (balanced accuracy)' in capsys.readouterr().out
  assert results['experiment']['domain_knowledge'] is True


@pytest.fixture(scope='module')
def loaded(downstream):
  """The checkpoint loaded once (its encoder compiles once for both tests)."""
  from flair_jax.inference import FLAIRModel
  return FLAIRModel.from_pretrained(downstream['ckpt'])


def test_linear_probe_follows_flair_folds(downstream, loaded):
  from flair_jax.evaluation import run
  results = run.run(loaded, downstream['dataset'], run.Experiment(
      method='linear-probe', folds=2, shots_train='60%', shots_test='40%'), progress=False)
  labels = downstream['dataset'].labels
  assert len(results['folds']) == 2
  for k, (fold, pred) in enumerate(zip(results['folds'], results['predictions'])):
    split = splits.fold_split(labels, shots_train='60%', shots_val='0%', shots_test='40%', seed=k)
    np.testing.assert_array_equal(pred['test_indices'], split['test'])
    assert fold['n_train'] == split['train'].size
    # FLAIR's classifier on the PyTorch model's un-projected features.
    clf = linear_probe.fit(downstream['raw'][split['train']], labels[split['train']])
    want = linear_probe.predict(clf, downstream['raw'][split['test']], len(SYNTH_CLASSES))
    np.testing.assert_allclose(pred['probs'], want, atol=1e-3)
  acas = [f['aca'] for f in results['folds']]
  assert results['summary']['aca']['mean'] == pytest.approx(np.mean(acas))
  assert results['summary']['aca']['std'] == pytest.approx(np.std(acas))


def test_adapters_run_on_the_set(downstream, loaded):
  from flair_jax.evaluation import run
  for method in ('clip-adapter', 'tip-adapter', 'tip-adapter-f'):
    results = run.run(loaded, downstream['dataset'],
                      run.Experiment(method=method, folds=1, shots_train='50%', shots_test='50%'),
                      progress=False)
    probs = results['predictions'][0]['probs']
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert 0 <= results['summary']['aca']['mean'] <= 1


def test_csv_downstream_set_with_foreground_crop(downstream, fundus_dir, tmp_path):
  from flair_jax.evaluation import data
  rows = [('flair_normal_sample.png', 'normal'), ('skimage_microaneurysms.png', 'microaneurysms'),
          ('flair_sample_macular_hole.png', 'glaucoma'), ('flair_severe_nonprol_dr.jpg', 'normal')]
  csv_path = tmp_path / 'set.csv'
  csv_path.write_text(',image,atributes,categories\n' + ''.join(
      f"{i},{name},[],['{c}']\n" for i, (name, c) in enumerate(rows)))
  dataset = data.load(str(csv_path), data_root=str(fundus_dir),
                      targets='normal,microaneurysms,glaucoma')
  np.testing.assert_array_equal(dataset.labels, [0, 1, 2, 0])
  assert dataset.images[1].shape == (102, 102, 3)  # greyscale read as RGB
  _, written, _ = _run_cli(['--checkpoint', downstream['ckpt'], '--data', str(csv_path),
                            '--data-root', str(fundus_dir), '--targets',
                            'normal,microaneurysms,glaucoma', '--crop-foreground', 'true',
                            '--domain-knowledge', 'false'], tmp_path / 'out')
  assert written['num_samples'] == 4 and written['experiment']['crop_foreground'] is True
  with pytest.raises(ValueError, match='not in the targets'):
    data.load(str(csv_path), data_root=str(fundus_dir), targets='normal,glaucoma')


def test_zero_shot_during_training_without_sets_gives_no_metrics():
  """A run with periodic eval on and no eval sets logs ``{}`` and goes on."""
  from flair_jax.evaluation.during_training import ZeroShotDuringTraining  # pylint: disable=g-import-not-at-top
  from flair_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  zero_shot = ZeroShotDuringTraining({}, graphdef=None, tokenizer=None, model_config=ModelConfig(),
                                     domain_knowledge=True, knowledge='flair_repo', batch_size=8)
  assert not zero_shot
  assert zero_shot(None, None) == {}
  assert zero_shot.final(None, None) == {}


def test_all_few_shot_command_on_the_set(downstream, loaded, capsys):
  """Every method at 1 and 2 shots; the zero-shot and SS-Text
  cells against the PyTorch FLAIR-equivalent model's embeddings."""
  from flair_jax import evaluate
  from flair_jax.evaluation import sweep as sweep_lib
  out = downstream['root'] / 'few_shot'
  sweep = evaluate.main(['--checkpoint', downstream['ckpt'], '--method', 'all-few-shot',
                         '--data', downstream['path'], '--shots', '2,1', '--folds', '1',
                         '--shots-test', '2', '--batch-size', '5', '--out', str(out)])
  assert sweep['methods'] == list(sweep_lib.FEATURE_METHODS) and sweep['shots'] == [1, 2]
  printed = capsys.readouterr().out
  assert all(f'  {m} ' in printed for m in sweep['methods']) and '2 shots' in printed
  # At this temperature (100) CLAP's multiplier updates blow up with 6
  # classes; the cell is refused, said so, and the rest goes on.
  failed = [(m, k) for m in sweep['cells'] for k in (1, 2) if 'error' in sweep['cells'][m][k]]
  assert set(failed) <= {('clap-phr', 1), ('clap-phr', 2)} and sweep['skipped'] == len(failed)
  assert all('diverged' in sweep['cells'][m][k]['error'] for m, k in failed)
  assert all(f'skipped {m} at' in printed for m, _ in failed)
  with open(out / 'few_shot.json', encoding='utf-8') as f:
    written = json.load(f)
  assert set(written['cells']['lp++']) == {'1', '2'}
  assert (out / 'few_shot_aca.png').stat().st_size > 10000
  labels, emb, protos = downstream['dataset'].labels, downstream['emb'], downstream['protos']
  scale = np.exp(np.float64(loaded.logit_scale(clamped=False)))
  for k in (1, 2):
    for j in range(1):
      split = splits.fold_split(labels, shots_train=str(k), shots_test='2', seed=j)
      train, test = split['train'], split['test']
      assert sweep['cells']['clap'][k]['folds'][j]['n_train'] == train.size
      want = metrics.classification_metrics(labels[test], downstream['zero_shot'][test])
      assert sweep['cells']['zero-shot'][k]['folds'][j]['aca'] == pytest.approx(want['aca'])
      # SS-Text: w_c = t_c + sum_{i in c} x_i / tau, scored by cosine / tau.
      x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
      w = protos + np.eye(6)[labels[train]].T @ x[train] * scale
      logits = scale * x[test] @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
      probs = np.exp(logits - logits.max(1, keepdims=True))
      want = metrics.classification_metrics(labels[test], probs / probs.sum(1, keepdims=True))
      assert sweep['cells']['ss-text'][k]['folds'][j]['aca'] == pytest.approx(want['aca'])


def test_all_few_shot_on_a_csv_in_the_realistic_scenario(downstream, fundus_dir, tmp_path):
  from flair_jax import evaluate
  names = ('flair_normal_sample.png', 'skimage_microaneurysms.png',
           'flair_sample_macular_hole.png', 'flair_severe_nonprol_dr.jpg')
  classes = ['normal'] * 5 + ['microaneurysms'] * 4 + ['glaucoma'] * 3
  csv_path = tmp_path / 'set.csv'
  csv_path.write_text(',image,atributes,categories\n' + ''.join(
      f"{i},{names[i % 4]},[],['{c}']\n" for i, c in enumerate(classes)))
  args = ['--checkpoint', downstream['ckpt'], '--data', str(csv_path), '--data-root',
          str(fundus_dir), '--targets', 'normal,microaneurysms,glaucoma', '--method',
          'all-few-shot', '--scenario', 'realistic', '--folds', '1', '--shots-test', '1',
          '--out', str(tmp_path / 'out')]
  with pytest.raises(ValueError, match='positive counts'):
    evaluate.main([*args, '--shots', '0,2'])
  sweep = evaluate.main([*args, '--shots', '1'])
  assert sweep['experiment']['scenario'] == 'realistic' and sweep['skipped'] <= 1  # clap-phr
  for method in (m for m in sweep['methods'] if 'error' not in sweep['cells'][m][1]):
    fold = sweep['cells'][method][1]['folds'][0]
    # pools 4 / 3 / 2 after the test -> round(3 p) = 1 / 1 / 1
    assert fold['n_train'] == 3 and fold['n_test'] == 3
    assert 0 <= fold['aca'] <= 1
  # Fine-tuning reads the same CSV's images (one epoch: that it runs here;
  # its numbers are checked against FLAIR's train_epoch in test_finetune.py).
  ft = evaluate.main(['--checkpoint', downstream['ckpt'], '--data', str(csv_path), '--data-root',
                      str(fundus_dir), '--targets', 'normal,microaneurysms,glaucoma', '--method',
                      'ft', '--folds', '1', '--shots-test', '1', '--shots-train', '2',
                      '--epochs', '1', '--train-batch-size', '3', '--out', str(tmp_path / 'ft')])
  fold = ft['folds'][0]
  assert fold['n_train'] == 6 and fold['n_test'] == 3 and fold['epochs'] == 1
  assert ft['predictions'][0]['probs'].shape == (3, 3)
  np.testing.assert_allclose(ft['predictions'][0]['probs'].sum(1), 1, rtol=1e-5)
