"""Device mesh, shardings, global batches, multi-process start-up and the
agreements between processes.

The batch is split over the mesh axis ``'data'``; parameters are replicated
(an ``'fsdp'`` axis of size 1 is kept in the mesh so that sharding them later
changes no call site). On several processes (hosts), each feeds its own
local slice of the batch and JAX's multi-controller runtime does the rest.
Every sharding and partition spec the package uses is built here.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipelines.console import UserError

MESH_AXES = ('data', 'fsdp')
BATCH_AXIS = 'data'


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ``('data', 'fsdp')`` mesh over all devices of all processes.

  Args:
    data: size of the data axis; -1 takes all devices left after ``fsdp``.
    fsdp: size of the fsdp axis.
    devices: defaults to ``jax.devices()`` (every process's devices).
  Returns:
    a Mesh with automatic (classic GSPMD) axis types.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f'fsdp axis size {fsdp} must be >= 1 and divide the {n} devices')
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f'mesh data={data} x fsdp={fsdp} does not cover the {n} devices; '
                     f'use data=-1 or sizes whose product is {n}')
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=(auto, auto), devices=devices)


def batch_spec(axis: Union[Hashable, Sequence[Hashable]] = BATCH_AXIS) -> P:
  """Leading (batch) dimension split over mesh ``axis`` (a name or a tuple
  of names), the rest replicated: e.g. a ``jax.shard_map`` in/out spec."""
  return P(axis if isinstance(axis, str) else tuple(axis))


def replicated_spec() -> P:
  """The whole array on every device."""
  return P()


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over ``'data'``, the rest replicated."""
  return NamedSharding(mesh, batch_spec())


def replicated(mesh: Mesh) -> NamedSharding:
  """The same full array on every device."""
  return NamedSharding(mesh, replicated_spec())


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """A pytree of global arrays, batch-sharded, from this process's slice.

  Args:
    local_batch: pytree of host arrays ``[B_local, ...]``, this process's
      part of the global batch (every process passes the same structure).
    mesh: the training mesh.
  Returns:
    the same pytree of ``jax.Array`` shaped ``[B_local * num_processes, ...]``.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x),
                      local_batch)


def replicated_value(fn, mesh: Mesh) -> Any:
  """``fn()`` computed as a global, replicated value (e.g. a PRNG key).

  ``jax.device_put`` refuses shardings over other processes' devices; a
  jitted function with ``out_shardings`` creates the value on every process.
  """
  return jax.jit(fn, out_shardings=replicated(mesh))()


def place(tree: Any, sharding: NamedSharding) -> Any:
  """``tree`` on ``sharding``: each leaf a global array with that sharding.

  Takes host arrays, uncommitted arrays and arrays committed to other
  devices (a model loaded from disk sits on device 0, which a jitted
  function with ``out_shardings`` over the mesh refuses). Local values are
  assembled shard by shard from the host copy, so on several processes each
  process places only its own devices' shards and every process must hold
  the same values (as after loading the same checkpoint). Arrays spanning
  other processes are resharded by a jitted identity. Non-array leaves pass.
  """
  reshard = jax.jit(lambda x: x, out_shardings=sharding)

  def leaf(x):
    if isinstance(x, jax.Array):
      if x.sharding == sharding:
        return x
      if not x.is_fully_addressable:
        return reshard(x)
    elif not isinstance(x, (np.ndarray, np.generic)):
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
  return jax.tree.map(leaf, tree)


def to_host(tree: Any) -> Any:
  """Host NumPy copies of a pytree of replicated (or single-process) arrays.

  Every process holds a whole copy of a replicated array, so its first
  addressable shard is the value: no collective, and it works on every
  process of a multi-host run (``jax.device_get`` refuses an array spanning
  other processes' devices).
  """
  def leaf(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        raise ValueError(f'to_host needs a replicated array; got sharding {x.sharding}')
      return np.asarray(x.addressable_data(0))
    return jax.device_get(x)
  return jax.tree.map(leaf, tree)


def maybe_initialize_distributed(enabled: bool, coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
  """Start JAX's multi-process runtime when asked to; call before any JAX use.

  With ``enabled`` False, or one process, nothing happens. On TPU pods and
  managed GPU clusters (SLURM, ...) the arguments may stay None and are
  detected from the environment.

  Cross-process collectives of the CPU backend need an implementation;
  gloo is selected unless ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` says
  otherwise (it does not affect GPU or TPU backends).

  Returns:
    whether ``jax.distributed.initialize`` was called.
  """
  if not enabled or num_processes == 1 or jax.distributed.is_initialized():
    return False
  if not os.environ.get('JAX_CPU_COLLECTIVES_IMPLEMENTATION'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


class ProcessZeroError(UserError, RuntimeError):
  """What the other processes report when process 0 failed at a step they
  were waiting for."""


def is_main_process() -> bool:
  """Whether this process logs, evaluates and writes shared files."""
  return jax.process_index() == 0


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is True on any (a collective)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class ProcessMax:
  """The largest of one integer per process, agreed at each call.

  Called in the same order by every process (one call per training step).
  It goes through the coordinator's key-value store, on the host: a step
  still running on the devices does not delay it (a device collective
  would queue behind that step). Without that store, an all-gather.
  """

  TIMEOUT_MS = 10 * 60 * 1000

  def __init__(self, name: str):
    self.name, self.calls = name, 0

  def __call__(self, value: int) -> int:
    if jax.process_count() == 1:
      return int(value)
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    client = getattr(distributed.global_state, 'client', None)
    if client is None:
      return int(np.max(multihost_utils.process_allgather(np.int64(value))))
    call, self.calls = self.calls, self.calls + 1
    key = lambda c, p: f'flair_jax/{self.name}/{c}/{p}'
    client.key_value_set(key(call, jax.process_index()), str(int(value)))
    values = [int(client.blocking_key_value_get(key(call, p), self.TIMEOUT_MS))
              for p in range(jax.process_count())]
    if call >= 2:  # every process has read it: each is past its call - 1
      client.key_value_delete(key(call - 2, jax.process_index()))
    return max(values)


def sync_processes(what: str) -> None:
  """Waits until every process reaches this point (nothing on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'flair_jax: {what}')


def on_main_process(fn: Callable[[], Any], what: str) -> Any:
  """``fn()`` on process 0 while the other processes wait for it.

  Every process learns whether it failed (the agreement is a collective), so
  none is left waiting: process 0 re-raises, the others raise a one-line
  error pointing at its log.

  Args:
    fn: the work, called without arguments.
    what: names the work in the other processes' error.
  Returns:
    its result on process 0 and None elsewhere.
  Raises:
    ProcessZeroError: on the other processes, when ``fn`` failed on process 0.
  """
  if jax.process_count() == 1:
    return fn()
  result, error = None, None
  if is_main_process():
    try:
      result = fn()
    except BaseException as e:  # pylint: disable=broad-except  # re-raised below
      error = e
  if any_process(error is not None):
    if error is not None:
      raise error
    raise ProcessZeroError(f'process 0 failed during {what}; its log says why')
  return result
