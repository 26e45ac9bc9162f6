"""FLAIR's per-class shot splits for transfer experiments.

PyTorch FLAIR shuffles the sample list with Python's ``random`` seeded by the
fold index, then, class by class (classes in increasing order), takes the
first ``shots_test`` samples of the class for test, the next ``shots_train``
for train and the next ``shots_val`` for validation. A shot count is an
integer (``"16"``) or a percentage of the class (``"20%"``, rounded down).
Python's ``random.Random(seed).shuffle`` is the same permutation FLAIR draws,
so the folds are the same sample for sample.
"""

from __future__ import annotations

import random
from typing import Union

import numpy as np

Shots = Union[int, str]


def num_shots(shots: Shots, class_size: int) -> int:
  """Samples taken from a class of ``class_size``: ``16`` / ``"16"`` or ``"20%"``."""
  text = str(shots).strip()
  try:
    if text.endswith('%'):
      count = int(int(text[:-1]) / 100 * class_size)
    else:
      count = int(text)
  except ValueError:
    raise ValueError(f'shots {shots!r} is neither a count ("16") nor a percentage '
                     '("20%")') from None
  if count < 0:
    raise ValueError(f'shots {shots!r} is negative')
  return count


def fold_split(labels_n, *, shots_train: Shots = '80%', shots_val: Shots = '0%',
               shots_test: Shots = '20%', seed: int = 0) -> dict[str, np.ndarray]:
  """Indices of the train, val and test samples of one fold.

  Args:
    labels_n: int ``[N]`` class of each sample, in dataset order.
    shots_train, shots_val, shots_test: per-class counts or percentages.
    seed: FLAIR uses the fold index.
  Returns:
    ``{'train', 'val', 'test'}`` -> int64 indices into ``labels_n``, in the
    order FLAIR lists the samples (class by class, shuffled inside).
  """
  labels_n = np.asarray(labels_n).reshape(-1)
  order = list(range(labels_n.shape[0]))
  random.Random(seed).shuffle(order)
  order = np.asarray(order, np.int64)
  shuffled = labels_n[order]
  parts = {'train': [], 'val': [], 'test': []}
  for label in np.unique(labels_n):
    members = order[shuffled == label]
    n_test = num_shots(shots_test, members.size)
    n_train = num_shots(shots_train, members.size)
    n_val = num_shots(shots_val, members.size)
    parts['test'].append(members[:n_test])
    parts['train'].append(members[n_test:n_test + n_train])
    parts['val'].append(members[n_test + n_train:n_test + n_train + n_val])
  return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in parts.items()}
