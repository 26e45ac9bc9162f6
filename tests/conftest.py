"""Shared test fixtures: paths to ../shared and optional-dependency skips."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get('FLAIR_JAX_SHARED', REPO.parent / 'shared'))
FUNDUS = SHARED / 'data' / 'fundus'
REFERENCE = SHARED / 'reference'


@pytest.fixture(scope='session')
def shared_dir():
  if not SHARED.is_dir():
    pytest.skip(f'shared data folder {SHARED} not present')
  return SHARED


@pytest.fixture(scope='session')
def fundus_dir(shared_dir):
  return FUNDUS
