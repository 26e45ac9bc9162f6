"""The jitted training step: device-count invariance, one compile, PyTorch parity."""

import numpy as np
import pytest
import torch

import jax
import optax
from flax import nnx

from data_pipelines import tokenizer as tokenizer_lib
from flair_jax import parallel
from flair_jax.training import optim, step as step_lib
from flair_jax.models import BertConfig, ModelConfig, VisionConfig, build_model
from tests import torch_flair

BERT = torch_flair.tiny_bert_config()
FROZEN = ['text_model/pooler/.*']  # torch leaves grad-less parameters alone
GLOBAL_BATCH = 16
IMAGE = 29


def _tiny_model():
  return build_model(ModelConfig(bert=BertConfig.from_dict(BERT), vision=VisionConfig(
      stages=(1, 1, 1, 1), width=64), proj_dim=17), rngs=nnx.Rngs(0))


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    lengths = rng.integers(3, 11, (GLOBAL_BATCH,)).astype(np.int32)
    ids = rng.integers(5, BERT['vocab_size'], (GLOBAL_BATCH, 77)).astype(np.int32)
    ids = ids * (np.arange(77)[None] < lengths[:, None])
    out.append(dict(
        image=rng.integers(0, 256, (GLOBAL_BATCH, IMAGE, IMAGE, 3), dtype=np.uint8),
        input_ids=ids.astype(np.int32), lengths=lengths,
        category=rng.integers(0, 4, (GLOBAL_BATCH,)).astype(np.int32)))
  return out


def _optimizer(lr, weight_decay=1e-5):
  return optim.make_optimizer(
      lr, weight_decay=weight_decay,
      trainable_mask=lambda p: optim.trainable_mask(p, FROZEN))


def _run(n_devices, batches, options):
  mesh = parallel.make_mesh(devices=jax.devices()[:n_devices])
  schedule = optim.flair_schedule(1e-3, steps_per_epoch=2)
  # Adam's first updates are g / (|g| + eps): an element whose gradient is
  # rounding noise (~1e-9) moves by up to lr either way, so the device-count
  # comparison uses clipped SGD; AdamW itself is checked against torch.
  tx = optax.chain(optim.clip_by_global_norm_torch(1.0), optax.sgd(schedule, momentum=0.9))
  graphdef, state = step_lib.create_train_state(_tiny_model(), tx, mesh)
  train_step = step_lib.make_train_step(graphdef, tx, mesh, schedule=schedule, options=options)
  key = jax.random.key(3)
  history, snapshots = [], []
  for batch in batches:
    state, metrics = train_step(state, parallel.global_batch(batch, mesh), key)
    history.append(jax.device_get(metrics))
    snapshots.append(jax.device_get(state))
  return snapshots, history, train_step


@pytest.fixture(scope='module')
def one_and_eight_devices():
  if len(jax.devices()) < 8:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count=8')
  batches = _batches(5)
  options = step_lib.StepOptions(augment=True, text_dropout=True)
  return _run(1, batches[:3], options), _run(8, batches, options)


# One device and eight compute the same sums over the batch in another order:
# each device reduces its 2 rows, then the all-reduce adds the 8 partials.
# A float32 sum of n terms reordered differs by at most n * u of the sum of
# the terms' magnitudes (u = 2**-24, unit roundoff). The longest batch
# reduction of the step is the gradient of the stem's kernel and its
# BatchNorm statistics: GLOBAL_BATCH rows x 15 x 15 output positions. A real
# bug (per-device BatchNorm statistics, a missing gradient all-reduce)
# changes the metrics by 1e-2 or more.
_U32 = 2.0 ** -24
_LONGEST_REDUCTION = GLOBAL_BATCH * ((IMAGE + 1) // 2) ** 2
METRICS_RTOL = _LONGEST_REDUCTION * _U32  # 2.1e-4


def test_eight_devices_equal_one_device_after_three_steps(one_and_eight_devices):
  (snaps1, hist1, _), (snaps8, hist8, _) = one_and_eight_devices
  state1, state8 = snaps1[2], snaps8[2]
  assert int(state1.step) == int(state8.step) == 3
  # Parameters move by lr * (clipped gradient) per step: the gradients'
  # relative rounding above, times lr = 1e-3, over 3 steps is far below 1e-5.
  for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(state8.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  for a, b in zip(jax.tree.leaves(state1.batch_stats), jax.tree.leaves(state8.batch_stats)):
    np.testing.assert_allclose(a, b, atol=1e-5)
  for m1, m8 in zip(hist1, hist8[:3]):
    for k in m1:
      np.testing.assert_allclose(m1[k], m8[k], rtol=METRICS_RTOL, err_msg=k)
  assert hist8[0]['lr'] == pytest.approx(1e-3 / 2)
  assert hist8[1]['lr'] == pytest.approx(1e-3)


def test_step_compiles_once_over_five_steps(one_and_eight_devices):
  _, (snapshots, history, train_step) = one_and_eight_devices
  assert len(history) == 5 and int(snapshots[-1].step) == 5
  assert train_step._cache_size() == 1
  assert all(np.isfinite(h['loss']) for h in history)


def _torch_step(tm, batch, lr, weight_decay):
  """One PyTorch FLAIR training iteration (float32, no scaler, no augmentation)."""
  lengths = batch['lengths']
  longest = int(lengths.max())
  ids = torch.from_numpy(batch['input_ids'][:, :longest].astype(np.int64))
  mask = torch.from_numpy((np.arange(longest)[None] < lengths[:, None]).astype(np.int64))
  images = torch_flair.as_nchw(batch['image'].astype(np.float32) / 255)
  cat = list(batch['category'])
  cooc = np.array([[a == b for a in cat] for b in cat], np.float32)
  target = torch.tensor(cooc / cooc.sum(-1))
  opt = torch.optim.AdamW(tm.parameters(), lr=lr, weight_decay=weight_decay)
  tm.train()
  logits_per_image = tm(images, ids, mask)
  logits_per_text = logits_per_image.t()
  loss = (torch.nn.functional.cross_entropy(logits_per_text, target)
          + torch.nn.functional.cross_entropy(logits_per_text.t(), target)) / 2
  loss.backward()
  grads = {n: p.grad.detach().numpy().copy() for n, p in tm.named_parameters()
           if p.grad is not None}
  torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
  opt.step()
  with torch.no_grad():
    tm.logit_scale.clamp_(0, 4.6052)
  return float(loss.detach()), grads


def _torch_model():
  torch.manual_seed(0)
  tm = torch_flair.TorchFLAIR(BERT, layers=(1, 1, 1, 1), proj_dim=17)
  torch_flair.randomize_batchnorm(tm)
  with torch.no_grad():
    tm.logit_scale.fill_(4.0)
  return tm


def _torch_copy(tm):
  jm = _tiny_model()
  torch_flair.copy_flair(tm, jm)
  return jm


def _as_params(tm, arrays):
  """A copy of ``tm`` whose parameters are ``arrays`` (zeros where absent)."""
  out = _torch_model()
  with torch.no_grad():
    for name, p in out.named_parameters():
      p.copy_(torch.from_numpy(arrays[name]) if name in arrays else torch.zeros_like(p))
  return out


def test_one_step_matches_pytorch_flair():
  lr, wd = 1e-4, 0.1
  tm = _torch_model()
  jm = _tiny_model()
  torch_flair.copy_flair(tm, jm)
  before = jax.device_get(nnx.state(jm, nnx.Param))
  batch = _batches(1, seed=11)[0]

  mesh = parallel.make_mesh(devices=jax.devices()[:2])
  tx = _optimizer(lr, weight_decay=wd)
  graphdef, state = step_lib.create_train_state(jm, tx, mesh)
  train_step = step_lib.make_train_step(
      graphdef, tx, mesh, options=step_lib.StepOptions(augment=False, text_dropout=False))
  state, metrics = train_step(state, parallel.global_batch(batch, mesh), jax.random.key(0))

  want_loss, torch_grads = _torch_step(tm, batch, lr, wd)
  assert abs(float(metrics['loss']) - want_loss) <= 1e-5

  # Gradients (before clipping) against torch's, laid out like NNX params.
  options = step_lib.StepOptions(augment=False, text_dropout=False)
  grad_fn = jax.jit(jax.grad(step_lib.make_loss_fn(graphdef, mesh, options=options), has_aux=True))
  init_state = step_lib.create_train_state(_torch_copy(_torch_model()), tx, mesh)[1]
  jax_grads, _ = grad_fn(init_state.params, init_state.batch_stats,
                         parallel.global_batch(batch, mesh), jax.random.key(0))
  jax_grads = dict(nnx.to_flat_state(jax.device_get(jax_grads)))
  torch_grads = dict(nnx.to_flat_state(nnx.state(_torch_copy(_as_params(tm, torch_grads)), nnx.Param)))
  assert jax_grads.keys() == torch_grads.keys()
  grad_norm = np.sqrt(sum(np.sum(np.square(g[...])) for g in torch_grads.values()))
  for path, g in torch_grads.items():
    g = np.asarray(g[...])
    err = np.max(np.abs(np.asarray(jax_grads[path][...]) - g))
    # float32 rounding through BatchNorm and the x54.6 temperature: ~1e-5
    # of each tensor's scale (measured up to 1.5e-5).
    assert err <= 5e-5 * max(1.0, np.max(np.abs(g))), path

  # Parameters after the update. Adam's first update is g / (|g| + 1e-8):
  # where the clipped |g| is near 1e-8 it turns gradient rounding into up to
  # lr of movement, so those elements are held to the sign-flip bound.
  updated = nnx.merge(graphdef, jax.device_get(state.params), jax.device_get(state.batch_stats))
  got = dict(nnx.to_flat_state(nnx.state(updated)))
  want = dict(nnx.to_flat_state(nnx.state(_torch_copy(tm))))
  assert got.keys() == want.keys()
  clip = min(1.0, 1.0 / (grad_norm + 1e-6))
  ill = total = 0
  for path in got:
    name = '/'.join(map(str, path))
    diff = np.abs(np.asarray(got[path][...], np.float64) - np.asarray(want[path][...], np.float64))
    if path in torch_grads:
      well = clip * np.abs(np.asarray(torch_grads[path][...])) > 1e-6
      ill += int(np.sum(~well))
      total += well.size
      assert np.all(diff[well] <= 1e-5), name
      assert np.all(diff <= 2 * lr * (1 + wd)), name
    else:  # BatchNorm running statistics and counters
      assert np.all(diff <= 1e-5), name
  print(f'grad norm {grad_norm:.3g}; elements held to the sign-flip bound: {ill} of {total}')
  moved = optax.tree.norm(jax.tree.map(lambda a, b: a - b, nnx.state(updated, nnx.Param), before))
  assert float(moved) > 1e-3  # the step did change the parameters


def test_rematerialised_towers_give_the_same_loss_and_gradients():
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  graphdef, params, stats = step_lib.split_model(_tiny_model())
  batch = parallel.global_batch(_batches(1, seed=5)[0], mesh)
  key = jax.random.key(1)
  out = []
  for remat in (False, True):
    options = step_lib.StepOptions(augment=True, text_dropout=True, remat=remat)
    loss_fn = step_lib.make_loss_fn(graphdef, mesh, options=options)
    (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, stats, batch, key)
    out.append((float(loss), jax.device_get(grads)))
  assert out[0][0] == pytest.approx(out[1][0], abs=1e-6)
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    # Recomputation fuses differently: rounding relative to each tensor's scale.
    assert np.max(np.abs(a - b)) <= 1e-5 * max(1.0, np.max(np.abs(b)))


def test_text_cut_to_its_bucket_gives_the_loss_and_gradients_of_77_tokens():
  """FLAIR pools over the batch's longest caption; positions past it are
  masked out of attention (weight exp(dtype-min) = 0) and out of the pooling
  (weight 0), so any width holding the longest caption gives the same sums
  up to their order."""
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  graphdef, params, stats = step_lib.split_model(_tiny_model())
  batch = _batches(1, seed=7)[0]  # captions of 3 to 10 tokens: cut to 16
  cut = dict(batch, input_ids=tokenizer_lib.cut_to_bucket(batch['input_ids'], batch['lengths']))
  assert cut['input_ids'].shape == (GLOBAL_BATCH, 16)
  options = step_lib.StepOptions(augment=True, text_dropout=False)
  loss_fn = jax.jit(jax.value_and_grad(step_lib.make_loss_fn(graphdef, mesh, options=options),
                                       has_aux=True))
  key = jax.random.key(2)
  (loss77, _), grads77 = loss_fn(params, stats, parallel.global_batch(batch, mesh), key)
  (loss16, _), grads16 = loss_fn(params, stats, parallel.global_batch(cut, mesh), key)
  # Sums of up to 77 terms reordered: within 77 * 2**-24 of their scale.
  rtol = 77 * 2.0 ** -24
  np.testing.assert_allclose(float(loss16), float(loss77), rtol=rtol)
  # A tensor whose gradient cancels to ~1e-12 (rounding noise) is held to
  # the scale of the terms that cancelled: 1e-4 of the largest gradient.
  scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(grads77))
  for a, b in zip(jax.tree.leaves(grads16), jax.tree.leaves(grads77)):
    assert np.max(np.abs(a - b)) <= rtol * max(np.max(np.abs(b)), 1e-4 * scale)


def _count_primitives(jaxpr, names):
  """Equations named ``names`` in ``jaxpr`` and the jaxprs nested in it."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in names
    for value in eqn.params.values():
      inner = getattr(value, 'jaxpr', value)
      if hasattr(inner, 'eqns'):
        count += _count_primitives(inner, names)
  return count


def test_remat_rematerialises_each_block_of_both_towers():
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  graphdef, params, stats = step_lib.split_model(_tiny_model())
  batch = parallel.global_batch(_batches(1)[0], mesh)

  def checkpoints(remat):
    options = step_lib.StepOptions(remat=remat)
    loss_fn = step_lib.make_loss_fn(graphdef, mesh, options=options)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss_fn(p, stats, batch, jax.random.key(0))[0]))(
        params)
    return _count_primitives(jaxpr.jaxpr, ('remat2', 'checkpoint'))

  # 4 bottlenecks (stages 1, 1, 1, 1) and BERT's layers, each its own region.
  assert checkpoints(False) == 0
  assert checkpoints(True) == 4 + BERT['num_hidden_layers']
