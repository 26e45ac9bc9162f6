"""``python -m data_pipelines build NAME --data-dir DIR [options]``.

Options are the builder's config fields (``python -m data_pipelines options
NAME`` lists them with their defaults), e.g.::

  python -m data_pipelines build fundus_synthetic --data-dir ~/tfds --canvas 128
  python -m data_pipelines build fundus_assembly --data-dir ~/tfds \\
      --dataframes_dir local_data/dataframes/pretraining --data_root /data/FUNDUS
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from data_pipelines import build as build_lib
from data_pipelines.builders import BUILDERS, BuildError

_SHARED_HELP = {
    'canvas': 'longest image side in pixels',
    'image_format': 'png or jpeg',
    'max_skipped_fraction': 'fail when more examples than this are bad',
    'num_workers': 'worker processes (0: in this process)',
}


def _option_parser(name: str) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=f'python -m data_pipelines build {name}')
  parser.add_argument('--data-dir', '--data_dir', dest='data_dir', required=True,
                      help='TFDS data folder to build into')
  parser.add_argument('--config_name', default=None,
                      help='folder name of this build (default: from the options)')
  parser.add_argument('--json', action='store_true', help='print the full report as JSON')
  parser.add_argument('--quiet', action='store_true', help='no progress bars')
  for field, default in build_lib.options(name).items():
    flags = [f'--{field}'] + ([f'--{field.replace("_", "-")}'] if '_' in field else [])
    kwargs = {'dest': field, 'default': argparse.SUPPRESS,
              'help': f'{_SHARED_HELP.get(field, "")} (default: {default!r})'}
    if isinstance(default, bool):
      kwargs['action'] = argparse.BooleanOptionalAction
    elif isinstance(default, tuple):
      kwargs['nargs'] = '*'
    elif isinstance(default, (int, float)):
      kwargs['type'] = type(default)
    parser.add_argument(*flags, **kwargs)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  top = argparse.ArgumentParser(prog='python -m data_pipelines',
                                description=__doc__.split('\n')[0])
  top.add_argument('command', choices=('build', 'options'))
  top.add_argument('name', choices=sorted(BUILDERS))
  args, rest = top.parse_known_args(argv)
  if args.command == 'options':
    for field, default in build_lib.options(args.name).items():
      print(f'--{field} (default {default!r})')
    return 0
  opts = vars(_option_parser(args.name).parse_args(rest))
  if opts.get('quiet'):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()
  data_dir, config_name = opts.pop('data_dir'), opts.pop('config_name')
  as_json, quiet = opts.pop('json'), opts.pop('quiet')
  try:
    report = build_lib.build(args.name, data_dir, config_name=config_name, **opts)
  except BuildError as e:
    print(f'build failed: {e}', file=sys.stderr)
    return 1
  except (ValueError, TypeError) as e:
    print(f'bad options: {e}', file=sys.stderr)
    return 2
  if as_json:
    print(json.dumps(report, indent=2))
  return 0
