"""FLAIR's full fine-tuning: the image tower and a linear classifier (FT, LP+FT).

As PyTorch FLAIR's ``FineTuning`` (classification): a linear layer on the
tower's un-projected features (``out_features``, 2048 for ResNet-50; the
same features as the linear probe), torch's default initialisation or, for
LP+FT, the linear probe's weights fitted on the frozen tower's features;
every tower parameter trains; AdamW (lr 1e-4, eps 1e-4, torch's default
weight decay 0.01) after clipping the gradients to global norm 1; softmax
cross-entropy, or with a probe of one output (two classes) a sigmoid and
binary cross-entropy, as FLAIR; BatchNorm in train mode (``update_bn``) or
eval mode; FLAIR's pre-training augmentation of the training batches with
``fta``; 50 epochs of batches of 4 in a new order each epoch (the last batch
smaller, as ``drop_last=False``). After each epoch the validation split's
macro F1 is scored; the best weights (tower, BatchNorm statistics,
classifier) are kept and training stops after ``patience`` epochs without
improvement. ``last_lp`` replaces the classifier by a linear probe fitted on
the fine-tuned tower's features. Test scores: softmax (or sigmoid) of the
classifier on the tower in eval mode.

Where FLAIR fails, this module does what it evidently means: LP+FT with
more than two classes keeps softmax cross-entropy (FLAIR switches to binary
cross-entropy for every probe and then cannot match its label shapes); with
no validation split, or no epoch whose macro F1 beats 0, the last weights
are kept (FLAIR's ``save_best`` loads an empty state then); ``last_lp``
predicts with the probe's own probabilities.

The step is one jitted function of ``(state, images, labels, key)``: the
state replicated and donated, the batch split over the devices' ``'data'``
axis when its rows divide evenly (else every device computes the whole
batch: the same numbers), BatchNorm statistics over the whole batch. Each
epoch's order is a function of ``(seed, epoch)`` and each step's
augmentation of ``(seed, step)``, and an orbax checkpoint of the fold
(state, best weights, early-stopping counters) is written after every
epoch, so a killed run resumes at its last finished epoch and ends with the
same weights; a finished fold leaves its test scores in ``result.npz``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

from data_pipelines import images as images_lib
from flair_jax import parallel
from flair_jax.evaluation import linear_probe, metrics
from flair_jax.training import augment as augment_lib
from flair_jax.training import checkpoints as checkpoints_lib
from flair_jax.training import optim
from flair_jax.training.step import TrainState

logger = logging.getLogger(__name__)

# main_transferability.py's defaults.
EPOCHS = 50
BATCH_SIZE = 4
LR = 1e-4
PATIENCE = 10
EPS = 1e-4
WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default
CLIP_NORM = 1.0
RESULT_FILE = 'result.npz'


@dataclasses.dataclass(frozen=True)
class Options:
  """FLAIR's fine-tuning settings (``main_transferability`` defaults)."""
  epochs: int = EPOCHS
  batch_size: int = BATCH_SIZE
  lr: float = LR
  patience: int = PATIENCE
  update_bn: bool = True
  freeze_classifier: bool = False
  last_lp: bool = False

  def __post_init__(self):
    for name in ('epochs', 'batch_size', 'patience'):
      if getattr(self, name) < 1:
        raise ValueError(f'fine-tuning {name} must be >= 1, got {getattr(self, name)}')


class Tower:
  """An image tower's graph (eval and train mode), its weights and a mesh.

  Args:
    vision: the tower module (e.g. ``FLAIRModel.model.vision_model``); left
      in eval mode.
    mesh: default: this process's devices on the ``'data'`` axis.
  """

  def __init__(self, vision: nnx.Module, mesh=None):
    vision.eval()
    self.eval_graphdef, self.params, self.batch_stats = nnx.split(vision, nnx.Param, nnx.BatchStat)
    vision.train()
    self.train_graphdef = nnx.split(vision, nnx.Param, nnx.BatchStat)[0]
    vision.eval()
    self.out_features = int(vision.out_features)
    self.mesh = mesh or parallel.make_mesh(devices=jax.local_devices())
    self.num_shards = self.mesh.shape[parallel.BATCH_AXIS]

  def place(self, x):
    """A host batch on the mesh: split when its rows divide, else replicated."""
    split = x.shape[0] % self.num_shards == 0
    return jax.device_put(x, parallel.batch_sharding(self.mesh) if split
                          else parallel.replicated(self.mesh))


def init_classifier(key, in_features: int, out_features: int) -> dict:
  """torch ``nn.Linear``'s default init: kernel ``[in, out]`` and bias U(+-1/sqrt(in))."""
  k_w, k_b = jax.random.split(key)
  bound = 1.0 / np.sqrt(in_features)
  return {'kernel': jax.random.uniform(k_w, (in_features, out_features), jnp.float32, -bound, bound),
          'bias': jax.random.uniform(k_b, (out_features,), jnp.float32, -bound, bound)}


def classifier_from_probe(probe, num_classes: int) -> dict:
  """The fitted linear probe as a classifier (``coef_.T``, ``intercept_``).

  Two classes give one output (FLAIR then scores with a sigmoid).
  """
  seen = len(probe.classes_)
  if seen != num_classes:
    raise ValueError(f'LP+FT initialises its classifier from a linear probe, whose training split '
                     f'holds {seen} of the {num_classes} classes; raise shots_train')
  return {'kernel': jnp.asarray(probe.coef_.T, jnp.float32),
          'bias': jnp.asarray(probe.intercept_, jnp.float32)}


def classify(classifier: dict, feat_bf):
  """Logits ``[B, K]`` of features ``[B, F]``."""
  return feat_bf @ classifier['kernel'] + classifier['bias']


def scores(logits_bk):
  """Class probabilities ``[B, C]``: softmax, or ``[1 - s, s]`` of one output's sigmoid."""
  if logits_bk.shape[-1] == 1:
    s = jax.nn.sigmoid(logits_bk)
    return jnp.concatenate([1 - s, s], -1)
  return jax.nn.softmax(logits_bk, -1)


def loss(logits_bk, labels_b):
  """FLAIR's loss: mean cross-entropy, binary with logits for one output."""
  if logits_bk.shape[-1] == 1:
    return jnp.mean(optax.sigmoid_binary_cross_entropy(
        logits_bk[:, 0], labels_b.astype(jnp.float32)))
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits_bk, labels_b))


def make_optimizer(lr: float = LR, freeze_classifier: bool = False) -> optax.GradientTransformation:
  """Clipping to norm 1 then FLAIR's AdamW; a frozen classifier gets no update."""
  mask = None
  if freeze_classifier:
    mask = lambda params: {'vision': jax.tree.map(lambda _: True, params['vision']),
                           'classifier': jax.tree.map(lambda _: False, params['classifier'])}
  return optim.make_optimizer(lr, eps=EPS, weight_decay=WEIGHT_DECAY, clip_norm=CLIP_NORM,
                              trainable_mask=mask)


def create_state(tower: Tower, classifier: dict, tx: optax.GradientTransformation) -> TrainState:
  """The initial state, replicated on the tower's mesh (fresh buffers: the
  step donates them, the tower keeps its own)."""

  def init(params, batch_stats):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params))

  replicated = parallel.replicated(tower.mesh)
  # The classifier comes from the default device, the tower from the model's
  # mesh: one placement (the devices are this process's own).
  params, batch_stats = jax.device_put(
      ({'vision': tower.params, 'classifier': classifier}, tower.batch_stats), replicated)
  return jax.jit(init, out_shardings=replicated)(params, batch_stats)


def make_train_step(graphdef, tx: optax.GradientTransformation, mesh, *, augment: bool):
  """``train_step(state, images [B, S, S, 3], labels [B], key) -> (state, metrics)``, jitted.

  Args:
    graphdef: the tower's graph in train mode (BatchNorm updates its
      statistics) or eval mode (``update_bn`` off).
    tx: :func:`make_optimizer`.
    mesh: the tower's mesh (outputs replicated on it).
    augment: FLAIR's pre-training augmentation of the batch (``fta``),
      drawn from ``fold_in(key, state.step)``.
  """

  def loss_fn(params, batch_stats, images, labels, key):
    vision = nnx.merge(graphdef, params['vision'], batch_stats, copy=True)
    if augment:
      images = augment_lib.augment(key, images)
    logits = classify(params['classifier'], vision(images))
    return loss(logits, labels), nnx.state(vision, nnx.BatchStat)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, images, labels, key):
    key = jax.random.fold_in(key, state.step)
    (value, batch_stats), grads = grad_fn(state.params, state.batch_stats, images, labels, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state)
    return new_state, {'loss': value, 'l2_grads': optax.tree.norm(grads)}

  replicated = parallel.replicated(mesh)
  return jax.jit(train_step, out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_predict(graphdef, mesh):
  """``predict(params, batch_stats, images) -> (probs [B, C], features [B, F])``,
  jitted; ``graphdef`` in eval mode."""

  def predict(params, batch_stats, images):
    vision = nnx.merge(graphdef, params['vision'], batch_stats)
    feat_bf = vision(images)
    return scores(classify(params['classifier'], feat_bf)), feat_bf

  return jax.jit(predict, out_shardings=parallel.replicated(mesh))


def load_canvases(images: Sequence, indices, *, image_size: int, crop: bool = False,
                  num_workers: int = 4, progress: bool = True, desc: str = 'canvases') -> dict:
  """``{index: float32 [S, S, 3]}``: FLAIR's transfer canvas of each image
  read once (``data_pipelines.images.flair_transfer_canvas``)."""
  indices = sorted({int(i) for i in indices})
  load = lambda i: images_lib.flair_transfer_canvas(images[i], image_size, crop)
  out = {}
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    for i, canvas in tqdm(zip(indices, pool.map(load, indices)), total=len(indices), desc=desc,
                          unit='img', disable=not progress, dynamic_ncols=True):
      out[i] = canvas.astype(np.float32)
  return out


def epoch_order(train_n, seed: int, epoch: int) -> np.ndarray:
  """The training indices in epoch ``epoch``'s order (a function of both)."""
  return np.asarray(train_n)[np.random.default_rng([seed, epoch]).permutation(len(train_n))]


class _FoldCheckpoints:
  """Orbax checkpoints of one fold after each epoch: ``state`` (the training
  state), ``best`` (the best weights) and ``meta`` (epoch, early-stopping
  counters, the settings they belong to)."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    # Two epochs kept: when the newest does not restore, the one before does.
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def save(self, epoch: int, state, best, meta: dict) -> None:
    self.manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, state, best, settings: dict):
    """``(state, best, meta)`` of the newest epoch that restores, in the
    shapes and shardings of the arguments; None when there is none. An
    epoch that does not restore (a damaged or unfinished write) is moved
    aside as ``<epoch>.damaged-<time>`` and logged."""
    abstract = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    for epoch in sorted(self.manager.all_steps(), reverse=True):
      try:
        with checkpoints_lib.quiet_abandoned_reads():
          restored = self.manager.restore(epoch, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract(state)),
              best=ocp.args.StandardRestore(abstract(best)), meta=ocp.args.JsonRestore()))
      except Exception as error:  # pylint: disable=broad-except
        aside = os.path.join(self.directory, f'{epoch}.damaged-{time.strftime("%Y%m%d-%H%M%S")}')
        os.rename(os.path.join(self.directory, str(epoch)), aside)
        logger.warning('fine-tuning checkpoint of epoch %d does not restore (%s); moved it to %s',
                       epoch, checkpoints_lib.short_reason(error), aside)
        self.manager.reload()
        continue
      _check_settings(restored['meta']['settings'], settings, self.directory)
      return restored['state'], restored['best'], restored['meta']
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _check_settings(saved: dict, current: dict, where: str) -> None:
  drift = checkpoints_lib.config_drift(saved, current)
  if drift:
    raise ValueError(f'{where} holds a fine-tuning run of other settings ({"; ".join(drift)}); '
                     'rerun with those, or pass another --out')


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


@dataclasses.dataclass
class _Progress:
  """Where a fold's training stands after an epoch."""
  epoch: int = 0          # epochs done
  best_f1: float = 0.0    # FLAIR's initial best validation metric
  best_epoch: int = 0     # 0: no epoch improved on it yet
  counter: int = 0        # epochs since the last improvement
  stopped: bool = False   # early stopping


class FoldTrainer:
  """Fine-tunes and scores one fold at a time on a set's canvases.

  Args:
    tower: the pre-trained image tower (:class:`Tower`).
    canvases: ``{index: canvas}`` of every image a fold may use.
    labels_n: the set's labels.
    num_classes: number of classes.
    options: :class:`Options`.
    from_probe: LP+FT (classifier initialised from the linear probe).
    augment: FLAIR's ``fta`` (augmented training batches).
    probe_features: the frozen tower's features ``[N, F]`` (LP+FT).
    workdir: folder of the folds' checkpoints and results; None: none kept.
    eval_batch_size: rows per validation / test batch (padded).
    progress: show a progress bar.
  """

  def __init__(self, tower: Tower, canvases: dict, labels_n, *, num_classes: int,
               options: Options = Options(), from_probe: bool = False, augment: bool = False,
               probe_features=None, workdir: Optional[str] = None, eval_batch_size: int = 32,
               progress: bool = True):
    if from_probe and probe_features is None:
      raise ValueError('LP+FT needs the frozen features of the training images')
    self.tower, self.canvases, self.labels_n = tower, canvases, np.asarray(labels_n)
    self.num_classes, self.options = num_classes, options
    self.from_probe, self.augment, self.probe_features = from_probe, augment, probe_features
    self.workdir, self.progress = workdir, progress
    self.eval_rows = -(-max(eval_batch_size, 1) // tower.num_shards) * tower.num_shards
    self.tx = make_optimizer(options.lr, options.freeze_classifier)
    graphdef = tower.train_graphdef if options.update_bn else tower.eval_graphdef
    self.train_step = make_train_step(graphdef, self.tx, tower.mesh, augment=augment)
    self.predict_fn = make_predict(tower.eval_graphdef, tower.mesh)

  def _batch(self, indices) -> np.ndarray:
    return np.stack([self.canvases[int(i)] for i in indices])

  def predict(self, params, batch_stats, indices) -> tuple[np.ndarray, np.ndarray]:
    """``(probs [M, C], features [M, F])`` of images ``indices``, eval mode."""
    probs, feats = [], []
    for start in range(0, len(indices), self.eval_rows):
      chunk = indices[start:start + self.eval_rows]
      x = np.zeros((self.eval_rows, *self.canvases[int(chunk[0])].shape), np.float32)
      x[:len(chunk)] = self._batch(chunk)
      p, f = self.predict_fn(params, batch_stats, self.tower.place(x))
      probs.append(np.asarray(p)[:len(chunk)])
      feats.append(np.asarray(f)[:len(chunk)])
    return np.concatenate(probs).astype(np.float64), np.concatenate(feats)

  def _initial_classifier(self, train, seed):
    if self.from_probe:
      probe = linear_probe.fit(self.probe_features[train], self.labels_n[train])
      return classifier_from_probe(probe, self.num_classes)
    return init_classifier(jax.random.key(seed), self.tower.out_features, self.num_classes)

  def settings(self, split: dict, seed: int) -> dict:
    """What a fold's checkpoints belong to (a resumed run must match)."""
    digest = lambda v: hashlib.sha256(np.asarray(v, np.int64).tobytes()).hexdigest()[:16]
    return {'options': dataclasses.asdict(self.options), 'from_probe': self.from_probe,
            'augment': self.augment, 'seed': seed,
            'split': {k: f'{len(v)} images, sha256 {digest(v)}' for k, v in split.items()}}

  def __call__(self, fold: int, seed: int, split: dict) -> tuple[np.ndarray, dict]:
    """Fine-tunes on ``split['train']`` (early stopping on ``split['val']``)
    and scores ``split['test']``.

    Returns:
      ``(probs [M, C], info)``; info: ``epochs`` run, ``best_epoch`` (0:
      none improved), ``best_val_f1``, ``stopped_early``.
    """
    fold_dir = os.path.join(self.workdir, f'fold{fold}') if self.workdir else None
    settings = self.settings(split, seed)
    result_path = os.path.join(fold_dir, RESULT_FILE) if fold_dir else None
    if result_path and os.path.exists(result_path):
      with np.load(result_path) as saved:
        _check_settings(json.loads(str(saved['settings'])), settings, fold_dir)
        logger.info('fold %d: fine-tuned before, read %s', fold, result_path)
        return saved['probs'], json.loads(str(saved['info']))
    if split['train'].size == 0:
      raise ValueError('fine-tuning needs training samples; raise shots_train (now 0 per class)')
    state = create_state(self.tower, self._initial_classifier(split['train'], seed), self.tx)
    best = _copy((state.params, state.batch_stats))
    checkpoints = _FoldCheckpoints(os.path.join(fold_dir, 'checkpoints')) if fold_dir else None
    try:
      state, best, done = self._train(fold, seed, split, state, best, checkpoints, settings)
    finally:
      if checkpoints is not None:
        checkpoints.close()
    params, batch_stats = best if done.best_epoch else (state.params, state.batch_stats)
    probs, _ = self.predict(params, batch_stats, split['test'])
    if self.options.last_lp:
      probs = self._last_lp(params, batch_stats, split)
    info = {'epochs': done.epoch, 'best_epoch': done.best_epoch, 'best_val_f1': done.best_f1,
            'stopped_early': done.stopped}
    if result_path:
      _save_result(result_path, probs, info, settings)
    return probs, info

  def _last_lp(self, params, batch_stats, split) -> np.ndarray:
    _, train_feat = self.predict(params, batch_stats, split['train'])
    _, test_feat = self.predict(params, batch_stats, split['test'])
    probe = linear_probe.fit(train_feat, self.labels_n[split['train']])
    return linear_probe.predict(probe, test_feat, self.num_classes)

  def _train(self, fold, seed, split, state, best, checkpoints, settings):
    done = _Progress()
    if checkpoints is not None:
      restored = checkpoints.restore(state, best, settings)
      if restored is not None:
        state, best, meta = restored
        done = _Progress(**meta['progress'])
        logger.info('fold %d: resumed after epoch %d', fold, done.epoch)
    train, val = split['train'], split['val']
    opts = self.options
    steps_per_epoch = -(-train.size // opts.batch_size)
    key = parallel.replicated_value(lambda: jax.random.key(seed), self.tower.mesh)
    bar = tqdm(total=opts.epochs * steps_per_epoch, initial=done.epoch * steps_per_epoch,
               desc=f'fold {fold} fine-tune', unit='step', disable=not self.progress,
               dynamic_ncols=True)
    with bar:
      while done.epoch < opts.epochs and not done.stopped:
        order = epoch_order(train, seed, done.epoch)
        losses = []
        for start in range(0, order.size, opts.batch_size):
          chunk = order[start:start + opts.batch_size]
          state, step_metrics = self.train_step(
              state, self.tower.place(self._batch(chunk)),
              self.tower.place(self.labels_n[chunk].astype(np.int32)), key)
          losses.append(step_metrics['loss'])
          bar.update(1)
        done.epoch += 1
        postfix = {'loss': f'{float(np.mean(jax.device_get(losses))):.4f}'}
        if val.size:
          probs, _ = self.predict(state.params, state.batch_stats, val)
          f1 = metrics.classification_metrics(self.labels_n[val], probs)['f1_avg']
          postfix['val_f1'] = f'{f1:.4f}'
          if f1 > done.best_f1:
            done.best_f1, done.best_epoch, done.counter = float(f1), done.epoch, 0
            best = _copy((state.params, state.batch_stats))
          else:
            done.counter += 1
          done.stopped = done.counter >= opts.patience
        bar.set_postfix(postfix)
        if checkpoints is not None:
          checkpoints.save(done.epoch, state, best,
                           {'progress': dataclasses.asdict(done), 'settings': settings})
    if done.stopped:
      logger.info('fold %d: no better validation macro F1 for %d epochs, stopped after epoch %d '
                  '(best: epoch %d)', fold, opts.patience, done.epoch, done.best_epoch)
    return state, best, done


def _save_result(path: str, probs, info: dict, settings: dict) -> None:
  """``result.npz`` written whole or not at all."""
  tmp = path + '.tmp.npz'
  np.savez(tmp, probs=probs, info=json.dumps(info), settings=json.dumps(settings))
  os.replace(tmp, path)


def vision_tower(model: Any) -> nnx.Module:
  """The image tower of a ``FLAIRModel``."""
  return model.model.vision_model
