"""The vocabulary of the PyTorch key tables each tower declares.

A table is a tuple of :class:`Row`. A row pairs a PyTorch module name with an
NNX module path and a module kind; a kind lists its leaves and how each
changes layout between the frameworks. ``{s}``, ``{b}``, ``{k}`` and ``{l}``
in names stand for integer indices. A row whose kind is itself a table is a
sub-table, its names prefixed by the row's two names. ``flair_jax.convert``
reads the tables; nothing here converts anything.
"""

from __future__ import annotations

from typing import NamedTuple, Union

# Layouts: how one leaf changes between the frameworks.
COPY = 'copy'        # same array, float32
CONV = 'conv'        # torch OIHW <-> NNX HWIO
LINEAR = 'linear'    # torch (out, in) <-> NNX (in, out)
COUNT = 'count'      # BatchNorm num_batches_tracked: torch int64 <-> NNX int32

# Leaves of each module kind: (PyTorch leaf, NNX leaf, layout).
KINDS = {
    'param': (('', '', COPY),),
    'conv': (('weight', 'kernel', CONV), ('bias', 'bias', COPY)),  # bias if present
    'batchnorm': (('weight', 'scale', COPY), ('bias', 'bias', COPY),
                  ('running_mean', 'mean', COPY), ('running_var', 'var', COPY),
                  ('num_batches_tracked', 'num_batches_tracked', COUNT)),
    'linear': (('weight', 'kernel', LINEAR), ('bias', 'bias', COPY)),  # bias if present
    'layernorm': (('weight', 'scale', COPY), ('bias', 'bias', COPY)),
    'embedding': (('weight', 'embedding', COPY),),
}


class Row(NamedTuple):
  """One PyTorch module and its NNX counterpart.

  Attributes:
    torch_name: dotted PyTorch module name (a prefix for a sub-table).
    nnx_name: ``'/'``-joined NNX path (a prefix for a sub-table).
    kind: a key of :data:`KINDS`, or a sub-table (a tuple of rows).
  """
  torch_name: str
  nnx_name: str
  kind: Union[str, tuple]
