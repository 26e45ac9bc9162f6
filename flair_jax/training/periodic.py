"""What the training loop does between steps.

Each periodic action is an object that says whether it is due after a step
(``due(done)``) and does it: the metrics log, the checkpoint save, the
zero-shot eval; the stop agreement turns a signal into the same decision on
every process. Their state (pending metrics, the interval's clock, the last
saved step, the latest eval results) lives in them.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Optional

import jax
import numpy as np

from data_pipelines.console import UserError
from flair_jax import checkpoint, parallel
from flair_jax.training import metrics_log

logger = logging.getLogger(__name__)

# Metrics that stop the run when not finite.
CHECKED_METRICS = ('loss', 'l2_grads', 'l2_params')


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss became NaN or infinite."""


class StepMetrics:
  """The device metrics of the steps not yet copied to the host, and the
  host metrics of the current logging interval."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.pending = []  # (step, device metrics)
    self.interval = []  # host metrics

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))

  def flush(self, last_saved: Optional[int]) -> None:
    """Host copies of the pending metrics.

    Args:
      last_saved: the newest saved step, named in the error.
    Raises:
      NonFiniteLossError: a step's loss or norms are not finite.
    """
    for step, metrics in self.pending:
      metrics = parallel.to_host(metrics)
      bad = [k for k in CHECKED_METRICS if not np.isfinite(metrics[k])]
      if bad:
        where = (f'the last good checkpoint is step {last_saved} in '
                 f'{self.workdir}/{checkpoint.CHECKPOINTS_DIR} (a restart resumes from it)'
                 if last_saved is not None else 'no checkpoint was saved yet')
        raise NonFiniteLossError(
            f'{", ".join(f"{k} = {float(metrics[k])}" for k in bad)} at step {step}; the run '
            f'stops and {where}. Consider a lower train.lr.')
      self.interval.append(metrics)
    self.pending.clear()

  def interval_means(self) -> dict:
    """Means over the interval's steps; starts the next interval."""
    means = metrics_log.interval_summary(self.interval)
    self.interval.clear()
    return means


class IntervalLog:
  """Every ``every`` steps and at the last one: the interval's mean metrics,
  images per second, epoch and MFU to ``metrics.jsonl``, TensorBoard and the
  progress bar. The interval's clock starts at construction."""

  def __init__(self, *, every: int, batch_size: int, steps_per_epoch: int, total_steps: int,
               writer: metrics_log.MetricsWriter, progress):
    self.every, self.batch_size = every, batch_size
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    self.writer, self.progress = writer, progress
    self.peak = metrics_log.peak_flops()
    self.started, self.steps, self.flops = time.time(), 0, 0.0

  def count_step(self, flops: Optional[float]) -> None:
    """One more step of ``flops`` (per device; None: unknown, no MFU)."""
    self.steps += 1
    self.flops = self.flops + flops if flops and self.flops is not None else None

  def due(self, done: int) -> bool:
    return done % self.every == 0 or done == self.total_steps

  def write(self, done: int, means: dict) -> None:
    """Logs the interval ending at step ``done``; starts the next one."""
    elapsed = time.time() - self.started
    scalars = {f'train/{k}': v for k, v in means.items()}
    images_per_sec = self.steps * self.batch_size / max(elapsed, 1e-9)
    scalars['train/images_per_sec'] = images_per_sec
    scalars['train/epoch'] = done / self.steps_per_epoch
    if self.flops and self.peak:
      scalars['train/mfu'] = self.flops / elapsed / self.peak  # per-device FLOPs
    self.writer.write(done, scalars)
    self.progress.set_postfix(epoch=f'{done / self.steps_per_epoch:.2f}',
                              loss=f'{scalars["train/loss"]:.4f}',
                              lr=f'{scalars["train/lr"]:.2e}', img_s=f'{images_per_sec:.0f}')
    self.started, self.steps, self.flops = time.time(), 0, 0.0


class StopAgreement:
  """A SIGTERM / Ctrl-C on any process, agreed by all at the same step."""

  def __init__(self, requested: list):
    self.requested = requested  # the signals received (see stop_requests)

  def agreed(self, at_log: bool) -> bool:
    """Whether every process stops after this step; on several processes
    they agree only at logging steps (the agreement is a collective)."""
    if jax.process_count() == 1 or at_log:
      return parallel.any_process(bool(self.requested))
    return False

  def signal_name(self):
    return self.requested[0] if self.requested else 'on another process'


@contextlib.contextmanager
def stop_requests():
  """Turns SIGTERM / SIGINT into a list of signals the loop checks between
  steps; yields the list."""
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


class PeriodicSave:
  """A checkpoint every ``every`` steps and at the last one (and, called by
  the loop, on a stop)."""

  def __init__(self, checkpoints, *, every: int, total_steps: int, data_iter,
               config_json: dict):
    self.checkpoints, self.every, self.total_steps = checkpoints, every, total_steps
    self.data_iter, self.config_json = data_iter, config_json
    self.last_saved = checkpoints.latest_step()

  def due(self, done: int) -> bool:
    return done % self.every == 0 or done == self.total_steps

  def save(self, state, done: int) -> None:
    self.checkpoints.save(state, self.data_iter, self.config_json)
    self.last_saved = done


class PeriodicEval:
  """Zero-shot eval every ``every`` steps before the last, and once at the
  end, on process 0 while the others wait; results go to the metrics log.

  Attributes:
    latest: the results of the last eval ({} before any; None on the other
      processes after a periodic one).
  """

  def __init__(self, zero_shot, *, every: int, total_steps: int, checkpoints,
               writer: metrics_log.MetricsWriter):
    self.zero_shot, self.every, self.total_steps = zero_shot, every, total_steps
    self.checkpoints, self.writer = checkpoints, writer
    self.latest = {}

  def due(self, done: int) -> bool:
    return bool(self.every) and done % self.every == 0 and done < self.total_steps

  def evaluate(self, state, done: int) -> None:
    self.checkpoints.wait()
    self.latest = parallel.on_main_process(
        lambda: self.zero_shot(state.params, state.batch_stats), f'eval at step {done}')
    if parallel.is_main_process():
      self.writer.write(done, self.latest)
      logger.info('step %d: %s', done, self.latest)

  def final(self, state, final_step: int) -> dict:
    """The final eval's results (the latest ones when there are no sets)."""
    if self.zero_shot:
      self.latest = parallel.on_main_process(
          lambda: self.zero_shot.final(state.params, state.batch_stats), 'final eval') or {}
      if parallel.is_main_process() and self.latest:
        self.writer.write(final_step, self.latest)
    return self.latest
