"""Accuracy against shots: several methods over the same folds, features once.

For every method and every ``k`` of the shots, ``run.score`` runs the
experiment's folds with ``k`` training shots per class (in its scenario;
FLAIR's rule with a count is the ``standard`` one). Fold ``j`` tests on the
same samples for every method and every ``k`` (the test split only depends
on the fold's seed), so the curves are comparable point by point.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

from tqdm import tqdm

from flair_jax.evaluation import fewshot, run
from flair_jax.evaluation.data import DownstreamSet

logger = logging.getLogger(__name__)

ALL_FEW_SHOT = 'all-few-shot'
# The methods that adapt on extracted features (what all-few-shot runs).
FEATURE_METHODS = ('zero-shot', 'linear-probe', 'clip-adapter', 'tip-adapter', 'tip-adapter-f',
                   *fewshot.METHODS)
DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_TEST = '20%'
DEFAULT_FOLDS = 5


def parse_shots(text: str) -> tuple[int, ...]:
  """``"1,2,4"`` -> ``(1, 2, 4)``; positive counts, each once."""
  items = [t.strip() for t in str(text).split(',') if t.strip()]
  if not items or not all(t.isdigit() and int(t) > 0 for t in items):
    raise ValueError(f'shots {text!r}: expected positive counts per class like "1,2,4,8,16"')
  return tuple(sorted({int(t) for t in items}))


def run_sweep(model, data: DownstreamSet, experiment: run.Experiment, methods: Sequence[str],
              shots: Sequence[int], *, progress: bool = True) -> dict:
  """``score_sweep`` with a ``FLAIRModel``'s features and prototypes."""
  feat_nf, emb_nd = run.set_features(model.image_features, model.encoder, data, experiment,
                                     model.image_size, progress=progress)
  _, prototypes_cd = model.compute_text_embeddings(
      list(data.class_names), domain_knowledge=experiment.domain_knowledge,
      knowledge=experiment.knowledge)
  return score_sweep(experiment, data, feat_nf, emb_nd, prototypes_cd,
                     model.logit_scale(clamped=False), methods, shots, progress=progress)


def _cell(base: run.Experiment, method: str, k: int) -> run.Experiment:
  return dataclasses.replace(base, method=method, shots_train=str(k))


def score_sweep(experiment: run.Experiment, data: DownstreamSet, feat_nf, emb_nd, prototypes_cd,
                logit_scale: float, methods: Sequence[str], shots: Sequence[int], *,
                progress: bool = True) -> dict:
  """Every method at every shot count on the same folds.

  A cell whose method refuses its support set (e.g. the linear probe given
  one class) is skipped, logged and counted; if every cell fails the first
  error is raised.

  Returns:
    ``{'experiment' (the common settings), 'dataset', 'class_names',
    'num_samples', 'methods', 'shots', 'cells': {method: {k: run.score
    results without predictions, or {'error': message}}}, 'skipped'}``.
  """
  base = dataclasses.replace(
      experiment, shots_val='0',
      shots_test=DEFAULT_TEST if experiment.shots_test is None else experiment.shots_test,
      folds=DEFAULT_FOLDS if experiment.folds is None else experiment.folds)
  cells, errors = {}, []
  run_level = run.logger.level
  run.logger.setLevel(logging.WARNING)  # one line per fold is too many here
  try:
    with tqdm(total=len(methods) * len(shots), desc='few-shot', unit='cell',
              disable=not progress, dynamic_ncols=True) as bar:
      for method in methods:
        cells[method] = {}
        for k in shots:
          bar.set_postfix_str(f'{method} {k}-shot')
          try:
            result = run.score(_cell(base, method, k), data, feat_nf, emb_nd, prototypes_cd,
                               logit_scale)
            result.pop('predictions')
          except ValueError as e:
            logger.warning('%s at %d shots skipped: %s', method, k, e)
            errors.append(e)
            result = {'error': str(e)}
          cells[method][k] = result
          bar.update(1)
  finally:
    run.logger.setLevel(run_level)
  if errors and len(errors) == len(methods) * len(shots):
    raise errors[0]
  common = dataclasses.asdict(base)
  for name in ('method', 'shots_train'):
    common.pop(name)
  return {'experiment': common, 'dataset': data.name, 'class_names': list(data.class_names),
          'num_samples': int(data.labels.size), 'methods': list(methods),
          'shots': [int(k) for k in shots], 'cells': cells, 'skipped': len(errors)}
