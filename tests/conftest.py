"""Shared test fixtures: paths to the test data in tests/data, and the
environment of the command lines the tests start as child processes."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = REPO / 'tests' / 'data'
FUNDUS = DATA / 'fundus'
_SESSION = {}


@pytest.fixture(scope='session')
def fundus_dir():
  return FUNDUS


@pytest.fixture(scope='session', autouse=True)
def _compilation_cache(tmp_path_factory):
  _SESSION['xla_cache'] = str(tmp_path_factory.mktemp('xla_cache'))


def subprocess_env(devices: int) -> dict:
  """The environment of a child ``python -m ...``: this checkout first on the
  path, ``devices`` CPU devices, and JAX's persistent compilation cache in a
  folder shared by the session's children, so that the many runs of one
  config compile its programs once (a cached executable is the same program:
  its results are bitwise those of a fresh compile)."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
  if 'xla_cache' in _SESSION:
    env['JAX_COMPILATION_CACHE_DIR'] = _SESSION['xla_cache']
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  return env
