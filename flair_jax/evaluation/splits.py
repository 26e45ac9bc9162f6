"""FLAIR's per-class shot splits for transfer experiments.

PyTorch FLAIR shuffles the sample list with Python's ``random`` seeded by the
fold index, then, class by class (classes in increasing order), takes the
first ``shots_test`` samples of the class for test, the next ``shots_train``
for train and the next ``shots_val`` for validation. A shot count is an
integer (``"16"``) or a percentage of the class (``"20%"``, rounded down).
Python's ``random.Random(seed).shuffle`` is the same permutation FLAIR draws,
so the folds are the same sample for sample.

Beside FLAIR's rule (scenario ``flair``), ``fewshot_split`` draws a support
set of ``k`` shots per class in the scenarios of jusiro/SS-Text
(``balance_split``): ``standard`` (``k`` per class), ``relaxed`` (``C k``
samples spread as the classes are, at least one each) and ``realistic``
(the same, a class may get none).
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


SCENARIOS = ('flair', 'standard', 'relaxed', 'realistic')


def support_counts(pool_counts, k: int, scenario: str) -> list[int]:
  """Support samples per class of ``C k`` in all, as jusiro/SS-Text draws them.

  ``standard``: ``k`` each. ``relaxed`` / ``realistic``: ``round(C k p_c)``
  (Python's round, half to even) with ``p`` the class shares of
  ``pool_counts``; ``relaxed`` raises a zero to one; while the total is over
  ``C k`` the largest count (the first of ties) gives one back. A count is
  then capped at what its class has.
  """
  pool = np.asarray(pool_counts, np.int64)
  total = pool.size * k
  if scenario == 'standard':
    p = np.full(pool.size, 1 / pool.size)
  elif scenario in ('relaxed', 'realistic'):
    p = pool / pool.sum()
  else:
    raise ValueError(f'scenario {scenario!r} unknown; expected one of {SCENARIOS}')
  counts = [round(float(total * p_c)) for p_c in p]
  if scenario == 'relaxed':
    counts = [max(1, c) for c in counts]
  while sum(counts) > total:
    counts[int(np.argmax(counts))] -= 1
  return [min(c, int(n)) for c, n in zip(counts, pool)]


def fewshot_split(labels_n, shots: int, *, scenario: str = 'standard',
                  shots_test: Shots = '20%', seed: int = 0) -> dict[str, np.ndarray]:
  """One fold of a few-shot scenario: FLAIR's test split, then a support set.

  The test samples are ``fold_split``'s (the first ``shots_test`` of each
  class in FLAIR's shuffled order); the support takes, class by class, the
  next ``support_counts`` samples of that order, the class shares measured on
  the samples left after the test. ``standard`` is ``fold_split`` with
  ``shots_train=shots``.

  Args:
    labels_n: int ``[N]`` class of each sample.
    shots: ``k``, support samples per class on average.
    scenario: ``standard``, ``relaxed`` or ``realistic``.
  Returns:
    ``{'train', 'val', 'test'}`` indices (``val`` empty).
  """
  if not str(shots).strip().isdigit():
    raise ValueError(f'the {scenario} scenario takes a count of shots per class ("16"), '
                     f'not {shots!r}')
  k = int(str(shots).strip())
  labels_n = np.asarray(labels_n).reshape(-1)
  rest = fold_split(labels_n, shots_train='100%', shots_val='0%', shots_test=shots_test,
                    seed=seed)
  classes = np.unique(labels_n)
  members = [rest['train'][labels_n[rest['train']] == c] for c in classes]
  counts = support_counts([m.size for m in members], k, scenario)
  train = [m[:n] for m, n in zip(members, counts)]
  return {'train': np.concatenate(train) if train else np.zeros(0, np.int64),
          'val': np.zeros(0, np.int64), 'test': rest['test']}
