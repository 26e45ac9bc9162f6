"""Nested state dicts (the ``nnx.to_pure_dict`` form): flatten to ``'a/b/c'``
paths and back, merge two, take the part shaped like another, and list
where two flat trees of shapes differ.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, NamedTuple


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


class Mismatches(NamedTuple):
  """Where a flat tree differs from the one expected.

  Attributes:
    missing: expected paths absent from the tree, in expected order.
    unexpected: paths of the tree that are not expected, in tree order.
    differing: one description per path present in both whose value
      (a shape, or shape and dtype) differs, in expected order.
  """
  missing: list
  unexpected: list
  differing: list

  def __bool__(self) -> bool:
    return bool(self.missing or self.unexpected or self.differing)

  def lines(self) -> list:
    """``'missing P'``, ``'unexpected P'``, then each difference."""
    return ([f'missing {k}' for k in self.missing]
            + [f'unexpected {k}' for k in self.unexpected] + self.differing)


def mismatches(expected: Mapping[str, object], actual: Mapping[str, object], *,
               describe: Callable[[str, object, object], str],
               ignore: Iterable[str] = ()) -> Mismatches:
  """Compares two flat ``{path: spec}`` dicts (a spec: a shape, or shape and dtype).

  Args:
    expected: what the model needs.
    actual: what was found.
    describe: ``describe(path, actual_spec, expected_spec)``, the text of one
      differing path.
    ignore: paths of ``actual`` that are neither expected nor reported.
  """
  ignore = set(ignore)
  return Mismatches(
      missing=[k for k in expected if k not in actual],
      unexpected=[k for k in actual if k not in expected and k not in ignore],
      differing=[describe(k, actual[k], v) for k, v in expected.items()
                 if k in actual and actual[k] != v])
