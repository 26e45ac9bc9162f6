"""JSON files written atomically: a reader sees the old file or the new one,
never half of one (the text goes to a sibling, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, obj: Any, *, sort_keys: bool = False) -> None:
  """Writes ``obj`` as indented JSON with a final newline, atomically.

  Parent folders are created; values JSON does not know are written as
  ``str(value)``.
  """
  path = os.fspath(path)
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(obj, f, indent=2, sort_keys=sort_keys, default=str)
      f.write('\n')
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise

