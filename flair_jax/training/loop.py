"""The pre-training loop: ``train_and_evaluate(config, workdir)``.

A run resumes from its workdir first (the newest checkpoint that restores:
model, optimiser, step and the data iterator's position; a damaged newer one
is moved aside, never deleted), else starts from the initial weights the
config names. SIGTERM and Ctrl-C save the current step and return; a
non-finite loss stops the run naming the step, keeping the last good
checkpoint. On several processes every process runs this same function;
process 0 logs, evaluates and exports while the others wait.

Set-up (devices, data, model, resume) builds a ``_Run``; the step loop runs
the periodic actions of ``flair_jax.training.periodic`` between steps; the
finish evaluates, exports and plots.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.jsonio import write_json
from flair_jax import checkpoint, parallel, trees
from flair_jax.evaluation.during_training import ZeroShotDuringTraining
from flair_jax.models import ModelConfig
from flair_jax.training import checkpoints as checkpoints_lib
from flair_jax.training import metrics_log, periodic, setup as train_setup
from flair_jax.training import step as step_lib

logger = logging.getLogger(__name__)

EXPORT_DIR = 'export_torch'
CONFIG_JSON = 'config.json'


@dataclasses.dataclass
class _Run:
  """A run between its set-up and its summary."""
  cfg: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  data: train_setup.TrainingData
  model_config: ModelConfig
  graphdef: Any
  state: step_lib.TrainState
  train_step: Callable
  checkpoints: checkpoints_lib.Checkpoints
  config_json: dict
  first_step: int
  writer: metrics_log.MetricsWriter
  progress: Optional[tqdm] = None
  longest_text: Callable[[int], int] = dataclasses.field(
      default_factory=lambda: parallel.ProcessMax('longest_text'))

  def next_batch(self):
    """The next global batch, from this process's slice; its token ids cut
    to the text bucket of the global batch's longest caption."""
    local = {k: v for k, v in next(self.data.iterator).items() if k in step_lib.BATCH_KEYS}
    longest = self.longest_text(int(local['lengths'].max()))
    local['input_ids'] = tokenizer_lib.cut_to_bucket(
        local['input_ids'], local['lengths'], tuple(self.cfg.train.text_buckets), longest)
    return parallel.global_batch(local, self.mesh)

  def close(self) -> None:
    if self.progress is not None:
      self.progress.close()  # before any error message: the bar's last line is drawn now
    self.checkpoints.close()
    self.writer.close()
    self.data.close()


def _start_devices(cfg: ml_collections.ConfigDict):
  """``(mesh, compute dtype)``, after the multi-process start when asked for."""
  distributed = cfg.distributed
  parallel.maybe_initialize_distributed(
      distributed.initialize, coordinator_address=distributed.coordinator_address or None,
      num_processes=distributed.num_processes or None,
      process_id=distributed.process_id if distributed.process_id >= 0 else None)
  mesh = parallel.make_mesh()
  if cfg.train.batch_size % (mesh.shape['data'] * mesh.shape.get('fsdp', 1)):
    raise train_setup.ConfigError(f'train.batch_size {cfg.train.batch_size} is not a multiple '
                                  f'of the {jax.device_count()} devices')
  steps = cfg.train.accumulation_steps
  if steps < 1 or cfg.train.batch_size % (steps * mesh.shape['data']):
    raise train_setup.ConfigError(
        f'train.accumulation_steps {steps} must be at least 1 and split train.batch_size '
        f'{cfg.train.batch_size} into micro-batches of equal rows on each of the '
        f'{mesh.shape["data"]} devices (batch_size a multiple of accumulation_steps x devices)')
  dtype = train_setup.compute_dtype(cfg.train.compute_dtype)
  logger.info('devices: %d x %s over %d process(es); compute dtype %s', jax.device_count(),
              jax.devices()[0].device_kind, jax.process_count(), jnp.dtype(dtype).name)
  return mesh, dtype


def _model_and_step(cfg, data: train_setup.TrainingData, mesh: Mesh, dtype):
  """``(model_config, graphdef, state, train_step)``: the initial state,
  replicated, and the jitted step with its optimiser and schedule."""
  model_config, bert_state = train_setup.model_config(cfg, data.tokenizer,
                                                      data.tokenizer_folder)
  model = train_setup.init_model(model_config, bert_state, cfg, dtype, parallel.replicated(mesh))
  schedule = train_setup.make_schedule(cfg, data.steps_per_epoch, data.total_steps)
  optimizer = train_setup.make_optimizer(cfg, schedule)
  graphdef, state = step_lib.create_train_state(model, optimizer, mesh)
  options = step_lib.StepOptions(augment=cfg.train.augment, text_dropout=cfg.train.text_dropout,
                                 remat=cfg.train.remat,
                                 accumulation_steps=cfg.train.accumulation_steps)
  train_step = step_lib.make_train_step(graphdef, optimizer, mesh, schedule=schedule,
                                        options=options, compute_dtype=dtype)
  return model_config, graphdef, state, train_step


def _resume(checkpoints: checkpoints_lib.Checkpoints, state, data_iter, config_json: dict,
            workdir: str):
  """The newest restorable checkpoint's state, else ``state``."""
  try:
    restored = checkpoints.restore(state, data_iter)
  except BaseException:
    checkpoints.close()  # no orbax thread left to report on a closed event loop at exit
    raise
  if restored is None:
    return state
  logger.info('resumed from step %d of %s', int(restored.step), workdir)
  drift = checkpoints_lib.config_drift(checkpoints.restored_config, config_json)
  if drift:
    logger.warning('the config differs from the one the checkpoint was trained with: %s',
                   '; '.join(drift))
  return restored


def _set_up(cfg: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Devices, data, model and step; then resume from the workdir."""
  mesh, dtype = _start_devices(cfg)
  data = train_setup.TrainingData.from_config(cfg, workdir)
  model_config, graphdef, state, train_step = _model_and_step(cfg, data, mesh, dtype)
  config_json = cfg.to_dict()
  is_main = parallel.is_main_process()
  if is_main:
    checkpoint.save_model_config(model_config, os.path.join(workdir, checkpoint.CONFIG_FILE))
    write_json(os.path.join(workdir, CONFIG_JSON), config_json, sort_keys=True)
  checkpoints = checkpoints_lib.Checkpoints(workdir, cfg.checkpoint.keep)
  state = _resume(checkpoints, state, data.iterator, config_json, workdir)
  first_step = int(parallel.to_host(state.step))
  if is_main:
    metrics_log.truncate_metrics(workdir, first_step)
  return _Run(cfg=cfg, workdir=workdir, mesh=mesh, data=data, model_config=model_config,
              graphdef=graphdef, state=state, train_step=train_step, checkpoints=checkpoints,
              config_json=config_json, first_step=first_step,
              writer=metrics_log.MetricsWriter(workdir, enabled=is_main))


class _CompiledSteps:
  """The step compiled once per text width (bucket) it meets, with its FLOPs."""

  def __init__(self, run: _Run):
    self.run, self.steps = run, {}

  def __call__(self, state, batch, key):
    """``(state, metrics, FLOPs of the step or None)``."""
    width = batch['input_ids'].shape[1]
    if width not in self.steps:
      started = time.time()
      compiled = self.run.train_step.lower(state, batch, key).compile()
      flops = metrics_log.step_flops(compiled)
      logger.info('step compiled for texts of %d tokens in %.1f s; %s FLOPs per step', width,
                  time.time() - started, f'{flops:.3g}' if flops else 'unknown')
      self.steps[width] = compiled, flops
    compiled, flops = self.steps[width]
    return *compiled(state, batch, key), flops


def _train_steps(run: _Run, key, evaluation: periodic.PeriodicEval) -> Optional[int]:
  """Steps from ``run.first_step`` to the last, with the periodic actions.

  Returns:
    the step a stop request ended the run at, or None when it finished.
  """
  cfg, data = run.cfg, run.data
  batch = run.next_batch() if run.first_step < data.total_steps else None
  compiled = _CompiledSteps(run)
  run.progress = tqdm(total=data.total_steps, initial=run.first_step,
                      disable=not parallel.is_main_process(), dynamic_ncols=True, desc='train')
  metrics = periodic.StepMetrics(run.workdir)
  log = periodic.IntervalLog(
      every=cfg.log_every_steps, batch_size=cfg.train.batch_size,
      steps_per_epoch=data.steps_per_epoch, total_steps=data.total_steps, writer=run.writer,
      progress=run.progress)
  saver = periodic.PeriodicSave(
      run.checkpoints, every=cfg.checkpoint.every_steps or data.steps_per_epoch,
      total_steps=data.total_steps, data_iter=data.iterator, config_json=run.config_json)
  with periodic.stop_requests() as requested:
    stop = periodic.StopAgreement(requested)
    for step in range(run.first_step, data.total_steps):
      run.state, step_metrics, flops = compiled(run.state, batch, key)
      done = step + 1
      metrics.add(done, step_metrics)
      log.count_step(flops)
      at_log = log.due(done)
      if at_log:
        metrics.flush(saver.last_saved)
        log.write(done, metrics.interval_means())
      run.progress.update(1)
      stopping = stop.agreed(at_log)  # every process stops at the same step
      if saver.due(done) or stopping:
        metrics.flush(saver.last_saved)
        saver.save(run.state, done)
      if stopping:
        run.checkpoints.wait()
        logger.warning('stop requested (signal %s): saved step %d, exiting',
                       stop.signal_name(), done)
        return done
      if evaluation.due(done):
        evaluation.evaluate(run.state, done)
      if done < data.total_steps:  # after the save: it records the iterator's position
        batch = run.next_batch()
  return None


def _export(run: _Run) -> dict:
  """The PyTorch FLAIR folder of the final state, from memory."""
  from flair_jax.convert import flair_torch as convert_flair  # pylint: disable=g-import-not-at-top
  model_state = trees.merge(nnx.to_pure_dict(parallel.to_host(run.state.params)),
                            nnx.to_pure_dict(parallel.to_host(run.state.batch_stats)))
  out = os.path.join(run.workdir, EXPORT_DIR)
  shutil.rmtree(out, ignore_errors=True)
  out = convert_flair.export_state(model_state, run.model_config, out, fmt='both',
                                   bundle_text_encoder=True, source=run.workdir)
  return {'export': out, 'export_files': sorted(os.listdir(out)),
          'export_note': convert_flair.describe_export(run.model_config)}


def _finish(run: _Run, evaluation: periodic.PeriodicEval) -> dict:
  """Final eval, export and plots; their entries of the summary."""
  run.progress.close()
  run.checkpoints.wait()
  final_step = int(parallel.to_host(run.state.step))
  summary = {'final_step': final_step, 'results': evaluation.final(run.state, final_step),
             'params_l2': float(parallel.to_host(optax.tree.norm(run.state.params)))}
  if run.cfg.export_torch:
    summary.update(parallel.on_main_process(lambda: _export(run), 'export') or {})
  if parallel.is_main_process() and run.cfg.plots:
    summary['plots'] = metrics_log.plot(run.workdir)
  return summary


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) and evaluates; returns a summary of the run."""
  started = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  run = _set_up(cfg, workdir)
  summary = {'workdir': workdir, 'data': run.data.path,
             'steps_per_epoch': run.data.steps_per_epoch,
             'total_steps': run.data.total_steps, 'first_step': run.first_step}
  try:
    key = parallel.replicated_value(lambda: jax.random.key(cfg.seed), run.mesh)
    zero_shot = ZeroShotDuringTraining(
        train_setup.eval_sets(cfg, run.data.path), graphdef=run.graphdef,
        tokenizer=run.data.tokenizer, model_config=run.model_config,
        knowledge=cfg.data.knowledge, batch_size=cfg.eval.batch_size,
        domain_knowledge=cfg.eval.domain_knowledge and bool(cfg.data.knowledge))
    evaluation = periodic.PeriodicEval(
        zero_shot, every=cfg.eval.every_steps, total_steps=run.data.total_steps,
        checkpoints=run.checkpoints, writer=run.writer)
    stopped_at = _train_steps(run, key, evaluation)
    if stopped_at is not None:
      summary['stopped_at'] = stopped_at
      return summary  # a stopped run reports no wall time
    summary.update(_finish(run, evaluation))
  finally:
    run.close()
  summary['wall_seconds'] = time.time() - started
  return summary
