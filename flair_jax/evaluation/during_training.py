"""Zero-shot evaluation of a model while it trains, and after."""

from __future__ import annotations

import functools
import logging
from typing import Mapping

from flax import nnx

from data_pipelines import knowledge as knowledge_lib
from flair_jax import encoder as encoder_lib
from flair_jax import parallel
from flair_jax.evaluation import run as eval_run

logger = logging.getLogger(__name__)

METRICS = ('aca', 'kappa', 'f1_avg', 'auc_avg')


class ZeroShotDuringTraining:
  """Zero-shot balanced accuracy (and friends) on the configured sets.

  Built once before training: the encoder (traced at its first call, once
  per batch shape) and every set's tokenized prompts; each call passes the
  current weights and recomputes the class prototypes. Runs on this
  process's devices alone: call it on one process.

  Args:
    sets: ``{key: DownstreamSet}``.
    graphdef: the model's ``nnx`` graph definition.
    tokenizer: its tokenizer.
    model_config: its ``ModelConfig`` (canvas size and caption).
    domain_knowledge, knowledge, batch_size: as ``evaluation.run.Experiment``.
    mesh: the encoder's mesh; default: this process's devices.
  """

  def __init__(self, sets: Mapping, *, graphdef, tokenizer, model_config,
               domain_knowledge: bool, knowledge: str, batch_size: int, mesh=None):
    self.sets = dict(sets)
    self._image_size = model_config.image_size
    self._experiment = eval_run.Experiment(method='zero-shot', domain_knowledge=domain_knowledge,
                                           knowledge=knowledge, batch_size=batch_size).resolved()
    self._encoder = encoder_lib.Encoder(graphdef, mesh) if self.sets else None
    dictionary = knowledge_lib.load_knowledge(knowledge) if self.sets and domain_knowledge else None
    self._prompts = {
        key: encoder_lib.ClassPrompts.build(tokenizer, data.class_names, dictionary,
                                            model_config.caption)
        for key, data in self.sets.items()}

  def __bool__(self) -> bool:
    return bool(self.sets)

  def __call__(self, params, batch_stats) -> dict:
    """``{'zero_shot/<set>/<metric>': value}`` of the model with these weights
    (``{}`` when no set is configured)."""
    if not self.sets:
      return {}
    state = self._encoder.place(
        nnx.merge_state(parallel.to_host(params), parallel.to_host(batch_stats)))
    logit_scale = encoder_lib.logit_scale(state, clamped=False)
    encode = functools.partial(self._encoder.image_features, state)
    results = {}
    for key, data in self.sets.items():
      feat_nf, emb_nd = eval_run.set_features(encode, self._encoder, data, self._experiment,
                                              self._image_size, progress=False)
      prototypes_cd = self._prompts[key].prototypes(self._encoder, state)
      summary = eval_run.score(self._experiment, data, feat_nf, emb_nd, prototypes_cd,
                               logit_scale)['summary']
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
