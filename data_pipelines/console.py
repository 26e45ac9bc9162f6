"""What every command line of the project shares: expected errors in one
line, and third-party start-up noise kept off the terminal.

``data_pipelines`` is the lowest layer, so ``flair_jax``'s entry points use
this module too. An entry point's ``main(argv)`` returns
``run(command, argv)``; ``run`` quiets third-party start-up messages, then
runs ``command(argv)`` and turns what it raises into an exit status:

* an expected error (:class:`UserError` and its subclasses, a path that is
  missing, already there, of the wrong kind or not ours to touch) prints
  ``error: <message>`` on one line and exits 2; with ``--verbose`` its
  traceback comes first;
* anything else is a bug: its traceback, exit 1;
* Ctrl-C: one line, exit 130.

Flag errors (:class:`ArgumentParser`, :func:`usage_error`) are one line and
exit 2 too. Every bool flag is made by :func:`add_bool_flag`, so all of them
take the same forms (``--x``, ``--x=false``, ``--no-x``, absl's ``--nox``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
from typing import Callable, NoReturn, Sequence

EXIT_OK, EXIT_BUG, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130

# Failures of paths the user named: missing, there already, of the wrong kind,
# or not ours to touch.
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
                PermissionError)
_TRACEBACK = 'Traceback (most recent call last):'


class UserError(Exception):
  """An expected failure the user can fix (bad input, missing data, a wrong
  flag). Command lines print its message on one line and exit 2; subclass it
  together with the builtin that fits (``class X(UserError, ValueError)``)."""


class UsageError(UserError):
  """A wrong flag, option or argument on the command line."""


def one_line(text: str) -> str:
  """``text`` on one line, for ``error: ...``.

  An indented line, or one after '.', ':', ';' or ',', continues the line
  before it; other line breaks become '; '. A traceback quoted in the text
  (absl's flag errors quote the config file's) shrinks to its last line.
  """
  head, found, tail = text.partition(_TRACEBACK)
  if found:
    last = [line for line in tail.splitlines() if line.strip()][-1:]
    text = head + ''.join(last)
  out = ''
  for line in text.splitlines():
    piece = line.strip()
    if not piece:
      continue
    if not out:
      out = piece
    elif line[0].isspace() or out[-1] in '.:;,':
      out += ' ' + piece
    else:
      out += '; ' + piece
  return out


def usage_error(message: str) -> NoReturn:
  """Prints ``error: <message>`` on one line and exits 2."""
  print(f'error: {one_line(message)}', file=sys.stderr)
  sys.exit(EXIT_USER_ERROR)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Descriptions as written; a bool flag shown as ``--x [BOOL], --no-x``."""

  def _format_action_invocation(self, action: argparse.Action) -> str:
    if isinstance(action, _BoolFlag):
      return ', '.join([f'{name} [BOOL]' for name in action.positive] + action.shown_negative)
    return super()._format_action_invocation(action)


class ArgumentParser(argparse.ArgumentParser):
  """An ``argparse.ArgumentParser`` whose usage errors are one line, exit 2."""

  def __init__(self, *args, **kwargs):
    kwargs.setdefault('formatter_class', HelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message: str) -> NoReturn:
    usage_error(f'{message} (see {self.prog} --help)')


# The words a bool flag's value may be, in any case (absl's and argparse's
# usual spellings both).
_TRUE = ('1', 'true', 't', 'yes', 'y', 'on')
_FALSE = ('0', 'false', 'f', 'no', 'n', 'off')


def parse_bool(text: str) -> bool:
  """``'true'``/``'false'`` and their usual spellings (see ``_TRUE``, ``_FALSE``)."""
  word = text.strip().lower()
  if word in _TRUE:
    return True
  if word in _FALSE:
    return False
  raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')


class _BoolFlag(argparse.Action):
  """A bool flag ``--x``: ``--x`` and ``--x=BOOL`` / ``--x BOOL`` set it,
  ``--no-x`` and absl's ``--nox`` clear it."""

  def __init__(self, option_strings, dest, default=False, required=False, help=None):  # pylint: disable=redefined-builtin
    names = [s[2:] for s in option_strings if s.startswith('--')]
    self.positive = list(option_strings)
    self.shown_negative = [f'--no-{name}' for name in names]
    self.negative = self.shown_negative + [f'--no{name}' for name in names]
    super().__init__(self.positive + self.negative, dest, nargs='?', const=None,
                     default=default, required=required, help=help, metavar='BOOL')

  def __call__(self, parser, namespace, values, option_string=None):
    # Parsed here rather than by ``type`` so that an error names the one
    # spelling typed, not all six.
    if option_string in self.negative:
      if values is not None:
        parser.error(f'argument {option_string}: takes no value')
      value = False
    else:
      try:
        value = True if values is None else parse_bool(values)
      except argparse.ArgumentTypeError as e:
        parser.error(f'argument {option_string}: {e}')
    setattr(namespace, self.dest, value)


def add_bool_flag(parser: argparse.ArgumentParser, *names: str, default=False,
                  help: str = '', **kwargs) -> argparse.Action:  # pylint: disable=redefined-builtin
  """Adds a bool flag (``--x``, ``--x=BOOL``, ``--x BOOL``, ``--no-x``, ``--nox``).

  Args:
    parser: the parser to add it to.
    *names: its option strings, e.g. ``'--crop-foreground'``.
    default: its value when absent (``argparse.SUPPRESS``: no attribute).
    help: its help text.
    **kwargs: more ``add_argument`` keywords (``dest``, ``required``).
  Returns:
    The action.
  """
  return parser.add_argument(*names, action=_BoolFlag, default=default, help=help, **kwargs)


VERBOSE = '--verbose'


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
  """Adds ``--verbose``, the switch :func:`run` reads."""
  add_bool_flag(parser, VERBOSE, help='show the traceback of an expected error too')


def wants_traceback(argv: Sequence[str]) -> bool:
  """Whether ``argv`` turns ``--verbose`` on (its last say before ``--``).

  Read from the raw arguments so that it holds wherever the command fails;
  knows every form :func:`add_bool_flag` accepts.
  """
  argv = list(argv)
  argv = argv[:argv.index('--')] if '--' in argv else argv
  verbose = False
  for i, arg in enumerate(argv):
    name, has_value, value = arg.partition('=')
    if name == VERBOSE:
      if not has_value:  # '--verbose' alone, or with its value as the next word
        following = argv[i + 1].strip().lower() if i + 1 < len(argv) else ''
        value = following if following in _TRUE + _FALSE else 'true'
      verbose = value.strip().lower() in _TRUE
    elif arg in (f'--no-{VERBOSE[2:]}', f'--no{VERBOSE[2:]}'):
      verbose = False
  return verbose


def run(command: Callable[[list[str]], object], argv: Sequence[str] | None = None, *,
        expected: tuple[type[BaseException], ...] = ()) -> int:
  """Runs ``command(argv)`` as a command line and returns its exit status.

  Args:
    command: parses ``argv`` (flags only, no program name) and does the work;
      an int it returns is the exit status, anything else means 0.
    argv: default ``sys.argv[1:]``.
    expected: exception types this command's input checks raise besides the
      shared ones (e.g. ``ValueError`` where the inputs are files and options).
  Returns:
    0 (or what ``command`` returned), 2 after an expected error, 1 after a bug,
    130 after Ctrl-C. A ``SystemExit`` (``--help``, a flag error) passes through.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  quiet_third_party()
  try:
    status = command(argv)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    return EXIT_INTERRUPTED
  except (UserError, *_PATH_ERRORS, *expected) as e:
    if wants_traceback(argv):
      traceback.print_exc()
    print(f'error: {one_line(str(e)) or type(e).__name__}', file=sys.stderr)
    return EXIT_USER_ERROR
  except Exception:  # pylint: disable=broad-except  # a bug: show where
    traceback.print_exc()
    return EXIT_BUG
  return status if isinstance(status, int) else EXIT_OK


# Start-up messages that tell a user nothing they can act on, by the logger that
# emits them; each pattern must match the start of the formatted message. A
# pattern that stops matching (a new library version) lets its message through.
_NOISE = {
    # JAX probing for a TPU library on a machine that has none (INFO). A TPU
    # that is there but fails still says so.
    'jax._src.xla_bridge': (r"Unable to initialize backend 'tpu': .*libtpu\.so",),
    # TFDS, through absl logging: every build of a config made from options,
    # and its look at the version folder the build is about to fill.
    'absl': (r'Using custom data configuration: ',
             r'Variant folder .* has no dataset_info\.json$'),
    # transformers without torch (optional here: the towers are ours).
    'transformers': (r'PyTorch was not found\. ',),
}


class _DropNoise(logging.Filter):
  """Drops the records whose message starts with one of ``patterns``."""

  def __init__(self, patterns: Sequence[str]):
    super().__init__()
    self._noise = re.compile('|'.join(f'(?:{p})' for p in patterns))

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      return not self._noise.match(record.getMessage())
    except Exception:  # pylint: disable=broad-except  # a malformed record is not ours to judge
      return True


def quiet_third_party() -> None:
  """Keeps third-party start-up noise off the terminal (idempotent).

  Drops exactly the messages in ``_NOISE`` (TFDS's download banners are
  switched off by the builders themselves).
  Warnings of our own, of JAX, TFDS and transformers otherwise all show.
  Call it before JAX starts a backend, a TFDS build runs or transformers is
  imported. JAX itself sets ``TF_CPP_MIN_LOG_LEVEL=1`` (no C++ INFO lines).
  """
  # Imported first so that logger 'absl' is absl's own (TFDS logs through it).
  from absl import logging as _  # pylint: disable=g-import-not-at-top,unused-import
  for name, patterns in _NOISE.items():
    logger = logging.getLogger(name)
    if not any(isinstance(f, _DropNoise) for f in logger.filters):
      logger.addFilter(_DropNoise(patterns))


