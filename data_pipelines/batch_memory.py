"""Batch images handed from grain worker processes through reused shared memory.

grain's process prefetch moves every array of an element through a fresh
shared-memory segment: the worker creates it, faults in and fills its pages,
the main process maps it and unlinks it when the array dies. For a batch of
images (``b x 512 x 512 x 3`` uint8, 25 MiB at b = 32) the fresh pages cost
more CPU than decoding the images (see ``benchmarks/RESULTS_input_pipeline.md``).
Here each worker keeps a small ring of segments ("slots") whose pages stay
mapped in both processes: the worker builds a batch's images straight into
a free slot and returns a ``SlotHandle``; the main process maps the slot
once, hands out a view of it, and frees the slot when the last reference to
that view dies, so a batch is never overwritten while anyone holds it.

A slot is ``[64-byte header][pixels]``; header byte 0 is 1 while the slot
holds a batch not yet released and 0 when the worker may reuse it. Only the
worker sets it to 1 and only the main process sets it to 0. When no slot is
free (and the ring is at its size) the worker returns an ordinary array,
which grain moves the usual way: slower, never wrong.

Segments are files in ``/dev/shm`` (Linux; elsewhere, or without a writable
``/dev/shm``, ``available()`` is False and the pipeline keeps grain's path).
Their names are ``flair_batch_<main pid>_<token>_<worker pid>_<slot>``. The
main process unlinks a name as soon as it has mapped it (the pages live on
while mapped), so after a slot's first batch nothing is left to leak. Names
not yet mapped are removed by ``BatchReader.close()`` (after the workers
stopped, also after a worker crash) and, should the main process have been
killed, by ``remove_stale()`` in the next pipeline to start.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import secrets
import sys
import weakref
from typing import Callable, Mapping

import numpy as np

SHM_DIR = '/dev/shm'
PREFIX = 'flair_batch_'
HEADER = 64  # bytes before the pixels; byte 0 is the slot's state
_FREE, _HELD = 0, 1
_NAME = re.compile(re.escape(PREFIX) + r'(\d+)_')


@dataclasses.dataclass(frozen=True)
class SlotHandle:
  """What a worker returns in place of a batch's images."""
  name: str  # file name in SHM_DIR
  shape: tuple[int, ...]
  dtype: str


def available() -> bool:
  """Whether slots can be made here: Linux with a writable ``/dev/shm``."""
  return sys.platform.startswith('linux') and os.access(SHM_DIR, os.W_OK | os.X_OK)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def leftover_names(prefix: str = PREFIX) -> list[str]:
  """Slot files in ``/dev/shm`` whose names start with ``prefix``."""
  try:
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
  except OSError:
    return []


def _unlink(name: str) -> None:
  try:
    os.unlink(os.path.join(SHM_DIR, name))
  except FileNotFoundError:
    pass


def remove_stale() -> int:
  """Removes slot files left by main processes that no longer run; returns how many."""
  stale = [n for n in leftover_names() if not _pid_alive(int(_NAME.match(n).group(1)))]
  for name in stale:
    _unlink(name)
  return len(stale)


def _map(name: str, size: int, create: bool) -> mmap.mmap:
  path = os.path.join(SHM_DIR, name)
  fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
  try:
    if create:
      os.ftruncate(fd, size)
    return mmap.mmap(fd, size)
  finally:
    os.close(fd)


class _Ring:
  """A worker's slots, made on demand up to ``max_slots``."""

  def __init__(self, prefix: str, shape: tuple[int, ...], dtype, max_slots: int):
    self.prefix = f'{prefix}{os.getpid()}_'
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    self.size = HEADER + int(np.prod(self.shape)) * self.dtype.itemsize
    self.max_slots = max_slots
    self.maps: list[mmap.mmap] = []
    self.next = 0

  def acquire(self) -> tuple[SlotHandle, np.ndarray] | None:
    """A free slot, marked held, and its pixel array; None when all are held."""
    count = len(self.maps)
    for step in range(count):
      k = (self.next + step) % count
      if self.maps[k][0] == _FREE:
        break
    else:
      if count >= self.max_slots:
        return None
      k = count
      self.maps.append(_map(f'{self.prefix}{k}', self.size, create=True))
    self.next = (k + 1) % self.max_slots
    self.maps[k][0] = _HELD
    pixels = np.frombuffer(self.maps[k], self.dtype, int(np.prod(self.shape)), HEADER)
    return SlotHandle(f'{self.prefix}{k}', self.shape, self.dtype.str), pixels.reshape(self.shape)

  def release(self, handle: SlotHandle) -> None:
    self.maps[int(handle.name.rsplit('_', 1)[1])][0] = _FREE


class SharedMemoryBatches:
  """A grain map transform: ``build(i, image_out=...)`` into a worker's slot.

  Args:
    build: ``build(i, image_out=None) -> batch dict``; with ``image_out``
      it writes the batch's images there and returns them under ``key``.
    shape, dtype: of ``batch[key]``.
    prefix: ``BatchReader.prefix`` of the main process reading the batches.
    max_slots: ring size per worker (batches in flight between this worker
      and the consumer, consumer's own included).
    key: the batch entry that goes through the slots.
  """

  def __init__(self, build: Callable, *, shape: tuple[int, ...], dtype, prefix: str,
               max_slots: int, key: str = 'image'):
    self.build = build
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    self.prefix = prefix
    self.max_slots = max_slots
    self.key = key
    self._main_pid = os.getpid()
    self._ring = None

  def __getstate__(self):
    return {**self.__dict__, '_ring': None}

  def __call__(self, i: int):
    if os.getpid() == self._main_pid:  # only workers hand out slots
      return self.build(i)
    if self._ring is None:
      self._ring = _Ring(self.prefix, self.shape, self.dtype, self.max_slots)
    slot = self._ring.acquire()
    if slot is None:  # every slot still held downstream
      return self.build(i)
    handle, pixels = slot
    try:
      batch = self.build(i, image_out=pixels)
    except BaseException:
      self._ring.release(handle)
      raise
    batch[self.key] = handle
    return batch


def _release(slot: mmap.mmap) -> None:
  if not slot.closed:
    slot[0] = _FREE


class BatchReader:
  """The main process's side: slot handles -> arrays, and the cleanup.

  ``prefix`` names this reader's slots (give it to ``SharedMemoryBatches``);
  ``counts`` (updated in place) counts the batches that came through a slot
  (``'shared_memory'``) and those that did not (``'fallback'``).
  """

  def __init__(self, counts: dict[str, int] | None = None):
    remove_stale()
    self.prefix = f'{PREFIX}{os.getpid()}_{secrets.token_hex(4)}_'
    self._maps: dict[str, mmap.mmap] = {}
    self.counts = {'shared_memory': 0, 'fallback': 0} if counts is None else counts

  def open(self, batch: Mapping, key: str = 'image') -> dict:
    """``batch`` with ``batch[key]`` a view of its slot (or as it came, if not a slot).

    The slot is released for reuse when the view and every array made
    from it are gone.
    """
    handle = batch[key]
    if not isinstance(handle, SlotHandle):
      self.counts['fallback'] += 1
      return dict(batch)
    self.counts['shared_memory'] += 1
    slot = self._maps.get(handle.name)
    if slot is None:
      size = HEADER + int(np.prod(handle.shape)) * np.dtype(handle.dtype).itemsize
      slot = self._maps[handle.name] = _map(handle.name, size, create=False)
      _unlink(handle.name)  # both sides have it mapped: the pages live until both unmap
    dtype = np.dtype(handle.dtype)
    flat = np.frombuffer(slot, dtype, int(np.prod(handle.shape)), HEADER)
    # numpy makes `flat` the base of every array derived from it (views,
    # slices, reshapes), so `flat` dies only with the last of them.
    weakref.finalize(flat, _release, slot)
    pixels = flat.reshape(handle.shape)
    return {**batch, key: pixels}

  def close(self) -> None:
    """Forgets the slots (pages go when no array uses them) and removes unmapped names.

    Call it after the workers stopped.
    """
    self._maps.clear()
    for name in leftover_names(self.prefix):
      _unlink(name)
