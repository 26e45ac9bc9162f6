"""Nested state dicts (the ``nnx.to_pure_dict`` form): flatten to ``'a/b/c'``
paths and back, merge two, take the part shaped like another.
"""

from __future__ import annotations

from typing import Mapping


def flatten(tree: Mapping, prefix: str = '') -> dict:
  """Nested dict -> ``{'a/b/0/c': leaf}``."""
  out = {}
  for k, v in tree.items():
    path = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(flatten(v, path + '/'))
    else:
      out[path] = v
  return out


def unflatten(flat: Mapping[str, object], like: Mapping, prefix: str = '') -> dict:
  """Flat ``{path: leaf}`` -> nested dict shaped (and keyed) like ``like``."""
  out = {}
  for k, v in like.items():
    path = f'{prefix}{k}'
    out[k] = unflatten(flat, v, path + '/') if isinstance(v, Mapping) else flat[path]
  return out


def merge(a: Mapping, b: Mapping) -> dict:
  """``a`` with ``b``'s entries added, nested dicts merged key by key."""
  out = dict(a)
  for k, v in b.items():
    out[k] = merge(out[k], v) if isinstance(v, Mapping) and k in out else v
  return out


def select(tree: Mapping, like: Mapping) -> dict:
  """The part of ``tree`` whose keys appear in ``like`` (at every level)."""
  return {k: select(tree[k], v) if isinstance(v, Mapping) else tree[k] for k, v in like.items()}
