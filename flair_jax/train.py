"""FLAIR pre-training: ``python -m flair_jax.train [--config FILE[:variant]]``.

With no flags it runs the built-in demo (``configs/demo.py``): it builds a
synthetic fundus set, trains small towers on the CPU, evaluates zero-shot,
exports a PyTorch FLAIR folder and plots the run. Override any config key
with ``--config.train.batch_size=256``; a typo names the closest key.
Exit status: 0, 2 after an expected error (one line; ``--verbose`` adds its
traceback), 1 after a bug.
"""

import importlib.resources
import json
import logging
import os
import sys
import textwrap

from absl import app
from absl import flags
from ml_collections import config_flags

from data_pipelines import console

_DEMO = str(importlib.resources.files('configs') / 'demo.py')
# The config flags are absl's (ml_collections reads ``--config FILE:variant``
# and ``--config.KEY=VALUE`` overrides); the others parse as in every CLI.


def _no_such_key(e: BaseException):
  """Exits with one line naming the override's missing key and the closest one."""
  cause = e
  while cause.args and isinstance(cause.args[0], BaseException):
    cause = cause.args[0]  # ml_collections wraps the KeyError that says 'Did you mean'.
  console.usage_error(f'config has no key {cause.args[0] if cause.args else cause}')


try:
  # Without --config, the default file is read here, with the overrides of sys.argv.
  _CONFIG = config_flags.DEFINE_config_file('config', _DEMO, 'Training config file[:variant].',
                                            lock_config=True)
except (KeyError, AttributeError) as error:  # An override names no config key.
  _no_such_key(error)
_CONFIG_HELP = """config flags:
  --config FILE[:variant]  training config file (default: configs/demo.py)
  --config.KEY=VALUE       override one config key, e.g. --config.train.batch_size=256"""


def _parser() -> console.ArgumentParser:
  # No abbreviations: a prefix such as --config.* must reach absl whole.
  parser = console.ArgumentParser(prog='python -m flair_jax.train', description=__doc__,
                                  epilog=_CONFIG_HELP, allow_abbrev=False)
  parser.add_argument('--workdir', help='run folder (default: runs/<config name>)')
  console.add_verbose_flag(parser)
  return parser


def _config_name(path: str) -> str:
  file, _, variant = path.partition(':')
  name = os.path.splitext(os.path.basename(file))[0]
  return f'{name}_{variant}' if variant else name


def _parse_flags(argv):
  """absl's flag parsing, each failure one ``error:`` line and exit 2."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is None:
      console.usage_error(f'{flags.FLAGS["config"].config_filename}: get_config() returned None')
    _CONFIG.value.get('train')  # A config file that failed to load raises only when read.
  except flags.Error as e:  # A bad value, an unknown flag, an error in the config file.
    console.usage_error(str(e))
  except (KeyError, AttributeError) as e:  # An override names no config key.
    _no_such_key(e)
  except OSError as e:  # The config file is missing or unreadable: its last line says why.
    console.usage_error(f'--config: {str(e).strip().splitlines()[-1].strip()}')
  return rest


def _main(argv, workdir):
  if len(argv) > 1:
    raise console.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)
  from flair_jax.training import loop as trainer  # pylint: disable=g-import-not-at-top  # after flags

  workdir = workdir or os.path.join('runs', _config_name(flags.FLAGS['config'].config_filename))
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
    files = ', '.join(summary['export_files'])
    lines.append(f'  PyTorch FLAIR export: {summary["export"]} ({files})')
    lines.append(textwrap.fill(summary['export_note'], 88, initial_indent='    ',
                               subsequent_indent='    '))
  for plot in summary.get('plots', []):
    lines.append(f'  plot: {plot}')
  if 'stopped_at' in summary:
    lines.append(f'  stopped at step {summary["stopped_at"]}; run the same command to resume')
  print('\n'.join(lines))


def _command(argv):
  """Our flags first; the rest (the config flags) goes to absl."""
  args, config_argv = _parser().parse_known_args(argv)
  return app.run(lambda rest: _main(rest, args.workdir), [sys.argv[0], *config_argv],
                 _parse_flags)


def main(argv=None) -> int:
  """``python -m flair_jax.train`` with ``argv`` (default ``sys.argv[1:]``)."""
  return console.run(_command, argv)


if __name__ == '__main__':
  sys.exit(main())
