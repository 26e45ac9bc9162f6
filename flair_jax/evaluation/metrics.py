"""FLAIR's classification metrics, per fold and averaged over folds.

Per fold (PyTorch FLAIR's ``classification_metrics``): ACA, the balanced
accuracy (mean of the diagonal of the row-normalised confusion matrix);
Cohen's kappa with quadratic weights; and, one class against the rest,
sensitivity (recall), specificity, F1 and ROC AUC, each with its macro
average. Values are not rounded (FLAIR rounds to 3 decimals before
averaging; the report rounds only when it prints).

Every class of ``range(num_classes)`` gets a row and a column of the
confusion matrix; a class absent from the references has NaN per-class
entries and is left out of the averages, as FLAIR's ``np.unique(refs)``
loops leave it out.
"""

from __future__ import annotations

import warnings
from typing import Mapping, Sequence

import numpy as np
from sklearn import metrics as skm

PER_CLASS = ('acc_class', 'sensitivity_class', 'specificity_class', 'f1_class', 'auc_class')
SCALARS = ('aca', 'kappa', 'f1_avg', 'auc_avg', 'sensitivity_avg', 'specificity_avg')


def _nanmean(x) -> float:
  x = np.asarray(x, np.float64)
  return float(np.mean(x[~np.isnan(x)])) if np.any(~np.isnan(x)) else float('nan')


def confusion(labels_n: np.ndarray, preds_n: np.ndarray, num_classes: int) -> np.ndarray:
  """``cm[i, j]`` = number of samples of class i predicted as j, int64 ``[C, C]``."""
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels_n, preds_n), 1)
  return cm


def _one_vs_rest(labels_n, preds_n, probs_nc, k):
  truth, guess = labels_n == k, preds_n == k
  tp = np.sum(truth & guess)
  fp = np.sum(~truth & guess)
  fn = np.sum(truth & ~guess)
  tn = np.sum(~truth & ~guess)
  sensitivity = tp / (tp + fn)
  specificity = tn / (tn + fp) if tn + fp else np.nan
  f1 = 2 * tp / (2 * tp + fp + fn)
  auc = skm.roc_auc_score(truth, probs_nc[:, k]) if 0 < truth.sum() < truth.size else np.nan
  return sensitivity, specificity, f1, auc


def classification_metrics(labels_n, probs_nc) -> dict:
  """FLAIR's metrics of one fold.

  Args:
    labels_n: int ``[N]`` true classes in ``[0, C)``.
    probs_nc: float ``[N, C]`` class scores (probabilities); the prediction
      is their argmax.
  Returns:
    dict with the scalars ``SCALARS``, the per-class lists ``PER_CLASS``
    (length C, NaN for classes without references), ``cm`` and ``cm_norm``.
  """
  labels_n = np.asarray(labels_n).astype(np.int64).reshape(-1)
  probs_nc = np.asarray(probs_nc, np.float64)
  if probs_nc.ndim != 2 or probs_nc.shape[0] != labels_n.shape[0]:
    raise ValueError(f'expected probs [N, C] for {labels_n.shape[0]} labels, got {probs_nc.shape}')
  num_classes = probs_nc.shape[1]
  if labels_n.size == 0 or labels_n.min() < 0 or labels_n.max() >= num_classes:
    raise ValueError(f'labels must be non-empty and in [0, {num_classes}); got '
                     f'{np.unique(labels_n).tolist()}')
  preds_n = np.argmax(probs_nc, axis=-1)
  cm = confusion(labels_n, preds_n, num_classes)
  support = cm.sum(axis=1)
  present = support > 0
  with np.errstate(invalid='ignore', divide='ignore'):
    cm_norm = cm / support[:, None]
  acc_class = np.where(present, np.diag(cm_norm), np.nan)

  per_class = np.full((4, num_classes), np.nan)
  for k in np.flatnonzero(present):
    per_class[:, k] = _one_vs_rest(labels_n, preds_n, probs_nc, k)
  sensitivity, specificity, f1, auc = per_class

  out = {
      'aca': float(np.mean(acc_class[present])),
      'kappa': float(skm.cohen_kappa_score(labels_n, preds_n, weights='quadratic')),
      'f1_avg': _nanmean(f1),
      'auc_avg': _nanmean(auc),
      'sensitivity_avg': _nanmean(sensitivity),
      'specificity_avg': _nanmean(specificity),
      'acc_class': acc_class.tolist(),
      'sensitivity_class': sensitivity.tolist(),
      'specificity_class': specificity.tolist(),
      'f1_class': f1.tolist(),
      'auc_class': auc.tolist(),
      'cm': cm.tolist(),
      'cm_norm': np.where(present[:, None], cm_norm, np.nan).tolist(),
  }
  return out


def average_folds(folds: Sequence[Mapping]) -> dict:
  """Mean and (population) standard deviation of every metric over folds.

  Returns:
    ``{name: {'mean': ..., 'std': ...}}`` for the scalars, the per-class
    lists (element-wise) and the confusion matrices.
  """
  if not folds:
    raise ValueError('no folds to average')
  out = {}
  for name in SCALARS + PER_CLASS + ('cm', 'cm_norm'):
    values = np.stack([np.asarray(f[name], np.float64) for f in folds])
    # NaN-aware: a class missing from one fold's test set does not blank the
    # other folds; a value NaN in every fold stays NaN.
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', RuntimeWarning)
      mean, std = np.nanmean(values, 0), np.nanstd(values, 0)
    out[name] = {'mean': mean.tolist(), 'std': std.tolist()}
  return out
