"""One transfer experiment: features once, then k folds of split, fit, score.

PyTorch FLAIR's ``main_transferability`` re-extracts features in every fold;
the image tower is frozen and in eval mode, so extracting once gives the
same numbers. Fold ``k`` splits with seed ``seed + k`` (FLAIR: ``k``).
Fine-tuning (``ft``, ``lp+ft``) trains the tower itself in each fold
(``finetune``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

from flair_jax.evaluation import adapters, augmented, balance as balance_lib, features, fewshot
from flair_jax.evaluation import finetune, linear_probe, metrics, splits, zero_shot
from flair_jax.evaluation.data import DownstreamSet

logger = logging.getLogger(__name__)

METHODS = ('zero-shot', 'linear-probe', 'clip-adapter', 'tip-adapter', 'tip-adapter-f',
           *fewshot.METHODS)
FINE_TUNING = ('ft', 'lp+ft')  # the image tower trains (flair_jax.evaluation.finetune)
METHODS += FINE_TUNING
# FLAIR's README: zero-shot on the whole set; linear probe 80/20 over 5 folds.
DEFAULT_SHOTS = {'zero-shot': ('0%', '0%', '100%', 1)}
DEFAULT_TRAINED = ('80%', '0%', '20%', 5)
DEFAULT_FEW_SHOTS = '16'  # per class, in a few-shot scenario


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What to run. ``None`` shots / folds take the method's defaults."""
  method: str = 'zero-shot'
  folds: Optional[int] = None
  shots_train: Optional[str] = None
  shots_val: Optional[str] = None
  shots_test: Optional[str] = None
  seed: int = 0
  domain_knowledge: bool = True
  knowledge: str = 'flair_repo'
  batch_size: int = 32
  crop_foreground: bool = False
  image_size: Optional[int] = None  # default: the model's
  num_workers: int = 4  # image reading threads
  scenario: str = 'flair'  # or a few-shot scenario of splits.SCENARIOS
  balance: bool = False  # FLAIR's oversampling of the training split
  fta: bool = False  # FLAIR's training-time augmentation
  tta: bool = False  # FLAIR's test-time augmentation
  fine_tuning: finetune.Options = finetune.Options()  # ft, lp+ft

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'method {self.method!r} unknown; expected one of {METHODS}')
    if self.scenario not in splits.SCENARIOS:
      raise ValueError(f'scenario {self.scenario!r} unknown; expected one of {splits.SCENARIOS}')
    if self.tta and self.method in FINE_TUNING:
      raise ValueError("FLAIR's fine-tuning predicts without test-time augmentation; drop --tta")
    if (self.tta or self.fta) and self.method not in augmented.METHODS + FINE_TUNING:
      raise ValueError(f'--tta and --fta work with {augmented.METHODS + FINE_TUNING}, not with '
                       f'{self.method}')

  def resolved(self) -> 'Experiment':
    """This experiment with the method's default shots and folds filled in."""
    train, val, test, folds = DEFAULT_SHOTS.get(self.method, DEFAULT_TRAINED)
    if self.scenario != 'flair':
      train = DEFAULT_FEW_SHOTS
    pick = lambda v, d: d if v is None else v
    return dataclasses.replace(self, shots_train=str(pick(self.shots_train, train)),
                               shots_val=str(pick(self.shots_val, val)),
                               shots_test=str(pick(self.shots_test, test)),
                               folds=int(pick(self.folds, folds)))


def _fold_probs(method, fold_seed, split, feat_nf, emb_nd, labels_n, prototypes_cd,
                logit_scale, num_classes):
  """Class probabilities ``[N_test, C]`` of one fold."""
  train, test = split['train'], split['test']
  if method == 'zero-shot':
    return zero_shot.predict(emb_nd[test], prototypes_cd, logit_scale)
  if train.size == 0:
    raise ValueError(f'{method} needs training samples; raise shots_train (now 0 per class)')
  if method == 'linear-probe':
    classifier = linear_probe.fit(feat_nf[train], labels_n[train])
    return linear_probe.predict(classifier, feat_nf[test], num_classes)
  if method in fewshot.METHODS:
    return fewshot.fit_predict(method, emb_nd[train], labels_n[train], emb_nd[test], prototypes_cd,
                               logit_scale, num_classes, seed=fold_seed)
  if method == 'clip-adapter':
    params, _ = adapters.fit_clip_adapter(emb_nd[train], labels_n[train], prototypes_cd,
                                          logit_scale, seed=fold_seed)
    return adapters.predict_clip_adapter(params, emb_nd[test], prototypes_cd, logit_scale)
  if method == 'tip-adapter':
    keys, values = adapters.tip_cache(emb_nd[train], labels_n[train], num_classes)
  else:
    keys, values, _ = adapters.fit_tip_adapter_f(emb_nd[train], labels_n[train], prototypes_cd,
                                                 logit_scale, num_classes, seed=fold_seed)
  return adapters.predict_tip_adapter(emb_nd[test], prototypes_cd, keys, values)


def check_labels(data: DownstreamSet) -> None:
  """Raises when a label has no class name."""
  num_classes = len(data.class_names)
  if data.labels.size and data.labels.max() >= num_classes:
    raise ValueError(f'{data.name}: label {int(data.labels.max())} but only {num_classes} classes')


def set_features(encode: features.Encode, encoder, data: DownstreamSet, experiment: Experiment,
                 image_size: int, *, progress: bool = True):
  """``(features [N, F], embeddings [N, D])`` of a set's images.

  Args:
    encode: canvases -> ``(features, embeddings)`` with the model's weights.
    encoder: the ``encoder.Encoder`` behind ``encode`` (its batch rounding).
    data, experiment: the set and what to run (batch size, crop, canvas).
    image_size: the model's canvas side, unless the experiment sets one.
  """
  check_labels(data)
  return features.extract(
      encode, data.images, batch_size=encoder.round_batch(experiment.batch_size, len(data.images)),
      image_size=experiment.image_size or image_size, crop=experiment.crop_foreground,
      desc=f'{data.name} features', num_workers=experiment.num_workers, progress=progress)


def _fine_tuner(model, data: DownstreamSet, exp: Experiment, feat_nf, workdir, progress):
  """A ``finetune.FoldTrainer`` on the canvases of the images a fold may use."""
  image_size = exp.image_size or model.image_size
  used = set()
  for k in range(exp.folds):
    split = _split(exp, data.labels, exp.seed + k)
    used.update(int(i) for part in split.values() for i in part)
  canvases = finetune.load_canvases(data.images, used, image_size=image_size,
                                    crop=exp.crop_foreground, num_workers=exp.num_workers,
                                    progress=progress, desc=f'{data.name} canvases')
  return finetune.FoldTrainer(
      finetune.Tower(finetune.vision_tower(model)), canvases, data.labels,
      num_classes=len(data.class_names), options=exp.fine_tuning,
      from_probe=exp.method == 'lp+ft', augment=exp.fta, probe_features=feat_nf,
      workdir=workdir, eval_batch_size=exp.batch_size, progress=progress)


def _split(exp: Experiment, labels_n, fold_seed: int) -> dict:
  """A fold's split (FLAIR's, or a few-shot scenario's), its training part
  oversampled with ``balance``."""
  if exp.scenario == 'flair':
    split = splits.fold_split(labels_n, shots_train=exp.shots_train, shots_val=exp.shots_val,
                              shots_test=exp.shots_test, seed=fold_seed)
  else:
    split = splits.fewshot_split(labels_n, exp.shots_train, scenario=exp.scenario,
                                 shots_test=exp.shots_test, seed=fold_seed)
  if exp.balance:
    split['train'] = balance_lib.balance(labels_n, split['train'], seed=fold_seed)
  return split


def run(model, data: DownstreamSet, experiment: Experiment, *, progress: bool = True,
        workdir: Optional[str] = None) -> dict:
  """Runs an experiment on a set with a ``FLAIRModel`` (its encoder and prompts).

  ``workdir`` keeps fine-tuning's per-fold checkpoints (a rerun resumes).

  Returns:
    ``score``'s results.
  """
  exp = experiment.resolved()
  if exp.method == 'ft':  # no frozen features needed
    feat_nf = emb_nd = None
    check_labels(data)
  else:
    feat_nf, emb_nd = set_features(model.image_features, model.encoder, data, exp,
                                   model.image_size, progress=progress)
  if exp.method in FINE_TUNING:
    return score(exp, data, feat_nf, emb_nd, None, 0.0,
                 fine_tuner=_fine_tuner(model, data, exp, feat_nf, workdir, progress))
  prototypes_cd = None
  if exp.method != 'linear-probe':
    _, prototypes_cd = model.compute_text_embeddings(
        list(data.class_names), domain_knowledge=exp.domain_knowledge, knowledge=exp.knowledge)
  encodings = None
  if exp.tta or exp.fta:
    encodings = set_features(augmented.augmented_encoder(model.image_features, seed=exp.seed),
                             model.encoder, data, exp, model.image_size, progress=progress)
  # FLAIR's adapters exponentiate the stored parameter (its forward clamps).
  return score(exp, data, feat_nf, emb_nd, prototypes_cd, model.logit_scale(clamped=False),
               augmented_encodings=encodings)


def score(experiment: Experiment, data: DownstreamSet, feat_nf, emb_nd, prototypes_cd,
          logit_scale: float, *, fine_tuner: Optional[finetune.FoldTrainer] = None,
          augmented_encodings=None) -> dict:
  """The folds of an experiment on a set's features and class prototypes.

  Args:
    experiment: what to run (resolved here).
    data: the set (labels and class names).
    feat_nf, emb_nd: its images' features and embeddings.
    prototypes_cd: the class prototypes; ``None`` for the linear probe.
    logit_scale: the stored (unclamped) log-temperature.
    fine_tuner: scores the folds of ``ft`` / ``lp+ft`` (its training info
      joins each fold's metrics).
    augmented_encodings: ``(features [N, A, F], embeddings [N, A, D])`` of
      ``augmented.ROUNDS`` augmentations of each image (tta, fta).
  Returns:
    ``{'experiment', 'dataset', 'class_names', 'num_samples', 'folds':
    [per-fold metrics + split sizes], 'summary': metrics.average_folds,
    'predictions': [per fold {'test_indices' [M], 'probs' [M, C]}]}``.
  """
  exp = experiment.resolved()
  check_labels(data)
  num_classes = len(data.class_names)
  folds, predictions = [], []
  for k in range(exp.folds):
    fold_seed = exp.seed + k
    split = _split(exp, data.labels, fold_seed)
    if split['test'].size == 0:
      raise ValueError(f'fold {k}: the test split is empty; raise shots_test')
    info = {}
    if fine_tuner is not None:
      probs, info = fine_tuner(k, fold_seed, split)
    elif exp.tta or exp.fta:
      probs = augmented.fold_probs(
          exp.method, fold_seed, split, feat_nf, emb_nd, data.labels, prototypes_cd, logit_scale,
          num_classes, aug_feat_naf=augmented_encodings[0], aug_emb_nad=augmented_encodings[1],
          tta=exp.tta, fta=exp.fta)
    else:
      probs = _fold_probs(exp.method, fold_seed, split, feat_nf, emb_nd, data.labels,
                          prototypes_cd, logit_scale, num_classes)
    fold = metrics.classification_metrics(data.labels[split['test']], probs)
    fold.update(info)
    fold.update({f'n_{name}': int(idx.size) for name, idx in split.items()})
    predictions.append({'test_indices': split['test'], 'probs': probs})
    logger.info('fold %d: aca %.4f kappa %.4f macro F1 %.4f', k, fold['aca'], fold['kappa'],
                 fold['f1_avg'])
    folds.append(fold)
  return {'experiment': dataclasses.asdict(exp), 'dataset': data.name,
          'class_names': list(data.class_names), 'num_samples': int(data.labels.size),
          'folds': folds, 'summary': metrics.average_folds(folds), 'predictions': predictions}
