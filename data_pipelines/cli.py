"""``python -m data_pipelines build NAME --data-dir DIR [options]``.

Options are the builder's config fields (``python -m data_pipelines options
NAME`` lists them with their defaults), e.g.::

  python -m data_pipelines build fundus_synthetic --data-dir ~/tfds --canvas 128
  python -m data_pipelines build fundus_assembly --data-dir ~/tfds \\
      --dataframes_dir local_data/dataframes/pretraining --data_root /data/FUNDUS
"""

from __future__ import annotations

import argparse
import inspect
import json
from typing import Sequence

from data_pipelines import build as build_lib
from data_pipelines import console
from data_pipelines.builders import BUILDERS

_COMMANDS = ('build', 'options')
_SHARED_HELP = {
    'canvas': 'longest image side in pixels',
    'image_format': 'png or jpeg',
    'jpeg_quality': 'JPEG quality 1..100 (image_format jpeg)',
    'max_skipped_fraction': 'fail when more examples than this are bad',
    'num_workers': 'worker processes (0: in this process)',
    'n_train': 'training images',
    'n_test': 'test images',
    'seed': 'random seed of the images',
}


def _field_help(config_cls) -> dict:
  """Field -> help, from the ``Attributes:`` sections of the config docstrings
  (``a, b: text`` documents both), falling back on ``_SHARED_HELP``."""
  helps = dict(_SHARED_HELP)
  for cls in reversed(config_cls.__mro__):
    section, names = False, []
    for line in inspect.cleandoc(cls.__dict__.get('__doc__') or '').splitlines():
      if not line.startswith(' '):
        section = line.strip() == 'Attributes:'
      elif section and ':' in line and not line.startswith('   '):
        head, text = line.split(':', 1)
        names = [n.strip() for n in head.split(',')]
        helps.update({n: text.strip() for n in names})
      elif section and names:
        helps.update({n: f'{helps[n]} {line.strip()}' for n in names})
  return {k: v.rstrip('.') for k, v in helps.items()}


def _option_parser(name: str) -> console.ArgumentParser:
  parser = console.ArgumentParser(prog=f'python -m data_pipelines build {name}',
                                  description=f'Builds {name} once; its options:')
  parser.add_argument('--data-dir', '--data_dir', dest='data_dir', required=True,
                      help='TFDS data folder to build into')
  parser.add_argument('--config_name', default=None,
                      help='folder name of this build (default: from the options)')
  console.add_bool_flag(parser, '--json', help='print the full report as JSON')
  console.add_bool_flag(parser, '--quiet', help='no progress bars')
  console.add_verbose_flag(parser)
  helps = _field_help(BUILDERS[name][1])
  for field, default in build_lib.options(name).items():
    flags = [f'--{field}'] + ([f'--{field.replace("_", "-")}'] if '_' in field else [])
    text = helps.get(field, '')
    kwargs = {'dest': field, 'default': argparse.SUPPRESS,
              'help': f'{text} (default: {default!r})' if text else f'default: {default!r}'}
    if isinstance(default, bool):
      console.add_bool_flag(parser, *flags, **kwargs)
      continue
    if isinstance(default, tuple):
      kwargs['nargs'] = '*'
    elif isinstance(default, (int, float)):
      kwargs['type'] = type(default)
    parser.add_argument(*flags, **kwargs)
  return parser


def _top_parser() -> console.ArgumentParser:
  top = console.ArgumentParser(
      prog='python -m data_pipelines', description=__doc__.split('\n')[0],
      epilog='python -m data_pipelines build NAME --help lists the options of builder NAME.')
  top.add_argument('command', choices=_COMMANDS,
                   help='build: build dataset NAME once; options: list its options')
  top.add_argument('name', choices=sorted(BUILDERS), help='the builder')
  return top


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m data_pipelines``; returns the exit status (see ``console.run``)."""
  # Option checks and the dataframes a build reads raise ValueError.
  return console.run(_main, argv, expected=(ValueError,))


def _main(argv: list[str]) -> int:
  top = _top_parser()
  if len(argv) >= 2 and not any(a.startswith('-') for a in argv[:2]):
    args, rest = top.parse_args(argv[:2]), argv[2:]  # NAME's --help lists NAME's options
  else:
    args, rest = top.parse_known_args(argv)
  if args.command == 'options':
    for field, default in build_lib.options(args.name).items():
      print(f'--{field} (default {default!r})')
    return 0
  opts = vars(_option_parser(args.name).parse_args(rest))
  if opts.pop('quiet'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
  data_dir, config_name = opts.pop('data_dir'), opts.pop('config_name')
  as_json = opts.pop('json')
  opts.pop('verbose')
  report = build_lib.build(args.name, data_dir, config_name=config_name, **opts)
  if as_json:
    print(json.dumps(report, indent=2))
  return 0
