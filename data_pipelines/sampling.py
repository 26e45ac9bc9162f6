"""Which example each pre-training sample reads: the assembly index and FLAIR's sampling.

Samples form one global stream ``k = 0, 1, 2, ...``; sample ``k`` lies in
epoch ``k // epoch_length`` at position ``p = k % epoch_length``.

- ``'balanced'`` (PyTorch FLAIR's ``UniformDataset`` behind a shuffling
  loader): a per-epoch permutation ``perm`` of ``range(epoch_length)``;
  sample ``k`` reads dataset ``perm[p] % n_datasets`` (datasets sorted by
  name) and, inside it, an example drawn uniformly with replacement.
- ``'shuffled'``: a per-epoch permutation of all kept examples.

Every random choice is a function of ``(seed, epoch)`` or ``(seed, k)``
only, so the stream does not depend on worker count, prefetching or where it
was resumed.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from data_pipelines.captions import as_text, as_texts
from data_pipelines.categories import BANNED_CATEGORY_WORDS, is_banned

SAMPLINGS = ('balanced', 'shuffled')
_PERMUTATION_STREAM = 1
_SAMPLE_STREAM = 2


@dataclasses.dataclass(frozen=True)
class AssemblyIndex:
  """Kept examples grouped by dataset.

  Attributes:
    datasets: dataset names, sorted.
    records: per dataset, int64 ``[n_d, 2]`` rows ``(source, record)``.
    num_banned: examples dropped by the banned-category filter.
  """
  datasets: tuple[str, ...]
  records: tuple[np.ndarray, ...]
  num_banned: int = 0

  @property
  def size(self) -> int:
    """Number of kept examples (FLAIR's default epoch length)."""
    return int(sum(len(r) for r in self.records))

  def counts(self) -> dict[str, int]:
    return {name: len(r) for name, r in zip(self.datasets, self.records)}


def _metadata_view(source):
  """A view of a TFDS data source that does not decode images."""
  if hasattr(source, 'dataset_info') and dataclasses.is_dataclass(source):
    features = source.dataset_info.features
    if features is not None and 'image' in features:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      return dataclasses.replace(source, decoders={'image': tfds.decode.SkipDecoding()})
  return source


def index_sources(sources: Sequence,
                  banned_categories: Sequence[str] | None = BANNED_CATEGORY_WORDS,
                  chunk: int = 256) -> AssemblyIndex:
  """Groups the examples of ``sources`` by dataset and drops banned ones.

  Reads only ``dataset`` and ``categories`` (TFDS sources are read without
  decoding images).

  Args:
    sources: random-access sources (``__len__``, ``__getitem__``) of examples
      with ``dataset`` and ``categories``.
    banned_categories: words that drop an example when one is a substring of
      any of its categories; ``None`` or ``()`` keeps everything.
  """
  per_dataset: dict[str, list[tuple[int, int]]] = {}
  num_banned = 0
  for s, source in enumerate(sources):
    view = _metadata_view(source)
    getitems = getattr(view, '__getitems__', None)
    for start in range(0, len(view), chunk):
      keys = list(range(start, min(start + chunk, len(view))))
      examples = getitems(keys) if getitems else [view[i] for i in keys]
      for r, example in zip(keys, examples):
        if banned_categories and is_banned(as_texts(example['categories']), banned_categories):
          num_banned += 1
          continue
        per_dataset.setdefault(as_text(example['dataset']), []).append((s, r))
  if not per_dataset:
    raise ValueError(f'no example left to sample from {len(sources)} source(s) '
                     f'({num_banned} banned); expected at least one kept example')
  names = tuple(sorted(per_dataset))
  records = tuple(np.asarray(per_dataset[n], np.int64).reshape(-1, 2) for n in names)
  return AssemblyIndex(names, records, num_banned)


def sample_rng(seed: int, k: int) -> np.random.Generator:
  """The generator of sample ``k``'s own random choices."""
  return np.random.default_rng([seed, _SAMPLE_STREAM, k])


class Sampler:
  """Maps a global sample number to ``(dataset, source, record)``; picklable."""

  def __init__(self, index: AssemblyIndex, *, seed: int, sampling: str = 'balanced',
               epoch_length: int | None = None):
    if sampling not in SAMPLINGS:
      raise ValueError(f'sampling {sampling!r} is not one of {SAMPLINGS}')
    self.index = index
    self.seed = int(seed)
    self.sampling = sampling
    self.epoch_length = int(epoch_length or index.size)
    if sampling == 'shuffled' and self.epoch_length > index.size:
      raise ValueError(f"epoch_length {self.epoch_length} exceeds the {index.size} kept examples; "
                       "'shuffled' visits each at most once per epoch (use 'balanced')")
    self._flat = np.concatenate([
        np.concatenate([np.full((len(r), 1), d, np.int64), r], axis=1)
        for d, r in enumerate(index.records)])
    self._cached_epoch = None
    self._cached_perm = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_cached_epoch'] = state['_cached_perm'] = None
    return state

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._cached_epoch:
      n = self.epoch_length if self.sampling == 'balanced' else self.index.size
      rng = np.random.default_rng([self.seed, _PERMUTATION_STREAM, epoch])
      self._cached_perm, self._cached_epoch = rng.permutation(n), epoch
    return self._cached_perm

  def locate(self, k: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """``(dataset, source, record)`` of sample ``k``; ``rng`` is ``sample_rng(seed, k)``.

    For ``'balanced'`` this draws the example from ``rng`` (one
    ``integers`` call) before any caption choice.
    """
    epoch, position = divmod(int(k), self.epoch_length)
    drawn = int(self._permutation(epoch)[position])
    if self.sampling == 'shuffled':
      d, s, r = self._flat[drawn]
      return int(d), int(s), int(r)
    d = drawn % len(self.index.datasets)
    records = self.index.records[d]
    s, r = records[int(rng.integers(len(records)))]
    return d, int(s), int(r)
