"""Expert-knowledge dictionaries: category name -> clinical descriptions.

Two dictionaries ship with the package: ``'flair_repo'`` (109 categories, the
one the released FLAIR weights were trained with; the default) and
``'seed'`` (36 categories, the version in the FLAIR slides).
"""

from __future__ import annotations

import importlib.resources
import json
import os
from typing import Mapping

DICTIONARIES = ('flair_repo', 'seed')
DEFAULT_DICTIONARY = 'flair_repo'

# Datasets whose captions are never rewritten with expert knowledge. The names
# are PyTorch FLAIR's, kept verbatim: its pre-training list calls ODIR
# '08_ODIR', so '08_ODIR-5K' matches nothing there and ODIR captions are
# rewritten; parity keeps that quirk.
SKIP_DATASETS = ('06_EYENET', '11_STARE', '08_ODIR-5K', '31_JICHI')

Knowledge = Mapping[str, tuple[str, ...]]


def _validated(raw, origin: str) -> dict[str, tuple[str, ...]]:
  if not isinstance(raw, dict):
    raise ValueError(f'{origin}: expected a JSON object mapping category -> list of '
                     f'descriptions, got {type(raw).__name__}')
  knowledge = {}
  for category, descriptions in raw.items():
    if not (isinstance(descriptions, list) and all(isinstance(d, str) for d in descriptions)):
      raise ValueError(f'{origin}: descriptions of {category!r} must be a list of strings, '
                       f'got {descriptions!r}')
    knowledge[category] = tuple(descriptions)
  return knowledge


def load_knowledge(name_or_path: str | os.PathLike = DEFAULT_DICTIONARY
                   ) -> dict[str, tuple[str, ...]]:
  """Loads an expert-knowledge dictionary.

  Args:
    name_or_path: a shipped dictionary's name (one of ``DICTIONARIES``) or
      the path of a JSON file ``{category: [description, ...]}``.
  Returns:
    ``{category: (description, ...)}``, in the file's order.
  """
  if isinstance(name_or_path, str) and name_or_path in DICTIONARIES:
    resource = importlib.resources.files('data_pipelines') / 'resources' / (
        f'expert_knowledge_{name_or_path}.json')
    return _validated(json.loads(resource.read_text(encoding='utf-8')), str(resource))
  path = os.fspath(name_or_path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'expert-knowledge dictionary {path!r} is neither one of the '
                            f'shipped names {DICTIONARIES} nor an existing JSON file')
  with open(path, encoding='utf-8') as f:
    return _validated(json.load(f), path)
