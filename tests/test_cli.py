"""The command lines: builder options in --help, expected errors in one line
with exit 2 (a traceback only with --verbose), bugs with a traceback and
exit 1, and no third-party start-up noise."""

import logging
import subprocess
import sys

import pytest

from data_pipelines import console
from tests.conftest import REPO, subprocess_env

TINY = str(REPO / 'configs' / 'demo.py') + ':tiny'
NOISE = ('Downloading and preparing', 'has no dataset_info.json', 'PyTorch was not found',
         'Unable to initialize backend', 'Using custom data configuration')


def _run(*args, timeout=300):
  return subprocess.run([sys.executable, *args], env=subprocess_env(1), capture_output=True, text=True,
                        timeout=timeout, cwd=REPO)


def _assert_one_error_line(result):
  """Exit 2, stderr ends with one 'error:' line and holds no traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith('error: '), result.stderr[-3000:]
  assert sum(line.startswith('error:') for line in lines) == 1
  assert 'Traceback' not in result.stderr
  return lines[-1]


def test_build_help_lists_the_builders_options_with_defaults():
  result = _run('-m', 'data_pipelines', 'build', 'fundus_synthetic', '--help')
  assert result.returncode == 0, result.stderr
  text = ' '.join(result.stdout.split())  # the same however argparse wraps it
  assert '--canvas CANVAS longest image side in pixels (default: 512)' in text
  assert '--n_train N_TRAIN, --n-train N_TRAIN training images (default: 2000)' in text
  for option in ('--image_format', '--data-dir', '--verbose'):
    assert option in text


def test_build_prints_no_third_party_noise(tmp_path):
  result = _run('-m', 'data_pipelines', 'build', 'fundus_synthetic', '--data-dir', str(tmp_path),
                '--n_train', '8', '--n_test', '4', '--canvas', '16')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'kept 12 of 12' in result.stdout
  for noise in NOISE:
    assert noise not in result.stdout + result.stderr, noise


def test_bad_build_option_is_one_line_and_verbose_adds_the_traceback(tmp_path):
  args = ('-m', 'data_pipelines', 'build', 'fundus_synthetic', '--data-dir', str(tmp_path),
          '--canvas', '3')
  line = _assert_one_error_line(_run(*args))
  assert line == 'error: canvas 3; expected 8..8192 pixels'
  verbose = _run(*args, '--verbose')
  assert verbose.returncode == 2
  assert 'Traceback (most recent call last)' in verbose.stderr
  assert verbose.stderr.strip().splitlines()[-1] == line


def test_unbuilt_data_path_is_one_line_that_says_how_to_build_it(tmp_path):
  result = _run('-m', 'flair_jax.train', '--config', TINY, '--config.data.path=/nonexistent',
                '--workdir', str(tmp_path))
  line = _assert_one_error_line(result)
  assert 'python -m data_pipelines build fundus_synthetic' in line
  for noise in NOISE:
    assert noise not in result.stderr, noise


def test_config_typo_is_one_line_naming_the_closest_key(tmp_path):
  result = _run('-m', 'flair_jax.train', '--config', TINY, '--config.train.bach_size=8',
                '--workdir', str(tmp_path))
  assert _assert_one_error_line(result) == (
      'error: config has no key \'bach_size\'; Did you mean "batch_size" instead of '
      '"bach_size"?')


def test_a_warm_up_as_long_as_the_run_is_one_line(tmp_path):
  result = _run('-m', 'flair_jax.train', '--config', TINY, '--config.train.epochs=1',
                '--config.train.warmup_epochs=1', '--workdir', str(tmp_path))
  line = _assert_one_error_line(result)
  assert line.startswith('error: train.warmup_epochs 1 must be at least 0 and less than '
                         'train.epochs 1')


def test_convert_of_a_missing_checkpoint_is_one_line(tmp_path):
  result = _run('-m', 'flair_jax.convert', 'to-torch', '--checkpoint', '/nonexistent',
                '--out', str(tmp_path / 'x'))
  assert _assert_one_error_line(result) == 'error: checkpoint /nonexistent does not exist'
  assert not (tmp_path / 'x').exists()


def test_evaluate_of_a_missing_checkpoint_is_one_line():
  result = _run('-m', 'flair_jax.evaluate', '--checkpoint', '/nonexistent', '--data',
                '/nonexistent')
  assert _assert_one_error_line(result).startswith('error: checkpoint /nonexistent does not exist')


def test_transformers_without_torch_says_nothing():
  code = ('import sys; sys.modules["torch"] = None\n'
          'from data_pipelines import console; console.quiet_third_party()\n'
          'import transformers; transformers.logging.get_logger("x").warning("kept")')
  result = _run('-c', code)
  assert result.returncode == 0, result.stderr
  assert 'PyTorch was not found' not in result.stderr
  assert 'kept' in result.stderr


@pytest.mark.parametrize('logger, message, shown', [
    ('jax._src.xla_bridge', "Unable to initialize backend 'tpu': INTERNAL: Failed to open "
     'libtpu.so: libtpu.so: cannot open shared object file', False),
    ('jax._src.xla_bridge', "Unable to initialize backend 'cuda': no CUDA-capable device", True),
    ('jax._src.xla_bridge', 'An NVIDIA GPU may be present on this machine, but a CUDA-enabled '
     'jaxlib is not installed. Falling back to cpu.', True),
    ('absl', 'Using custom data configuration: SyntheticConfig(...)', False),
    ('absl', 'Variant folder /d/x/1.0.0 has no dataset_info.json', False),
    ('absl', 'Variant folder /d/x/1.0.0 has invalid version 1.0.x', True),
    ('transformers', "PyTorch was not found. Models won't be available", False),
    ('transformers', 'Some weights of BertModel were not initialized', True),
    ('flair_jax.training.loop', 'PyTorch was not found. Models ...', True),
])
def test_quiet_third_party_drops_exactly_the_noise(logger, message, shown):
  console.quiet_third_party()
  console.quiet_third_party()  # idempotent
  log, records = logging.getLogger(logger), []
  handler = logging.Handler()
  handler.emit = records.append  # after the logger's filters, whatever propagates
  log.addHandler(handler)
  try:
    log.warning(message)
  finally:
    log.removeHandler(handler)
  assert bool(records) == shown


@pytest.mark.parametrize('error, status, shown', [
    (console.UserError('no data.\n  build it with\n  python -m x\nthen retry'), 2,
     'error: no data. build it with python -m x; then retry'),
    (FileNotFoundError('checkpoint /x does not exist'), 2,
     'error: checkpoint /x does not exist'),
    (ValueError('not expected here'), 1, 'Traceback'),
    (KeyboardInterrupt(), 130, 'interrupted'),
])
def test_run_turns_exceptions_into_exit_status(error, status, shown, capsys):
  def command(argv):
    del argv
    raise error
  assert console.run(command, []) == status
  err = capsys.readouterr().err
  assert shown in err
  assert ('Traceback' in err) == (status == 1)


def test_run_with_verbose_shows_the_traceback_and_extra_expected_types(capsys):
  def command(argv):
    raise ValueError(f'bad {argv}')
  assert console.run(command, ['--verbose'], expected=(ValueError,)) == 2
  err = capsys.readouterr().err
  assert 'Traceback' in err
  assert err.strip().splitlines()[-1] == "error: bad ['--verbose']"


def test_one_line_keeps_only_the_last_line_of_a_quoted_traceback():
  text = ('flag --config=c.py:x: Error whilst parsing config file:\n\n'
          '  Traceback (most recent call last):\n    File "c.py", line 3\n'
          "  ValueError: unknown variant 'x'\n")
  assert console.one_line(text) == (
      "flag --config=c.py:x: Error whilst parsing config file: ValueError: unknown variant 'x'")


def test_argument_parser_errors_are_one_line_exit_2(capsys):
  parser = console.ArgumentParser(prog='prog')
  parser.add_argument('--n', type=int)
  with pytest.raises(SystemExit) as exit_info:
    parser.parse_args(['--n', 'x'])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == (
      "error: argument --n: invalid int value: 'x' (see prog --help)\n")


BOOL_FORMS = [([], False), (['--x'], True), (['--x=true'], True), (['--x=False'], False),
              (['--x', 'no'], False), (['--x', '1'], True), (['--no-x'], False), (['--nox'], False),
              (['--x', '--nox'], False), (['--nox', '--x=yes'], True)]


@pytest.mark.parametrize('argv, value', BOOL_FORMS)
def test_bool_flags_take_the_argparse_and_absl_forms(argv, value):
  parser = console.ArgumentParser(prog='prog')
  console.add_bool_flag(parser, '--x')
  assert parser.parse_args(argv).x is value


@pytest.mark.parametrize('argv, value', [([a.replace('x', 'verbose') for a in argv], value)
                                         for argv, value in BOOL_FORMS])
def test_run_reads_verbose_as_the_parser_does(argv, value):
  parser = console.ArgumentParser(prog='prog')
  console.add_verbose_flag(parser)
  assert parser.parse_args(argv).verbose is value
  assert console.wants_traceback(argv) is value


@pytest.mark.parametrize('argv, message', [
    (['--x=maybe'], "error: argument --x: expected true or false, got 'maybe' (see prog --help)"),
    (['--no-x=true'], 'error: argument --no-x: takes no value (see prog --help)'),
])
def test_a_bad_bool_flag_is_one_line_exit_2(argv, message, capsys):
  parser = console.ArgumentParser(prog='prog')
  console.add_bool_flag(parser, '--x')
  with pytest.raises(SystemExit) as exit_info:
    parser.parse_args(argv)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == message + '\n'


def test_builder_bool_options_take_every_spelling():
  from data_pipelines import cli  # pylint: disable=g-import-not-at-top
  parser = cli._option_parser('fundus_classification')  # pylint: disable=protected-access
  args = parser.parse_args(['--data-dir', 'd', '--synthetic', '--crop-foreground', 'false',
                            '--jpeg_draft=true', '--quiet'])
  assert (args.synthetic, args.crop_foreground, args.jpeg_draft, args.quiet) == (
      True, False, True, True)
  assert not hasattr(parser.parse_args(['--data-dir', 'd']), 'synthetic')  # the config's default


def test_train_takes_absl_spellings_of_its_own_flags(tmp_path):
  result = _run('-m', 'flair_jax.train', '--noverbose', '--config', TINY,
                '--config.train.bach_size=8', '--workdir=' + str(tmp_path), '--verbose=false')
  assert _assert_one_error_line(result).startswith("error: config has no key 'bach_size'")
