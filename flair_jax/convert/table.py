"""Conversion between PyTorch state dicts and flair_jax NNX state, driven by
the key tables the towers declare (``flair_jax.models.torch_keys`` describes
their rows; ``models.factory.torch_rows`` assembles the FLAIR one).

Both directions read the same rows: :func:`to_torch` maps NNX state to a
PyTorch state dict and :func:`from_torch` maps back, after checking that the
key set and every shape are exactly those the model needs.

NNX paths are ``'/'``-joined (``vision_model/layer1/0/conv1/kernel``); state
is handled as flat ``{path: array}`` dicts of NumPy arrays.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from data_pipelines.console import UserError
from flair_jax import trees
from flair_jax.models.torch_keys import CONV, COUNT, KINDS, LINEAR


class KeyMismatchError(UserError, ValueError):
  """A state dict whose keys or shapes are not exactly the model's."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One leaf: PyTorch key, NNX path, layout and the NNX shape and dtype."""
  torch_key: str
  nnx_path: str
  layout: str
  shape: tuple
  dtype: np.dtype

  @property
  def torch_shape(self) -> tuple:
    return torch_shape(self.layout, self.shape)


@dataclasses.dataclass(frozen=True)
class _Rule:
  torch_template: str
  nnx_pattern: re.Pattern
  layout: str


def _rules(table, torch_prefix='', nnx_prefix=''):
  for torch_name, nnx_name, kind in table:
    if isinstance(kind, tuple):
      yield from _rules(kind, torch_prefix + torch_name, nnx_prefix + nnx_name)
      continue
    for torch_leaf, nnx_leaf, layout in KINDS[kind]:
      t = torch_prefix + torch_name + ('.' + torch_leaf if torch_leaf else '')
      n = nnx_prefix + nnx_name + ('/' + nnx_leaf if nnx_leaf else '')
      regex = re.sub(r'\\\{(\w)\\\}', r'(?P<\1>\\d+)', re.escape(n))
      yield _Rule(t, re.compile(regex), layout)


def torch_shape(layout: str, shape: Sequence[int]) -> tuple:
  """PyTorch shape of an NNX leaf of ``shape`` under ``layout``."""
  shape = tuple(shape)
  if layout == CONV:
    h, w, i, o = shape
    return (o, i, h, w)
  if layout == LINEAR:
    return shape[::-1]
  return shape


def entries(table, abstract: Mapping[str, object]) -> list:
  """The table's entries for a model whose NNX leaves are ``abstract``.

  Args:
    table: rows, e.g. ``models.factory.torch_rows(config)`` or a tower's
      ``TORCH_ROWS``.
    abstract: flat ``{nnx_path: array or ShapeDtypeStruct}`` of the model.
  Returns:
    One :class:`Entry` per NNX leaf, in the order of ``abstract``.
  Raises:
    KeyError: a leaf no row maps (a table that lags behind the model).
  """
  rules = list(_rules(table))
  out = []
  for path, leaf in abstract.items():
    for rule in rules:
      m = rule.nnx_pattern.fullmatch(path)
      if m:
        out.append(Entry(rule.torch_template.format(**m.groupdict()), path,
                         rule.layout, tuple(leaf.shape), np.dtype(leaf.dtype)))
        break
    else:
      raise KeyError(f'NNX leaf {path!r} has no row in the conversion table')
  return out


def to_torch(table, state: Mapping[str, np.ndarray]) -> dict:
  """Flat NNX state -> PyTorch state dict of NumPy arrays (OIHW, (out, in)).

  Floating leaves become float32, ``num_batches_tracked`` int64.
  """
  sd = {}
  for e in entries(table, state):
    a = np.asarray(state[e.nnx_path])
    if e.layout == CONV:
      a = a.transpose(3, 2, 0, 1)
    elif e.layout == LINEAR:
      a = a.T
    sd[e.torch_key] = np.array(a, np.int64 if e.layout == COUNT else np.float32, order='C')
  return sd


def check_keys(table, abstract: Mapping[str, object], sd: Mapping[str, object],
               extras: Iterable[str] = (), what: str = 'state dict') -> list:
  """Checks ``sd`` against the model; returns the entries.

  Raises:
    KeyMismatchError: naming every missing, unexpected and mis-shaped key.
  """
  extras = tuple(extras)
  ents = entries(table, abstract)
  found = trees.mismatches(
      {e.torch_key: e.torch_shape for e in ents}, {k: tuple(np.shape(v)) for k, v in sd.items()},
      describe=lambda k, shape, want: f'{k} {shape} (expected {want})', ignore=extras)
  problems = []
  for label, keys in (('missing', found.missing), ('unexpected', sorted(found.unexpected)),
                      ('mis-shaped', found.differing)):
    if keys:
      problems.append(f'{len(keys)} {label} key(s): ' + ', '.join(keys))
  if problems:
    allowed = f'; tolerated extras: {", ".join(extras)}' if extras else ''
    raise KeyMismatchError(
        f'{what} does not match the model: ' + '; '.join(problems)
        + f'. Expected exactly the {len(ents)} keys of the model{allowed}.')
  return ents


def from_torch(table, abstract: Mapping[str, object], sd: Mapping[str, object],
               extras: Iterable[str] = (), what: str = 'state dict') -> dict:
  """PyTorch state dict -> flat NNX state ``{nnx_path: np.ndarray}``.

  Args:
    table: the conversion table.
    abstract: flat ``{nnx_path: ShapeDtypeStruct}`` of the target model.
    sd: ``{torch_key: array}``; any float dtype (bf16, f16) becomes float32.
    extras: keys dropped without complaint (documented per table).
    what: names the source in errors.
  Raises:
    KeyMismatchError: the key set or a shape is not exactly the model's.
  """
  out = {}
  for e in check_keys(table, abstract, sd, extras, what):
    a = np.asarray(sd[e.torch_key])
    if e.layout == CONV:
      a = a.transpose(2, 3, 1, 0)
    elif e.layout == LINEAR:
      a = a.T
    out[e.nnx_path] = np.array(a, dtype=e.dtype, order='C')
  return out

