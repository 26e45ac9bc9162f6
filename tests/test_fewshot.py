"""Few-shot adapters against PyTorch transcriptions of their reference code
(CLAP / ZS-LP, LP++) and closed forms (SS-Text), and the few-shot scenarios
against their counting rule."""

import numpy as np
import pytest
import torch

from flair_jax.evaluation import fewshot, splits

LOGIT_SCALE = np.float32(np.log(1 / 0.07))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope='module')
def support():
  """13 support embeddings of 3 of 4 classes (class 3 has none), prototypes."""
  rng = np.random.default_rng(11)
  d, c = 19, 4
  text = _unit(rng.normal(size=(c, d))).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 0, 1, 0])
  x = _unit(text[labels] + 0.9 * rng.normal(size=(labels.size, d))).astype(np.float32)
  return x, labels, text, c


def test_ss_text_is_its_closed_form(support):
  x, labels, text, c = support
  tau = 1 / np.exp(np.float64(LOGIT_SCALE))
  x64, t64 = _unit(x.astype(np.float64)), text.astype(np.float64)  # re-normalised
  sums = np.stack([x64[labels == k].sum(0) for k in range(c)])  # class 3: zeros
  # SS-Text: lambda = 1/N, so w_c = t_c + sum_{i in c} x_i / tau.
  # float64 on both sides: only summation order differs.
  np.testing.assert_allclose(fewshot.ss_text_weights(x, labels, text, LOGIT_SCALE, c),
                             t64 + sums / tau, rtol=1e-12, atol=1e-12)
  # SS-Text+: lambda_c = 1/n_c -> (n_c / N) sum / tau, then the repel step.
  counts = np.bincount(labels, minlength=c)
  w = t64 + counts[:, None] / labels.size * sums / tau
  delta = 2 * w - w.mean(0)
  want = w - delta / np.linalg.norm(delta, axis=1, keepdims=True)
  got = fewshot.ss_text_weights(x, labels, text, LOGIT_SCALE, c, plus=True)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  # Scored as a cosine probe at the model's temperature (float32: 1e-6).
  probs = fewshot.predict_probe(got, x, LOGIT_SCALE)
  logits = _unit(x64) @ _unit(want).T / tau
  want_p = np.exp(logits - logits.max(1, keepdims=True))
  np.testing.assert_allclose(probs, want_p / want_p.sum(1, keepdims=True), atol=2e-6)


def test_clap_multipliers_are_zero_shot_class_accuracies(support):
  x, labels, text, c = support
  logits = np.exp(np.float64(LOGIT_SCALE)) * x @ text.T
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  want = np.array([probs[labels == k, k].mean() for k in range(3)])
  want = np.append(want, want.mean())  # class 3 has no support sample
  # float32 softmax of logits up to ~14: probabilities good to ~1e-7
  np.testing.assert_allclose(fewshot.clap_multipliers(x, labels, text, LOGIT_SCALE, c), want,
                             atol=1e-6)


def _torch_probe(x, labels, text, c, orders, batch, epochs, penalty):
  """CLAP's forward_backward / outer_step with Dassl's SGD, warm-up and cosine, transcribed."""
  tx, tt = torch.from_numpy(x), torch.from_numpy(text)
  ty = torch.from_numpy(labels).long()
  scale = torch.tensor(float(LOGIT_SCALE)).exp()
  w = torch.nn.Parameter(tt.clone())
  with torch.no_grad():  # init_lagrangian_multipliers (absent class: mean of the others)
    z = torch.softmax(tx @ tt.t() * scale, -1)
    onehot = torch.nn.functional.one_hot(ty, c).float()
    lam = torch.diag(onehot.t() @ z) / onehot.sum(0)
    lam[torch.isnan(lam)] = lam[~torch.isnan(lam)].mean()
  if penalty == 'none':
    lam = torch.zeros(c)
  rho = torch.zeros(c)
  opt = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=0.0)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
  losses = []
  for e in range(epochs):
    if e < 2:  # ConstantWarmupScheduler: epoch 0 at 1e-5, then the cosine's base
      opt.param_groups[0]['lr'] = 1e-5 if e == 0 else 0.1
    for start in range(0, x.shape[0], batch):
      idx = torch.from_numpy(orders[e][start:start + batch]).long()
      feats = tx[idx] / tx[idx].norm(dim=-1, keepdim=True)
      logits = feats @ (w / w.norm(dim=-1, keepdim=True)).t() * scale
      loss = torch.nn.functional.cross_entropy(logits, ty[idx])
      loss = loss + torch.mean(lam * (w - tt).pow(2).sum(-1))
      opt.zero_grad()
      loss.backward()
      opt.step()
      losses.append(loss.item())
    if e >= 1:
      sched.step()
    if penalty == 'clap-phr':
      with torch.no_grad():
        h = (w - tt).pow(2).sum(-1)
        x_ = lam + rho * h
        lam = torch.where(x_ >= 0, x_, torch.zeros_like(h))
        rho = h.clone()
  return w.detach().numpy(), lam.numpy(), np.asarray(losses)


@pytest.mark.parametrize('penalty', ['none', 'clap-phr'])
def test_zs_lp_and_clap_training_match_torch(support, penalty):
  x, labels, text, c = support
  epochs, batch = 6, 5  # 3 batches an epoch, the last one of 3
  orders = np.stack([np.random.default_rng(e).permutation(x.shape[0]) for e in range(epochs)])
  w, lam, losses = fewshot.fit_probe(x, labels, text, LOGIT_SCALE, c, penalty=penalty,
                                     epochs=epochs, batch_size=batch, orders=orders)
  want_w, want_lam, want_losses = _torch_probe(x, labels, text, c, orders, batch, epochs, penalty)
  # float32 through 18 SGD steps at lr <= 0.1: a few ulps of the O(1) losses
  np.testing.assert_allclose(losses, want_losses, atol=2e-5)
  np.testing.assert_allclose(w, want_w, atol=2e-5)
  # lambda += rho h sums products of the squared distances above: their
  # float32 error, relative
  np.testing.assert_allclose(lam, want_lam, rtol=1e-4, atol=1e-6)
  assert np.abs(w - text).max() > 1e-3  # it did train
  if penalty == 'clap-phr':
    assert np.abs(lam - fewshot.clap_multipliers(x, labels, text, LOGIT_SCALE, c)).max() > 0


def test_lp_learning_rates_are_dassl_warmup_then_cosine():
  rates = fewshot.lp_learning_rates(300, 0.1)
  assert rates[0] == np.float32(1e-5) and rates[1] == np.float32(0.1)
  np.testing.assert_allclose(rates[151], 0.05, rtol=1e-6)  # half-way down the cosine


def test_lp_pp_matches_torch(support):
  x, labels, text, c = support
  epochs = 23  # alpha steps at epochs 10 and 20
  init = fewshot.lp_pp_init(x, labels, text, c, seed=3)
  params, losses = fewshot.fit_lp_pp(x, labels, text, c, epochs=epochs, init=init)
  # LP++'s LinearProbe_P2.forward, transcribed (no validation set).
  tx, tt = torch.from_numpy(x).double(), torch.from_numpy(text).double()
  tx, tt = tx / tx.norm(dim=-1, keepdim=True), tt / tt.norm(dim=-1, keepdim=True)
  ty = torch.from_numpy(labels).long()
  onehot = torch.nn.functional.one_hot(ty, c).double()
  centroids = onehot.t() @ tx  # compute_centroids: class sums
  lr_w = 4 * x.shape[0] / torch.linalg.eigvalsh(tx.t() @ tx).max()
  xt = tx @ tt.t()
  alpha_tilde = (onehot[:, :, None] * xt[:, None, :]).sum(0) / onehot.sum(0).clamp(min=1)[:, None]
  alpha0 = (250 * alpha_tilde).mean()
  lr_alpha = x.shape[0] / (4 * (xt ** 2).sum(0).max())
  for name, want in (('lr_w', lr_w), ('lr_alpha', lr_alpha)):
    np.testing.assert_allclose(init[name], want.item(), rtol=1e-10)  # float64 both
  np.testing.assert_allclose(init['w'], centroids.numpy(), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(init['alpha'], alpha0.item(), rtol=1e-10)
  bound = 1 / np.sqrt(x.shape[1])
  assert np.all(np.abs(init['b']) <= bound)  # nn.Linear's bias range

  classifier = torch.nn.Linear(x.shape[1], c, bias=True)
  with torch.no_grad():
    classifier.weight.copy_(centroids.float())
    classifier.bias.copy_(torch.from_numpy(init['b']).float())
  alpha = torch.full((1, c), float(alpha0), requires_grad=True)
  fx, ft = tx.float(), tt.float()
  opt = torch.optim.SGD(classifier.parameters(), float(lr_w), momentum=0.9)
  want_losses = []
  for epoch in range(epochs):
    logits = classifier(fx) + torch.ones(fx.shape[0], 1) @ alpha * (fx @ ft.t())
    loss = torch.nn.functional.cross_entropy(logits, ty)
    opt.zero_grad()
    loss.backward()
    opt.step()
    if (epoch + 1) % 10 == 0:
      alpha.data -= float(lr_alpha) * alpha.grad.data  # the summed gradient
    want_losses.append(loss.item())
  # float32 full-batch steps at lr_w ~ 4N / lambda_max: ulps of O(1) values
  np.testing.assert_allclose(losses, want_losses, atol=2e-5)
  np.testing.assert_allclose(params['w'], classifier.weight.detach().numpy(), atol=5e-5)
  np.testing.assert_allclose(params['b'], classifier.bias.detach().numpy(), atol=5e-5)
  np.testing.assert_allclose(params['alpha'], alpha.detach().numpy()[0], rtol=1e-5)  # ~100 ulps
  assert np.abs(params['alpha'] - init['alpha']).max() > 0  # alpha moved
  probs = fewshot.predict_lp_pp(params, x, text)
  with torch.no_grad():
    want_p = torch.softmax(classifier(fx) + alpha * (fx @ ft.t()), -1).numpy()
  np.testing.assert_allclose(probs, want_p, atol=2e-5)


def _reference_counts(pool, k, scenario):
  """jusiro/SS-Text's balance_split counts, transcribed (p from the pool)."""
  p = np.ones(len(pool)) / len(pool) if scenario == 'standard' else np.asarray(pool) / sum(pool)
  n = len(pool) * k
  values = []
  for c in range(len(pool)):
    v = round(n * p[c])
    if scenario != 'realistic' and v < 1:
      v = 1
    values.append(v)
  excess = sum(values) - n
  while excess > 0:
    values[int(np.argmax(values))] -= 1
    excess -= 1
  return values


def test_support_counts_known_examples():
  # 16 p = 9.52 5.71 0.57 0.19 -> 10 6 1 0; relaxed lifts the 0 and the
  # largest gives the 2 extra back.
  assert splits.support_counts([50, 30, 3, 1], 4, 'relaxed') == [8, 6, 1, 1]
  assert splits.support_counts([50, 30, 3, 1], 4, 'realistic') == [9, 6, 1, 0]
  assert splits.support_counts([50, 30, 3, 1], 4, 'standard') == [4, 4, 3, 1]  # capped


@pytest.mark.parametrize('scenario', ['standard', 'relaxed', 'realistic'])
@pytest.mark.parametrize('k', [1, 4])
def test_fewshot_split_follows_scenario_rule(scenario, k):
  labels = np.repeat([0, 1, 2, 3], [41, 17, 6, 3])[np.random.default_rng(2).permutation(67)]
  for seed in (0, 5):
    got = splits.fewshot_split(labels, k, scenario=scenario, shots_test='20%', seed=seed)
    flair = splits.fold_split(labels, shots_train='100%', shots_test='20%', seed=seed)
    np.testing.assert_array_equal(got['test'], flair['test'])
    pool = [int(np.sum(labels[flair['train']] == c)) for c in range(4)]
    want = [min(v, n) for v, n in zip(_reference_counts(pool, k, scenario), pool)]
    assert np.bincount(labels[got['train']], minlength=4).tolist() == want
    for c in range(4):  # the first of each class in FLAIR's order
      members = flair['train'][labels[flair['train']] == c]
      assert got['train'][labels[got['train']] == c].tolist() == members[:want[c]].tolist()
    if scenario == 'standard':
      np.testing.assert_array_equal(
          got['train'], splits.fold_split(labels, shots_train=str(k), shots_test='20%',
                                          seed=seed)['train'])
  with pytest.raises(ValueError, match='count of shots'):
    splits.fewshot_split(labels, '10%', scenario=scenario)
