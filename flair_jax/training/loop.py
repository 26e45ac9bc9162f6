"""The pre-training loop: ``train_and_evaluate(config, workdir)``.

A run resumes from its workdir first (the newest checkpoint that restores:
model, optimiser, step and the data iterator's position; a damaged newer one
is moved aside, never deleted), else starts from the initial weights the
config names. SIGTERM and Ctrl-C save the current step and return; a
non-finite loss stops the run naming the step, keeping the last good
checkpoint. On several processes every process runs this same function;
process 0 logs, evaluates and exports while the others wait.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import signal
import threading
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from data_pipelines import pipeline
from data_pipelines.console import UserError
from data_pipelines.jsonio import write_json
from flair_jax import checkpoint, parallel, trees
from flair_jax.evaluation.during_training import ZeroShotDuringTraining
from flair_jax.training import metrics_log, setup as train_setup
from flair_jax.training import step as step_lib

logger = logging.getLogger(__name__)

EXPORT_DIR = 'export_torch'


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss became NaN or infinite."""


class ProcessZeroError(UserError, RuntimeError):
  """What the other processes report when process 0 failed at a step they
  were waiting for."""


class CheckpointError(UserError, RuntimeError):
  """The workdir's checkpoints cannot be resumed from."""


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
  """Orbax ``CheckpointManager`` over ``<workdir>/checkpoints``.

  Items: ``model`` (all parameters and BatchNorm statistics, the layout that
  ``flair_jax.checkpoint`` and the converter read), ``opt_state``, ``meta``
  (step and config) and ``data`` (the grain iterator's position). Saves are
  asynchronous; orbax finalises a step folder only once every item is
  written, so a checkpoint is complete or absent.
  """

  def __init__(self, workdir: str, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self.directory = os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINTS_DIR)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, state: step_lib.TrainState, data_iter, config_json: dict) -> None:
    step = int(parallel.to_host(state.step))
    model = trees.merge(nnx.to_pure_dict(state.params), nnx.to_pure_dict(state.batch_stats))
    self.manager.save(step, args=ocp.args.Composite(
        **{checkpoint.MODEL_ITEM: ocp.args.StandardSave(model)},
        opt_state=ocp.args.StandardSave(state.opt_state),
        meta=ocp.args.JsonSave({'step': step, 'config': config_json}),
        data=grain.checkpoint.CheckpointSave(data_iter)))

  def restore(self, state: step_lib.TrainState, data_iter):
    """The newest checkpoint that restores, in the shapes and shardings of
    ``state``; None when the workdir has none.

    A step that fails to restore (a truncated or corrupt file) is logged with
    its reason and moved aside as ``<step>.damaged-<time>`` (never deleted);
    a step folder without orbax's commit marker (a save that never finished)
    is moved aside as ``<step>.incomplete-<time>``; then the step before it is
    tried. When none restores, every folder is put back as it was (the cause
    may be a changed config or process count rather than damage) and the run
    stops. Every process takes the same decision.

    Raises:
      CheckpointError: checkpoints exist but none restores, or they hold a
        model of another shape than ``state``.
    """
    set_aside = []  # (step, folder it was moved to, reason)
    while (step := self.manager.latest_step()) is not None:
      if not checkpoint.is_committed(os.path.join(self.directory, str(step))):
        reason = 'no commit marker: a save that never finished'
        set_aside.append((step, self._set_aside(step, 'incomplete', reason), reason))
        continue
      reason, restored = None, None
      try:
        with _quiet_abandoned_reads():
          restored = self._restore_step(step, state, data_iter)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # any damage: set aside
        reason = _short_reason(e)
      if not _any_process(reason is not None):
        return restored
      reason = reason or 'failed on another process'
      set_aside.append((step, self._set_aside(step, 'damaged', reason), reason))
    if set_aside:
      self._put_back(set_aside)
      raise CheckpointError(
          f'no checkpoint in {self.directory} restores, so none was moved: '
          + '; '.join(f'step {step}: {reason}' for step, _, reason in set_aside)
          + '. Resume with the config and process count it was trained with, restore a '
          'backup into that folder, or start afresh with another --workdir.')
    return None

  def _set_aside(self, step: int, kind: str, reason: str):
    """Renames step folder ``step`` to ``<step>.<kind>-<time>`` (on process 0)."""
    path = os.path.join(self.directory, f'{step}.{kind}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0:
      os.rename(os.path.join(self.directory, str(step)), path)
      logger.warning('checkpoint step %d is not usable (%s); moved it aside to %s and trying '
                     'the step before it', step, reason, path)
    self._sync(f'checkpoint {step} set aside')
    return path

  def _put_back(self, set_aside) -> None:
    if jax.process_index() == 0:
      for step, path, _ in set_aside:
        os.rename(path, os.path.join(self.directory, str(step)))
    self._sync('checkpoints put back')

  def _sync(self, what: str) -> None:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'flair_jax: {what}')
    self.manager.reload()

  def _restore_step(self, step: int, state: step_lib.TrainState, data_iter):
    params, stats = nnx.to_pure_dict(state.params), nnx.to_pure_dict(state.batch_stats)
    target = _abstract(trees.merge(params, stats))
    item_dir = os.path.join(self.directory, str(step), checkpoint.MODEL_ITEM)
    problems = checkpoint.shape_problems(item_dir, target)
    if problems:
      raise CheckpointError(
          f'checkpoint {os.path.dirname(item_dir)} holds a model of another shape than this '
          f'config builds ({"; ".join(problems[:3])}{"; ..." if len(problems) > 3 else ""}). '
          'Resume with the config it was trained with (config.json in the workdir), or use '
          'another --workdir.')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{checkpoint.MODEL_ITEM: ocp.args.StandardRestore(target)},
        opt_state=ocp.args.StandardRestore(_abstract(state.opt_state)),
        meta=ocp.args.JsonRestore(),
        data=grain.checkpoint.CheckpointRestore(data_iter)))
    new_params, new_stats = state.params, state.batch_stats
    nnx.replace_by_pure_dict(new_params, trees.select(restored[checkpoint.MODEL_ITEM], params))
    nnx.replace_by_pure_dict(new_stats, trees.select(restored[checkpoint.MODEL_ITEM], stats))
    self.restored_config = restored['meta'].get('config', {})
    return step_lib.TrainState(step=jnp.asarray(restored['meta']['step'], jnp.int32),
                               params=new_params, batch_stats=new_stats,
                               opt_state=restored['opt_state'])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


@contextlib.contextmanager
def _stop_requests():
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""
  requested = []

  def handler(signum, _):
    requested.append(signum)

  if threading.current_thread() is not threading.main_thread():
    yield requested  # signals reach only the main thread
    return
  previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield requested
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """orbax reads arrays in asyncio tasks; when one read fails, the errors of
  the others are never retrieved and asyncio logs each one, with the whole
  TensorStore spec, when the task is collected. The failure is reported once,
  by the caller; this drops those echoes (and only those)."""
  log = logging.getLogger('asyncio')

  def keep(record):
    return not record.getMessage().startswith('Task exception was never retrieved')

  log.addFilter(keep)
  try:
    yield
  finally:
    gc.collect()  # the abandoned tasks are collected, and logged, now
    log.removeFilter(keep)


def _short_reason(error: BaseException) -> str:
  """The first line of an error, without TensorStore's attached details."""
  text = (str(error).strip().splitlines() or [''])[0].split(' See full TensorStore')[0]
  return f'{type(error).__name__}: {text[:300]}'


def _any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is True on any (a collective)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _config_drift(saved: dict, current: dict, prefix: str = '') -> list:
  """Keys whose values differ between two config dicts."""
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k), current.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _config_drift(a, b, f'{prefix}{k}.')
    elif (list(a) if isinstance(a, (list, tuple)) else a) != (
        list(b) if isinstance(b, (list, tuple)) else b):
      out.append(f'{prefix}{k}: {a!r} -> {b!r}')
  return out


def _export(workdir: str, state: step_lib.TrainState, mc) -> dict:
  """The PyTorch FLAIR folder of the final state, from memory."""
  from flair_jax.convert import flair_torch as convert_flair  # pylint: disable=g-import-not-at-top
  model_state = trees.merge(nnx.to_pure_dict(parallel.to_host(state.params)),
                             nnx.to_pure_dict(parallel.to_host(state.batch_stats)))
  out = os.path.join(workdir, EXPORT_DIR)
  shutil.rmtree(out, ignore_errors=True)
  out = convert_flair.export_state(model_state, mc, out, fmt='both', bundle_text_encoder=True,
                                   source=workdir)
  return {'export': out, 'export_files': sorted(os.listdir(out)),
          'export_note': convert_flair.describe_export(mc)}


def _on_main(fn, what: str):
  """``fn()`` on process 0 while the other processes wait for it.

  Every process learns whether it failed (the agreement is a collective), so
  none is left waiting: process 0 re-raises, the others raise a one-line
  error pointing at its log.

  Returns:
    its result on process 0 and None elsewhere.
  """
  if jax.process_count() == 1:
    return fn()
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = fn()
    except BaseException as e:  # pylint: disable=broad-except  # re-raised below
      error = e
  if _any_process(error is not None):
    if error is not None:
      raise error
    raise ProcessZeroError(f'process 0 failed during {what}; its log says why')
  return result


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) and evaluates; returns a summary of the run."""
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  dist = cfg.distributed
  parallel.maybe_initialize_distributed(
      dist.initialize, coordinator_address=dist.coordinator_address or None,
      num_processes=dist.num_processes or None,
      process_id=dist.process_id if dist.process_id >= 0 else None)
  is_main = jax.process_index() == 0
  mesh = parallel.make_mesh()
  n_proc = jax.process_count()
  if cfg.train.batch_size % (mesh.shape['data'] * mesh.shape.get('fsdp', 1)):
    raise train_setup.ConfigError(f'train.batch_size {cfg.train.batch_size} is not a multiple '
                                  f'of the {jax.device_count()} devices')
  dtype = train_setup.compute_dtype(cfg.train.compute_dtype)
  logger.info('devices: %d x %s over %d process(es); compute dtype %s', jax.device_count(),
              jax.devices()[0].device_kind, n_proc, jnp.dtype(dtype).name)

  # Input: process 0 builds what is missing (synthetic set, vocabulary) before
  # the other processes open it.
  def open_input():
    path = train_setup.prepare_data(cfg.data, workdir)
    srcs = train_setup.train_sources(path)
    return (path, srcs) + train_setup.prepare_tokenizer(cfg, workdir, srcs)

  opened = _on_main(open_input, 'the data and tokenizer build')
  data_path, sources, tokenizer, tokenizer_folder = opened if is_main else open_input()
  data_iter = pipeline.make_pretraining_iterator(
      sources, batch_size=cfg.train.batch_size // n_proc, seed=cfg.seed, tokenizer=tokenizer,
      knowledge=cfg.data.knowledge or None, canvas=cfg.model.image_size,
      sampling=cfg.data.sampling, epoch_length=cfg.data.epoch_length or None,
      worker_count=cfg.data.worker_count, read_threads=cfg.data.read_threads)
  train_setup.check_datasets(cfg.data.datasets, data_iter.index.counts(), data_path)
  # PyTorch FLAIR's len(DataLoader): ceil(epoch length / batch).
  epoch_length = cfg.data.epoch_length or data_iter.index.size
  steps_per_epoch = max(1, -(-epoch_length // cfg.train.batch_size))
  total_steps = cfg.train.epochs * steps_per_epoch

  # Model, optimiser, step.
  mc, bert_state = train_setup.model_config(cfg, tokenizer, tokenizer_folder)
  model = train_setup.init_model(mc, bert_state, cfg, dtype, parallel.replicated(mesh))
  schedule = train_setup.make_schedule(cfg, steps_per_epoch, total_steps)
  tx = train_setup.make_optimizer(cfg, schedule)
  graphdef, state = step_lib.create_train_state(model, tx, mesh)
  del model
  options = step_lib.StepOptions(augment=cfg.train.augment, text_dropout=cfg.train.text_dropout,
                                 remat=cfg.train.remat)
  train_step = step_lib.make_train_step(graphdef, tx, mesh, schedule=schedule, options=options,
                                        compute_dtype=dtype)
  config_json = cfg.to_dict()
  if is_main:
    checkpoint.save_model_config(mc, os.path.join(workdir, checkpoint.CONFIG_FILE))
    write_json(os.path.join(workdir, 'config.json'), config_json, sort_keys=True)

  # Resume from the workdir first.
  ckpts = Checkpoints(workdir, cfg.checkpoint.keep)
  try:
    restored = ckpts.restore(state, data_iter)
  except BaseException:
    ckpts.close()  # no orbax thread left to report on a closed event loop at exit
    raise
  if restored is not None:
    state = restored
    logger.info('resumed from step %d of %s', int(state.step), workdir)
    drift = _config_drift(ckpts.restored_config, config_json)
    if drift:
      logger.warning('the config differs from the one the checkpoint was trained with: %s',
                     '; '.join(drift))
  first_step = int(parallel.to_host(state.step))
  if is_main:
    metrics_log.truncate_metrics(workdir, first_step)
  writer = metrics_log.MetricsWriter(workdir, enabled=is_main)
  every_ckpt = cfg.checkpoint.every_steps or steps_per_epoch
  key = parallel.replicated_value(lambda: jax.random.key(cfg.seed), mesh)

  def next_batch():
    local = next(data_iter)
    return parallel.global_batch({k: local[k] for k in step_lib.BATCH_KEYS}, mesh)

  zero_shot = ZeroShotDuringTraining(
      train_setup.eval_sets(cfg, data_path), graphdef=graphdef, tokenizer=tokenizer,
      model_config=mc, knowledge=cfg.data.knowledge, batch_size=cfg.eval.batch_size,
      domain_knowledge=cfg.eval.domain_knowledge and bool(cfg.data.knowledge))
  summary = {'workdir': workdir, 'data': data_path, 'steps_per_epoch': steps_per_epoch,
             'total_steps': total_steps, 'first_step': first_step}
  results = {}
  progress = None
  try:
    batch = next_batch() if first_step < total_steps else None
    compiled = flops = peak = None
    if batch is not None:
      t0 = time.time()
      compiled = train_step.lower(state, batch, key).compile()
      flops = metrics_log.step_flops(compiled)
      peak = metrics_log.peak_flops()
      logger.info('step compiled in %.1f s; %s FLOPs per step', time.time() - t0,
                  f'{flops:.3g}' if flops else 'unknown')
    pending, history = [], []
    last_saved = ckpts.latest_step()
    progress = tqdm(total=total_steps, initial=first_step, disable=not is_main,
                    dynamic_ncols=True, desc='train')
    t_interval, n_interval = time.time(), 0

    def flush():
      """Host copies of pending metrics; raises on a non-finite loss."""
      for s, m in pending:
        m = parallel.to_host(m)
        bad = [k for k in ('loss', 'l2_grads', 'l2_params') if not np.isfinite(m[k])]
        if bad:
          where = (f'the last good checkpoint is step {last_saved} in {workdir}/checkpoints '
                   '(a restart resumes from it)' if last_saved is not None
                   else 'no checkpoint was saved yet')
          raise NonFiniteLossError(
              f'{", ".join(f"{k} = {float(m[k])}" for k in bad)} at step {s}; the run stops '
              f'and {where}. Consider a lower train.lr.')
        history.append(m)
      pending.clear()

    with _stop_requests() as stop:
      for s in range(first_step, total_steps):
        state, metrics = compiled(state, batch, key)
        pending.append((s + 1, metrics))
        n_interval += 1
        done = s + 1
        at_log = done % cfg.log_every_steps == 0 or done == total_steps
        if at_log:
          flush()
          dt = time.time() - t_interval
          scalars = {f'train/{k}': v for k, v in metrics_log.interval_summary(history).items()}
          ips = n_interval * cfg.train.batch_size / max(dt, 1e-9)
          scalars['train/images_per_sec'] = ips
          scalars['train/epoch'] = done / steps_per_epoch
          if flops and peak:
            scalars['train/mfu'] = flops * n_interval / dt / peak  # per-device FLOPs
          writer.write(done, scalars)
          progress.set_postfix(epoch=f'{done / steps_per_epoch:.2f}',
                               loss=f'{scalars["train/loss"]:.4f}',
                               lr=f'{scalars["train/lr"]:.2e}', img_s=f'{ips:.0f}')
          history.clear()
          t_interval, n_interval = time.time(), 0
        progress.update(1)
        # Every process must stop at the same step: agree at logging steps.
        stopping = _any_process(bool(stop)) if (n_proc == 1 or at_log) else False
        if done % every_ckpt == 0 or done == total_steps or stopping:
          flush()
          ckpts.save(state, data_iter, config_json)
          last_saved = done
        if stopping:
          ckpts.wait()
          logger.warning('stop requested (signal %s): saved step %d, exiting',
                         stop[0] if stop else 'on another process', done)
          summary.update(stopped_at=done)
          return summary
        if cfg.eval.every_steps and done % cfg.eval.every_steps == 0 and done < total_steps:
          ckpts.wait()
          results = _on_main(lambda: zero_shot(state.params, state.batch_stats),
                             f'eval at step {done}')
          if is_main:
            writer.write(done, results)
            logger.info('step %d: %s', done, results)
        if done < total_steps:  # after the save: it records the iterator's position
          batch = next_batch()
    progress.close()
    ckpts.wait()
    final_step = int(parallel.to_host(state.step))
    if zero_shot:
      results = _on_main(lambda: zero_shot.final(state.params, state.batch_stats),
                         'final eval') or {}
      if is_main and results:
        writer.write(final_step, results)
    summary.update(final_step=final_step, results=results,
                   params_l2=float(parallel.to_host(optax.tree.norm(state.params))))
    if cfg.export_torch:
      summary.update(_on_main(lambda: _export(workdir, state, mc), 'export') or {})
    if is_main and cfg.plots:
      summary['plots'] = metrics_log.plot(workdir)
  finally:
    if progress is not None:
      progress.close()  # before any error message: the bar's last line is drawn now
    ckpts.close()
    writer.close()
    if hasattr(data_iter, 'close'):
      data_iter.close()
  summary['wall_seconds'] = time.time() - t_start
  return summary
