"""FLAIR's class balancing of a training split (``--balance``).

PyTorch FLAIR's ``balance_data`` oversamples every class of the training
split to the size of the largest: class by class (in increasing order), the
class's samples in split order, then ``max - count`` more drawn with
replacement by ``random.choices``. Its global ``random`` was seeded with the
fold's seed and has just shuffled the whole set (``splits.fold_split``), so
the draws here continue a ``random.Random(seed)`` from that same shuffle:
the same samples FLAIR draws.
"""

from __future__ import annotations

import random

import numpy as np


def balance(labels_n, train_m, *, seed: int) -> np.ndarray:
  """The training indices ``train_m`` with every class oversampled to the largest.

  Args:
    labels_n: int ``[N]`` labels of the whole set.
    train_m: the fold's training indices into ``labels_n`` (split order).
    seed: the fold's split seed.
  Returns:
    int64 indices, class by class.
  """
  labels_n = np.asarray(labels_n).reshape(-1)
  train_m = np.asarray(train_m, np.int64)
  rng = random.Random(seed)
  rng.shuffle(list(range(labels_n.shape[0])))  # the split's draws, replayed
  train_labels = labels_n[train_m]
  if train_m.size == 0:
    return train_m
  counts = np.bincount(train_labels)
  out = []
  for label in np.unique(train_labels):
    positions = list(np.flatnonzero(train_labels == label))
    missing = int(counts.max() - counts[label])
    if missing > 0:
      positions += rng.choices(positions, k=missing)
    out.append(train_m[positions])
  return np.concatenate(out)
