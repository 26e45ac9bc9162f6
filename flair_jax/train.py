"""FLAIR pre-training: ``python -m flair_jax.train [--config FILE[:variant]]``.

With no flags it runs the built-in demo (``configs/demo.py``): it builds a
synthetic fundus set, trains small towers on the CPU, evaluates zero-shot,
exports a PyTorch FLAIR folder and plots the run. Override any config key
with ``--config.train.batch_size=256``; a typo names the closest key.
"""

import importlib.resources
import json
import logging
import os

from absl import app
from absl import flags
from ml_collections import config_flags

_DEMO = str(importlib.resources.files('configs') / 'demo.py')
_CONFIG = config_flags.DEFINE_config_file('config', _DEMO, 'Training config file[:variant].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (default: runs/<config name>).')


def _config_name(path: str) -> str:
  file, _, variant = path.partition(':')
  name = os.path.splitext(os.path.basename(file))[0]
  return f'{name}_{variant}' if variant else name


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  from flair_jax import trainer  # pylint: disable=g-import-not-at-top  # after flags

  workdir = _WORKDIR.value or os.path.join('runs', _config_name(flags.FLAGS['config'].config_filename))
  summary = trainer.train_and_evaluate(_CONFIG.value, workdir)
  print(json.dumps(summary, indent=2, default=str))
  _print_where(summary)


def _print_where(summary):
  """A short human-readable list of what the run left behind."""
  wd = summary['workdir']
  lines = ['', f'run folder: {wd}',
           f'  checkpoints:  {os.path.join(wd, "checkpoints")}',
           f'  metrics:      {os.path.join(wd, "metrics.jsonl")} (TensorBoard: {wd}/tensorboard)']
  for name, value in sorted(summary.get('results', {}).items()):
    lines.append(f'  {name}: {value:.4f}')
  if summary.get('export'):
    lines.append(f'  PyTorch FLAIR export: {summary["export"]}')
  for plot in summary.get('plots', []):
    lines.append(f'  plot: {plot}')
  if 'stopped_at' in summary:
    lines.append(f'  stopped at step {summary["stopped_at"]}; run the same command to resume')
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
