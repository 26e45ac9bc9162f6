"""FLAIR's pre-training captions, as pure functions of an explicit RNG.

``"A [ATR] fundus photograph of [CLS]"`` with one random attribute and one
random category of the image, then (unless the image's dataset is in the skip
list) the category replaced by one of its expert-knowledge descriptions. The
string operations are PyTorch FLAIR's exactly (``str.replace``, one pass of
``"  " -> " "``), so captions match character for character.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from data_pipelines.knowledge import SKIP_DATASETS

CAPTION_TEMPLATE = 'A [ATR] fundus photograph of [CLS]'  # pre-training captions
PROMPT_TEMPLATE = 'A fundus photograph of [CLS]'  # zero-shot prompts, FLAIRModel's caption


def fill(template: str, category: str, attribute: str = '') -> str:
  """``template`` with ``[CLS]`` and ``[ATR]`` replaced, as PyTorch FLAIR does
  (``str.replace``, then one pass of ``"  " -> " "``)."""
  return template.replace('[ATR]', attribute).replace('[CLS]', category).replace('  ', ' ')


def as_text(value) -> str:
  """A TFDS text value (``bytes``, ``np.bytes_`` or ``str``) as ``str``."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode('utf-8')
  return str(value)


def as_texts(values) -> tuple[str, ...]:
  """A sequence of TFDS text values (list or 1-D array) as a tuple of ``str``."""
  return tuple(as_text(v) for v in values)


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
  return options[int(rng.integers(len(options)))] if len(options) else ''


def naive_caption(rng: np.random.Generator, attributes: Sequence[str], categories: Sequence[str],
                  template: str = CAPTION_TEMPLATE) -> tuple[str, str]:
  """One attribute and one category drawn uniformly (or ``''`` if none).

  Draws the attribute first, then the category, each with one
  ``rng.integers`` call when the list is not empty.

  Returns:
    ``(caption, category)``; ``category`` is the sample's label name.
  """
  attribute = _choice(rng, attributes)
  category = _choice(rng, categories)
  caption = fill(template, category, attribute)
  return caption, category


def substitute_knowledge(rng: np.random.Generator, caption: str, category: str, dataset: str,
                         knowledge: Mapping[str, Sequence[str]],
                         skip_datasets: Sequence[str] = SKIP_DATASETS) -> str:
  """Replaces ``category`` in ``caption`` by a draw from ``[category] + descriptions``.

  Unchanged (and no random number drawn) when ``dataset`` is in
  ``skip_datasets`` or ``category`` has no entry in ``knowledge``.
  """
  if dataset in skip_datasets or category not in knowledge:
    return caption
  prompts = [category, *knowledge[category]]
  return caption.replace(category, _choice(rng, prompts))


def flair_caption(rng: np.random.Generator, attributes: Sequence[str], categories: Sequence[str],
                  dataset: str, knowledge: Mapping[str, Sequence[str]] | None,
                  template: str = CAPTION_TEMPLATE,
                  skip_datasets: Sequence[str] = SKIP_DATASETS) -> tuple[str, str]:
  """The full pre-training caption; ``knowledge=None`` turns substitution off.

  Returns:
    ``(caption, category)``.
  """
  caption, category = naive_caption(rng, attributes, categories, template)
  if knowledge is not None:
    caption = substitute_knowledge(rng, caption, category, dataset, knowledge, skip_datasets)
  return caption, category
