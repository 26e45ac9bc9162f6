"""``python -m flair_jax.convert``: flair_jax checkpoints <-> PyTorch FLAIR.

  to-torch --checkpoint PATH --out DIR [--format hf|pth|both]
           [--bert-type NAME_OR_PATH] [--bundle-text-encoder]
  from-torch --input PATH --out DIR [--bert-type NAME_OR_PATH]
"""

from __future__ import annotations

import logging
import sys

from data_pipelines import console
from flair_jax.convert.flair_torch import FORMATS, export_to_torch, import_from_torch


def parse_args(argv):
  parser = console.ArgumentParser(prog='python -m flair_jax.convert', description=__doc__)
  sub = parser.add_subparsers(dest='command', required=True)
  to = sub.add_parser('to-torch', help='flair_jax checkpoint -> PyTorch FLAIR')
  console.add_verbose_flag(to)
  to.add_argument('--checkpoint', required=True,
                  help='model folder, step folder or training workdir (its latest step)')
  to.add_argument('--out', required=True, help='new output folder')
  to.add_argument('--format', default='hf', choices=FORMATS,
                  help='hf: model.safetensors + config.json; pth: flair.pth; both')
  to.add_argument('--bert-type', default=None,
                  help="text tower name or folder written to config.json "
                  "(default: the checkpoint's)")
  console.add_bool_flag(to, '--bundle-text-encoder',
                        help='add DIR/text_encoder/ (BERT config, tokenizer, weights) '
                        'and point bert_type at it')
  frm = sub.add_parser('from-torch', help='PyTorch FLAIR -> flair_jax checkpoint')
  console.add_verbose_flag(frm)
  frm.add_argument('--input', required=True,
                   help='FLAIR .pth state dict, or a folder with config.json + model.safetensors')
  frm.add_argument('--out', required=True, help='new flair_jax model folder')
  frm.add_argument('--bert-type', default=None,
                   help="text tower folder or hub id (default: the input's config.json)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  """Runs one conversion; returns the exit status (see ``console.run``)."""
  # A checkpoint, state dict or text tower that does not fit raises ValueError.
  return console.run(_main, argv, expected=(ValueError,))


def _main(argv) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
  logging.getLogger('absl').setLevel(logging.WARNING)  # orbax's INFO lines
  if args.command == 'to-torch':
    out = export_to_torch(args.checkpoint, args.out, args.format, args.bert_type,
                          args.bundle_text_encoder)
  else:
    out = import_from_torch(args.input, args.out, args.bert_type)
  print(out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
