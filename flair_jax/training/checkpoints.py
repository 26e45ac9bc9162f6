"""The training run's checkpoints: save, and resume from the newest one that
restores, setting damaged or unfinished step folders aside (never deleting
them)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import tempfile
import time
from typing import Optional

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from data_pipelines.console import UserError
from flair_jax import checkpoint, parallel, trees
from flair_jax.training import step as step_lib

logger = logging.getLogger(__name__)

META_ITEM = 'meta'
OPT_STATE_ITEM = 'opt_state'
DATA_ITEM = 'data'


class CheckpointError(UserError, RuntimeError):
  """The workdir's checkpoints cannot be resumed from."""


def _abstract(tree):
  """Shapes, dtypes and shardings of ``tree``: orbax's restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _model_state(state: step_lib.TrainState):
  """``(params, batch_stats)`` of ``state`` as pure dicts."""
  return nnx.to_pure_dict(state.params), nnx.to_pure_dict(state.batch_stats)


class Checkpoints:
  """Orbax ``CheckpointManager`` over ``<workdir>/checkpoints``.

  Items: the model (``checkpoint.MODEL_ITEM``: all parameters and BatchNorm
  statistics, the layout that ``flair_jax.checkpoint`` and the converter
  read), the optimiser state, ``meta`` (step and config) and ``data`` (the
  grain iterator's position). Saves are asynchronous; orbax finalises a step
  folder only once every item is written, so a checkpoint is complete or
  absent.

  Attributes:
    directory: the checkpoints folder.
    restored_config: the config dict the restored checkpoint was trained
      with (set by :meth:`restore`).
  """

  def __init__(self, workdir: str, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    self.directory = os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINTS_DIR)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.restored_config = {}

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, state: step_lib.TrainState, data_iter, config_json: dict) -> None:
    step = int(parallel.to_host(state.step))
    model = trees.merge(*_model_state(state))
    self.manager.save(step, args=ocp.args.Composite(**{
        checkpoint.MODEL_ITEM: ocp.args.StandardSave(model),
        OPT_STATE_ITEM: ocp.args.StandardSave(state.opt_state),
        META_ITEM: ocp.args.JsonSave({'step': step, 'config': config_json}),
        DATA_ITEM: grain.checkpoint.CheckpointSave(data_iter)}))

  def restore(self, state: step_lib.TrainState, data_iter) -> Optional[step_lib.TrainState]:
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
        with quiet_abandoned_reads():
          restored = self._restore_step(step, state, data_iter)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # any damage: set aside
        reason = short_reason(e)
      if not parallel.any_process(reason is not None):
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

  def _set_aside(self, step: int, kind: str, reason: str) -> str:
    """Renames step folder ``step`` to ``<step>.<kind>-<time>`` (on process 0)."""
    path = os.path.join(self.directory, f'{step}.{kind}-{time.strftime("%Y%m%d-%H%M%S")}')
    if parallel.is_main_process():
      os.rename(os.path.join(self.directory, str(step)), path)
      logger.warning('checkpoint step %d is not usable (%s); moved it aside to %s and trying '
                     'the step before it', step, reason, path)
    self._sync(f'checkpoint {step} set aside')
    return path

  def _put_back(self, set_aside) -> None:
    """Undoes :meth:`_set_aside` for every ``(step, path, reason)``."""
    if parallel.is_main_process():
      for step, path, _ in set_aside:
        os.rename(path, os.path.join(self.directory, str(step)))
    self._sync('checkpoints put back')

  def _sync(self, what: str) -> None:
    """Every process waits for the renames, then rereads the folder."""
    parallel.sync_processes(what)
    self.manager.reload()

  def _check_model_shape(self, step: int, target) -> None:
    item_dir = os.path.join(self.directory, str(step), checkpoint.MODEL_ITEM)
    problems = checkpoint.shape_problems(item_dir, target)
    if problems:
      raise CheckpointError(
          f'checkpoint {os.path.dirname(item_dir)} holds a model of another shape than this '
          f'config builds ({"; ".join(problems[:3])}{"; ..." if len(problems) > 3 else ""}). '
          'Resume with the config it was trained with (config.json in the workdir), or use '
          'another --workdir.')

  def _restore_step(self, step: int, state: step_lib.TrainState, data_iter):
    params, stats = _model_state(state)
    target = _abstract(trees.merge(params, stats))
    self._check_model_shape(step, target)
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        checkpoint.MODEL_ITEM: ocp.args.StandardRestore(target),
        OPT_STATE_ITEM: ocp.args.StandardRestore(_abstract(state.opt_state)),
        META_ITEM: ocp.args.JsonRestore(),
        DATA_ITEM: grain.checkpoint.CheckpointRestore(data_iter)}))
    new_params, new_stats = state.params, state.batch_stats
    nnx.replace_by_pure_dict(new_params, trees.select(restored[checkpoint.MODEL_ITEM], params))
    nnx.replace_by_pure_dict(new_stats, trees.select(restored[checkpoint.MODEL_ITEM], stats))
    self.restored_config = restored[META_ITEM].get('config', {})
    return step_lib.TrainState(step=jnp.asarray(restored[META_ITEM]['step'], jnp.int32),
                               params=new_params, batch_stats=new_stats,
                               opt_state=restored[OPT_STATE_ITEM])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


class _AbandonedReadEchoes(logging.Filter):
  """Drops asyncio's report of a TensorStore read error that no one retrieved
  (a read a failed restore abandoned) and nothing else."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if not message.startswith(('Task exception was never retrieved',
                               'Future exception was never retrieved')):
      return True
    error = record.exc_info[1] if record.exc_info else None
    # A failed open names its TensorStore spec ("tensorstore_spec[0]=..."),
    # a failed read its array index.
    return not _is_abandoned_read(f'{message} {error}')


_ABANDONED_READ_ECHOES = _AbandonedReadEchoes()


def _is_abandoned_read(text: str) -> bool:
  text = text.lower()
  return 'tensorstore' in text or 'reading array index' in text


class _UnraisableAbandonedReads:
  """A ``sys.unraisablehook`` that drops the error of an orbax read
  coroutine closed unfinished (a read a failed restore abandoned, collected
  as late as exit) and passes everything else to the hook it replaced."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable):
    if (asyncio.iscoroutine(unraisable.object)
        and _is_abandoned_read(f'{unraisable.exc_value}')):
      return
    self.previous(unraisable)


def _drop_unraisable_abandoned_reads() -> None:
  if not isinstance(sys.unraisablehook, _UnraisableAbandonedReads):
    sys.unraisablehook = _UnraisableAbandonedReads(sys.unraisablehook)


@contextlib.contextmanager
def quiet_abandoned_reads():
  """orbax reads arrays in asyncio tasks; when one read fails, the errors of
  the others are never retrieved and asyncio logs each one, with the whole
  TensorStore spec, when the task is collected, and TensorStore's callbacks
  of the reads still in flight print "Event loop is closed" tracebacks
  straight to the process's stderr once the loop of the failed restore is
  gone. The failure is reported once, by the caller: while a restore is
  tried, stderr goes to a temporary file, replayed as it was when the
  restore succeeds and dropped when it fails."""
  # Abandoned tasks may be collected at any later time, even at exit: the
  # filter stays.
  logging.getLogger('asyncio').addFilter(_ABANDONED_READ_ECHOES)
  _drop_unraisable_abandoned_reads()
  sys.stderr.flush()
  stderr_fd = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    failed = True
    try:
      yield
      failed = False
    finally:
      gc.collect()  # the abandoned tasks are collected, and logged, now
      if failed:
        _wait_until_quiet(captured)
      sys.stderr.flush()
      os.dup2(stderr_fd, 2)
      os.close(stderr_fd)
      if not failed:
        captured.seek(0)
        os.write(2, captured.read())


def _wait_until_quiet(captured, settle: float = 0.3, limit: float = 3.0) -> None:
  """Waits until nothing has been written to ``captured`` for ``settle``
  seconds (the last callbacks of abandoned reads), ``limit`` at most."""
  deadline = time.time() + limit
  size, since = -1, time.time()
  while time.time() < deadline:
    now = os.fstat(captured.fileno()).st_size
    if now != size:
      size, since = now, time.time()
    elif time.time() - since >= settle:
      return
    time.sleep(0.05)


def short_reason(error: BaseException) -> str:
  """The first line of an error, without TensorStore's attached details."""
  text = (str(error).strip().splitlines() or [''])[0].split(' See full TensorStore')[0]
  return f'{type(error).__name__}: {text[:300]}'


def config_drift(saved: dict, current: dict, prefix: str = '') -> list:
  """``'key: old -> new'`` for each key whose value differs between two
  config dicts (nested keys dotted; lists and tuples compare alike)."""
  drift = []
  for key in sorted(set(saved) | set(current)):
    old, new = saved.get(key), current.get(key)
    if isinstance(old, dict) and isinstance(new, dict):
      drift += config_drift(old, new, f'{prefix}{key}.')
    elif (list(old) if isinstance(old, (list, tuple)) else old) != (
        list(new) if isinstance(new, (list, tuple)) else new):
      drift.append(f'{prefix}{key}: {old!r} -> {new!r}')
  return drift
