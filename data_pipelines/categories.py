"""The category vocabulary: stable integer ids for FLAIR category names.

Id 0 is reserved for "no category" (the empty string, FLAIR's caption when an
image has no category); ids 1.. follow the lines of the shipped
``resources/categories.txt``: the sorted union of the expert-knowledge
dictionaries' keys, FLAIR's held-out words and the synthetic set's findings.
A user file extends the vocabulary by appending names after the shipped ones,
so that every shipped id stays the same.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import os
from typing import Iterable, Sequence

# FLAIR's default held-out list (main_pretrain.py `--banned_categories`).
BANNED_CATEGORY_WORDS = ('myopia', 'cataract', 'macular hole',
                         'retinitis pigmentosa', 'myopic', 'myope', 'myop',
                         'retinitis')
NO_CATEGORY = ''


class UnknownCategoryError(KeyError):
  """A category name (or id) that the vocabulary does not hold."""

  def __str__(self):  # KeyError would print the message with quotes.
    return str(self.args[0]) if self.args else ''


def read_names(lines: Iterable[str]) -> list[str]:
  """Names from a vocabulary file: one a line, blank and '#' lines skipped."""
  names = []
  for line in lines:
    name = line.rstrip('\r\n')
    if not name.strip() or name.lstrip().startswith('#'):
      continue
    if name != name.strip():
      raise ValueError(f'category {name!r} has leading or trailing spaces; '
                       'write names exactly as the dataframes spell them')
    names.append(name)
  return names


@dataclasses.dataclass(frozen=True)
class Vocabulary:
  """Names by id: ``names[0] == ''`` (no category), ``names[k]`` has id k."""

  names: tuple[str, ...]

  def __post_init__(self):
    if not self.names or self.names[0] != NO_CATEGORY:
      raise ValueError('a vocabulary starts with the empty name (id 0)')
    seen = set()
    for name in self.names:
      if name in seen:
        raise ValueError(f'category {name!r} appears twice in the vocabulary')
      seen.add(name)
    object.__setattr__(self, '_ids', {n: i for i, n in enumerate(self.names)})

  def __len__(self):
    return len(self.names)

  def __contains__(self, name):
    return name in self._ids

  def id(self, name: str) -> int:
    """The integer id of ``name``; raises UnknownCategoryError naming close ones."""
    try:
      return self._ids[name]
    except (KeyError, TypeError):
      close = difflib.get_close_matches(str(name), self.names[1:], n=3,
                                        cutoff=0.6)
      hint = (f'; close matches: {", ".join(map(repr, close))}' if close
              else '; extend the vocabulary with a file of extra names')
      raise UnknownCategoryError(
          f'unknown category {name!r} (vocabulary of {len(self) - 1} '
          f'names){hint}') from None

  def name(self, index: int) -> str:
    """The name of id ``index`` ('' for 0)."""
    if not 0 <= int(index) < len(self.names):
      raise UnknownCategoryError(
          f'category id {index} is outside [0, {len(self.names) - 1}]')
    return self.names[int(index)]

  def extended(self, extra: Iterable[str]) -> Vocabulary:
    """This vocabulary with the new names of ``extra`` appended in order."""
    new = [n for n in dict.fromkeys(extra) if n not in self._ids]
    return Vocabulary(self.names + tuple(new))


def _shipped() -> Vocabulary:
  text = importlib.resources.files(__package__).joinpath(
      'resources').joinpath('categories.txt').read_text(encoding='utf-8')
  return Vocabulary((NO_CATEGORY,) + tuple(read_names(text.splitlines())))


VOCABULARY = _shipped()
CATEGORIES = VOCABULARY.names  # CATEGORIES[k] is the name of id k.


def load_vocabulary(extra_file: str | os.PathLike | None = None) -> Vocabulary:
  """The shipped vocabulary, extended by the names of ``extra_file`` if given."""
  if extra_file is None:
    return VOCABULARY
  with open(extra_file, encoding='utf-8') as f:
    return VOCABULARY.extended(read_names(f))


def category_id(name: str, vocabulary: Vocabulary = VOCABULARY) -> int:
  """The stable integer id of a category name ('' -> 0)."""
  return vocabulary.id(name)


def category_name(index: int, vocabulary: Vocabulary = VOCABULARY) -> str:
  """The category name of an integer id (0 -> '')."""
  return vocabulary.name(index)


def is_banned(categories: Sequence[str],
              banned: Sequence[str] = BANNED_CATEGORY_WORDS) -> bool:
  """FLAIR's held-out rule: a banned word is a substring of any category.

  Matching is case-sensitive substring matching, as in FLAIR's pre-training
  loader, so 'myop' bans 'myopic maculopathy grade one' and 'retinitis'
  bans 'chorioretinitis'.
  """
  return any(word in category for category in categories for word in banned)
