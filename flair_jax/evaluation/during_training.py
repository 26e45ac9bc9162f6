"""Zero-shot evaluation of a model while it trains, and after."""

from __future__ import annotations

import logging
from typing import Mapping

from flax import nnx

from flair_jax import parallel
from flair_jax.evaluation import run as eval_run

logger = logging.getLogger(__name__)

METRICS = ('aca', 'kappa', 'f1_avg', 'auc_avg')


class ZeroShotDuringTraining:
  """Zero-shot balanced accuracy (and friends) on the configured sets.

  Built once before training; called with the current parameters. Runs on
  this process's devices alone: call it on one process.

  Args:
    sets: ``{key: DownstreamSet}``.
    graphdef: the model's ``nnx`` graph definition.
    tokenizer: its tokenizer.
    model_config: its ``ModelConfig`` (canvas size and caption).
    domain_knowledge, knowledge, batch_size: as ``evaluation.run.Experiment``.
  """

  def __init__(self, sets: Mapping, *, graphdef, tokenizer, model_config,
               domain_knowledge: bool, knowledge: str, batch_size: int):
    self.sets = dict(sets)
    self._graphdef = graphdef
    self._tokenizer = tokenizer
    self._model_config = model_config
    self._experiment = eval_run.Experiment(method='zero-shot', domain_knowledge=domain_knowledge,
                                           knowledge=knowledge, batch_size=batch_size)

  def __bool__(self) -> bool:
    return bool(self.sets)

  def __call__(self, params, batch_stats) -> dict:
    """``{'zero_shot/<set>/<metric>': value}`` of the model with these weights."""
    from flair_jax.inference import FLAIRModel  # pylint: disable=g-import-not-at-top
    mc = self._model_config
    model = nnx.merge(self._graphdef, parallel.to_host(params), parallel.to_host(batch_stats))
    flair = FLAIRModel(model, self._tokenizer, image_size=mc.image_size, caption=mc.caption)
    results = {}
    for key, data in self.sets.items():
      summary = eval_run.run(flair, data, self._experiment, progress=False)['summary']
      for metric in METRICS:
        if metric in summary:
          value = summary[metric]
          results[f'zero_shot/{key}/{metric}'] = float(
              value['mean'] if isinstance(value, dict) else value)
    return results

  def final(self, params, batch_stats) -> dict:
    """As a call, but a failure is logged and gives ``{}`` (the run's export
    and plots still follow)."""
    try:
      return self(params, batch_stats)
    except Exception:  # pylint: disable=broad-except  # keep the export and plots
      logger.exception('final evaluation failed; the checkpoints are complete')
      return {}
