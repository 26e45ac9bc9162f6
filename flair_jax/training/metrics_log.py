"""Training logs: ``metrics.jsonl``, TensorBoard events (tensorboardX, no
TensorFlow), a progress bar, MFU, and PNG plots at the end. Only process 0
writes."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping, Optional

import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'

# Dense bf16 peak FLOP/s per chip, by substring of ``device_kind``.
PEAK_FLOPS = (
    ('H200', 989e12), ('H100', 989e12), ('A100', 312e12), ('L4', 121e12),
    ('TPU v6', 918e12), ('TPU v5p', 459e12), ('TPU v5', 197e12), ('TPU v4', 275e12),
)


def peak_flops(device=None) -> Optional[float]:
  """Peak FLOP/s of one device, or None when unknown (e.g. the CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


def step_flops(compiled) -> Optional[float]:
  """FLOPs of one compiled step (whole program, all devices) or None."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend has it
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  flops = (analysis or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


class MetricsWriter:
  """Appends scalars to ``metrics.jsonl`` and TensorBoard on process 0."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: float(v) for k, v in scalars.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    for k, v in row.items():
      if k != 'step' and math.isfinite(v):
        self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, step: int) -> None:
  """Drops rows after ``step`` (a resumed run rewrites them)."""
  rows = read_metrics(workdir)
  if rows and rows[-1]['step'] > step:
    path = os.path.join(workdir, METRICS_FILE)
    with open(path + '.tmp', 'w') as f:
      for row in rows:
        if row['step'] <= step:
          f.write(json.dumps(row) + '\n')
    os.replace(path + '.tmp', path)


def plot(workdir: str) -> list:
  """PNG plots of loss, learning rate and zero-shot accuracy; their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  rows = read_metrics(workdir)
  series = {}
  for row in rows:
    for k, v in row.items():
      if k != 'step':
        series.setdefault(k, ([], []))
        series[k][0].append(row['step'])
        series[k][1].append(v)
  panels = [('loss', ['train/loss']), ('learning_rate', ['train/lr'])]
  accuracy = sorted(k for k in series if k.startswith('zero_shot/') and k.endswith('/aca'))
  if accuracy:
    panels.append(('zero_shot_accuracy', accuracy))
  written = []
  for name, keys in panels:
    keys = [k for k in keys if k in series]
    if not keys:
      continue
    fig = Figure(figsize=(6, 3.5), dpi=110)
    ax = fig.add_subplot()
    for k in keys:
      steps, values = series[k]
      ax.plot(steps, values, marker='o' if len(steps) < 30 else None, label=k)
    ax.set_xlabel('step')
    ax.set_title(name.replace('_', ' '))
    ax.grid(alpha=0.3)
    if len(keys) > 1 or name == 'zero_shot_accuracy':
      ax.legend(fontsize=8)
    if name == 'zero_shot_accuracy':
      ax.set_ylim(0, 1)
    fig.tight_layout()
    path = os.path.join(workdir, f'{name}.png')
    fig.savefig(path)
    written.append(path)
  return written


def interval_summary(history: list) -> dict:
  """Means of per-step host metrics over a logging interval."""
  keys = history[0].keys()
  return {k: float(np.mean([h[k] for h in history])) for k in keys}
