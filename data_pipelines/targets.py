"""Target maps: class name -> integer label, the classes of a downstream set.

One reader for every form a target map is written in:

* a mapping ``{"normal": 0, "glaucoma": 1}``;
* class names in label order, ``["normal", "glaucoma"]`` (label = position);
* JSON text of either (it starts with ``{`` or ``[``);
* the path of a JSON file holding either (a name ending in ``.json`` is a
  path, so a missing file is an error rather than one class);
* names separated by commas, ``"no glaucoma,glaucoma"``.

Labels are ``0..K-1``, each once.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence, Union

from data_pipelines.console import UserError

Targets = Union[str, Mapping[str, int], Sequence[str]]

_FORMS = ('expected class names in label order ("a,b,c" or a JSON list) or a class name -> '
          'label map (JSON text or a JSON file), e.g. {"normal": 0, "glaucoma": 1}')


class TargetsError(UserError, ValueError):
  """A target map that cannot be read or does not give labels 0..K-1."""


def parse_targets(targets: Targets) -> dict[str, int]:
  """The class name -> label map ``targets`` writes, in any form above.

  Raises:
    TargetsError: unreadable, empty, a name twice, or labels not 0..K-1.
  """
  value = _load(targets) if isinstance(targets, str) else targets
  if isinstance(value, Mapping):
    try:
      out = {str(name): int(label) for name, label in value.items()}
    except (TypeError, ValueError):
      raise TargetsError(f'targets {dict(value)}: labels must be integers') from None
  elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
    names = [str(name) for name in value]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
      raise TargetsError(f'targets: classes {twice} are listed more than once')
    out = {name: label for label, name in enumerate(names)}
  else:
    out = {}
  if not out:
    raise TargetsError(f'targets: {_FORMS}; got {targets!r}')
  if sorted(out.values()) != list(range(len(out))):
    raise TargetsError(f'targets {out}: labels must be 0..{len(out) - 1}, each once')
  return out


def class_names(targets: Mapping[str, int]) -> tuple[str, ...]:
  """The class names in label order."""
  return tuple(sorted(targets, key=targets.get))


def _load(text: str) -> Any:
  """JSON text, a JSON file's content, or the names of a comma list."""
  stripped = text.strip()
  if stripped.startswith(('{', '[')):
    try:
      return json.loads(stripped)
    except json.JSONDecodeError as e:
      raise TargetsError(f'targets {stripped[:80]!r} is not valid JSON: {e}') from None
  if os.path.isfile(stripped):
    with open(stripped, encoding='utf-8') as f:
      try:
        return json.load(f)
      except json.JSONDecodeError as e:
        raise TargetsError(f'targets file {stripped} is not valid JSON: {e}') from None
  if stripped.lower().endswith('.json'):
    raise TargetsError(f'targets file {stripped} does not exist')
  return [name.strip() for name in stripped.split(',') if name.strip()]
