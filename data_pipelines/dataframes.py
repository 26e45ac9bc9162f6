"""FLAIR-format dataframes: CSV files with an ``image`` column (a path
relative to a data root) and list-valued cells (``categories``,
``atributes``, written as Python list literals like ``"['a', 'b']"``).

Rows come with the line they end on, for messages that point into the file;
a row or cell that cannot be read is a :class:`Skip` naming the reason.
"""

from __future__ import annotations

import ast
import csv
import os
from typing import Any, Iterator

_MAX_CELL = 10_000  # Characters; longer list cells are refused unparsed.


class Skip(Exception):
  """A row, cell or example left out, counted under ``reason``."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(f'{reason}: {detail}')
    self.reason, self.detail = reason, detail


def parse_list(cell: Any, column: str) -> list[str]:
  """A list cell (``"['a', 'b']"``) -> list of str, with ``ast.literal_eval``.

  Raises:
    Skip: ``'malformed_list'``, the cell is not a list of strings.
  """
  if not isinstance(cell, str) or len(cell) > _MAX_CELL:
    raise Skip('malformed_list', f'{column}: not a list literal')
  try:
    value = ast.literal_eval(cell.strip())
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
    raise Skip('malformed_list', f'{column}: {cell[:80]!r} is not a list literal') from None
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    raise Skip('malformed_list', f'{column}: {cell[:80]!r} is not a list of strings')
  return list(value)


def read_rows(path: str, columns: tuple[str, ...]) -> Iterator[tuple[int, dict | Skip]]:
  """Rows of a FLAIR dataframe CSV as (line, row) or (line, Skip).

  ``line`` is the line of the file the row ends on. A row with missing or
  extra fields, or one the csv module cannot read, is a
  ``Skip('malformed_row')``; undecodable bytes are kept as surrogates so
  that one bad path does not stop the file.

  Raises:
    ValueError: the file lacks one of ``columns``.
  """
  with open(path, newline='', encoding='utf-8', errors='surrogateescape') as f:
    reader = csv.DictReader(f)
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f'{path}: columns {missing} missing; a FLAIR dataframe has '
                       f'columns {list(columns)} (found {reader.fieldnames})')
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        yield reader.line_num, Skip('malformed_row', str(e))
        continue
      if None in row or any(row.get(c) is None for c in columns):
        yield reader.line_num, Skip('malformed_row', 'wrong number of fields')
      else:
        yield reader.line_num, row


def location(path: str, line: int) -> str:
  """``'file.csv:line'``, where a row is in a build report."""
  return f'{os.path.basename(path)}:{line}'
