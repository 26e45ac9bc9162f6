"""The grain input pipeline of pre-training batches.

Each element of the grain dataset is one whole per-process batch, built by a
module-level transform from the batch's number alone. Worker processes
(``mp_prefetch``, spawn) each build whole batches and grain hands them out
round-robin, so the stream is the same for any worker count, and the
iterator state (``get_state()`` / ``set_state()``, or orbax through
``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``) resumes it
exactly. With workers, on Linux, the images of a batch travel from worker
to main process through reused shared memory (``batch_memory``) instead of
a fresh segment per batch.

Pre-training batch (``b`` = per-process batch, ``C`` = canvas):
  ``image`` uint8 ``[b, C, C, 3]`` (zero-padded bottom/right),
  ``input_ids`` int32 ``[b, 77]``, ``lengths`` int32 ``[b]``,
  ``category`` int32 ``[b]`` (id of the caption's category, 0 for none),
  ``dataset_index`` int32 ``[b]`` (into ``AssemblyIndex.datasets``).

Process ``j`` of ``P`` takes samples ``[j*b, (j+1)*b)`` of every global batch
of ``P*b`` samples, so the union of the processes' batch ``i`` is global
batch ``i`` of a single-process run with batch ``P*b``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import grain
import numpy as np

from data_pipelines import batch_memory
from data_pipelines import captions as captions_lib
from data_pipelines import categories as categories_lib
from data_pipelines import images as images_lib
from data_pipelines import knowledge as knowledge_lib
from data_pipelines import sampling as sampling_lib
from data_pipelines import tokenizer as tokenizer_lib

_ENDLESS_BATCHES = 2**40


def _process_index_and_count(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, process_count={process_count})')
  return int(process_index), int(process_count)


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """Workers leave Ctrl-C / SIGTERM to the main process, which saves first."""
  del worker_index, worker_count
  import signal  # pylint: disable=g-import-not-at-top
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _prepare_workers():
  """grain's workers read absl flags; mark them parsed if no absl app did."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# Batches a consumer may hold while it reads the next (the training loop
# holds one while the next is placed on the devices).
_CONSUMER_HELD = 2
_MIN_SHM_BYTES = 1 << 20


class BatchIterator(grain.DatasetIterator):
  """Iterator over batches ``build(i)`` whose state is the next batch number.

  The state ``{'next_batch': n, **fingerprint}`` does not depend on the
  worker count; ``set_state`` restarts reading (and the workers) at batch
  ``n``. Being a ``grain.DatasetIterator``, it works with
  ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` in orbax.

  With workers and ``batch_memory.available()``, ``batch['image']`` is a
  view of a worker's shared-memory slot, which goes back to the worker
  when the last array made from it is gone: keep a copy to hold the pixels
  for longer than a few batches (a consumer holding more only makes later
  batches take grain's slower path).
  """

  def __init__(self, build: Callable[..., dict[str, np.ndarray]], num_batches: int, *,
               worker_count: int = 0, read_threads: int = 1, prefetch: int = 2,
               fingerprint: Mapping[str, int | str] | None = None,
               index: sampling_lib.AssemblyIndex | None = None):
    super().__init__()
    self.index = index  # the pre-training assembly index (epoch length, datasets)
    self._build = build
    self._num_batches = num_batches
    self._worker_count = worker_count
    self._read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    self._prefetch = max(1, prefetch)
    self._fingerprint = dict(fingerprint or {})
    self._next_batch = 0
    self._inner = None
    self._reader = None
    # Batches whose images came through a shared-memory slot, or not (all slots held).
    self.transfer_counts = {'shared_memory': 0, 'fallback': 0}

  def _slots_per_worker(self) -> int:
    """Batches in flight per worker: its reader's buffer and the one it puts,
    grain's queue, the main process's prefetch thread (buffer and one in
    hand) and the consumer's."""
    reader = self._read_options.prefetch_buffer_size if self._read_options.num_threads else 0
    return reader + 1 + self._prefetch + self._prefetch + 1 + _CONSUMER_HELD

  def _start(self):
    transform = self._build
    if self._worker_count > 0 and batch_memory.available():
      self._reader = batch_memory.BatchReader(counts=self.transfer_counts)
      transform = batch_memory.SharedMemoryBatches(
          self._build, shape=self._build.image_shape, dtype=np.uint8, prefix=self._reader.prefix,
          max_slots=self._slots_per_worker())
    ds = grain.MapDataset.range(self._next_batch, self._num_batches).map(transform)
    ds = ds.to_iter_dataset(self._read_options)
    if self._worker_count > 0:
      _prepare_workers()
      # Small arrays (ids, lengths, categories) are cheaper pickled than in
      # a fresh shared-memory segment each (40 us against 1.2 ms a batch).
      ds = grain.experimental.WithOptionsIterDataset(
          ds, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHM_BYTES))
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self._worker_count, per_worker_buffer_size=self._prefetch),
                          worker_init_fn=_ignore_stop_signals)
    self._inner = iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    if self._inner is None:
      self._start()
    batch = next(self._inner)
    if self._reader is not None:
      batch = self._reader.open(batch)
    self._next_batch += 1
    return batch

  def get_state(self) -> dict[str, int | str]:
    return {'next_batch': self._next_batch, **self._fingerprint}

  def set_state(self, state: Mapping[str, int | str]) -> None:
    for key, value in self._fingerprint.items():
      if key in state and state[key] != value:
        raise ValueError(f'iterator state has {key}={state[key]!r} but this pipeline has '
                         f'{key}={value!r}; restore with the settings it was saved with')
    if not 0 <= int(state['next_batch']) <= self._num_batches:
      raise ValueError(f"iterator state next_batch={state['next_batch']} is outside "
                       f'[0, {self._num_batches}]')
    self._close_inner()
    self._next_batch = int(state['next_batch'])

  def start_prefetch(self) -> None:
    if self._inner is None:
      self._start()
    self._inner.start_prefetch()

  def _close_inner(self):
    if self._inner is not None:
      self._inner.close()  # joins the workers
      self._inner = None
    if self._reader is not None:
      self._reader.close()
      self._reader = None

  def close(self) -> None:
    self._close_inner()
    super().close()


class PretrainingBatch:
  """Builds per-process pre-training batch ``i`` (a grain map transform)."""

  def __init__(self, sources: Sequence, sampler: sampling_lib.Sampler, *, batch_size: int,
               process_index: int, process_count: int, tokenizer,
               knowledge: Mapping[str, Sequence[str]] | None, canvas: int,
               category_id: Callable[[str], int], template: str,
               skip_datasets: Sequence[str], max_length: int):
    self.sources = list(sources)
    self.sampler = sampler
    self.batch_size = batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.tokenizer = tokenizer_lib.StaticTokenizer(tokenizer, max_length)
    self.knowledge = knowledge
    self.canvas = canvas
    self.category_id = category_id
    self.template = template
    self.skip_datasets = tuple(skip_datasets)
    self.max_length = max_length

  @property
  def image_shape(self) -> tuple[int, int, int, int]:
    return (self.batch_size, self.canvas, self.canvas, 3)

  def sample_numbers(self, i: int) -> np.ndarray:
    """Global sample numbers of this process's batch ``i``."""
    first = (i * self.process_count + self.process_index) * self.batch_size
    return np.arange(first, first + self.batch_size, dtype=np.int64)

  def example(self, k: int, out: np.ndarray | None = None):
    """``(image u8 [C, C, 3], caption, category name, dataset index)`` of sample ``k``.

    The image is written into ``out`` (uint8 ``[C, C, 3]``) when given.
    """
    rng = sampling_lib.sample_rng(self.sampler.seed, k)
    d, s, r = self.sampler.locate(k, rng)
    example = self.sources[s][r]
    caption, category = captions_lib.flair_caption(
        rng, captions_lib.as_texts(example['attributes']),
        captions_lib.as_texts(example['categories']), self.sampler.index.datasets[d],
        self.knowledge, self.template, self.skip_datasets)
    image = images_lib.stored_canvas(example['image'], self.canvas, out=out)
    return image, caption, category, d

  def __call__(self, i: int, image_out: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Batch ``i``; its images are built in ``image_out`` (uint8 ``[b, C, C, 3]``) if given."""
    image_bcc3 = np.empty(self.image_shape, np.uint8) if image_out is None else image_out
    examples = [self.example(int(k), out=image_bcc3[row])
                for row, k in enumerate(self.sample_numbers(i))]
    _, texts, categories, datasets = zip(*examples)
    ids_bl, lengths_b = tokenizer_lib.tokenize(self.tokenizer, texts, self.max_length)
    return {
        'image': image_bcc3,
        'input_ids': ids_bl,
        'lengths': lengths_b,
        'category': np.asarray([self.category_id(c) for c in categories], np.int32),
        'dataset_index': np.asarray(datasets, np.int32),
    }


def pretraining_builder(
    sources: Sequence, *, batch_size: int, seed: int, tokenizer,
    knowledge: str | Mapping[str, Sequence[str]] | None = knowledge_lib.DEFAULT_DICTIONARY,
    canvas: int = 512, sampling: str = 'balanced', epoch_length: int | None = None,
    num_epochs: int | None = None,
    banned_categories: Sequence[str] | None = categories_lib.BANNED_CATEGORY_WORDS,
    template: str = captions_lib.CAPTION_TEMPLATE,
    skip_datasets: Sequence[str] = knowledge_lib.SKIP_DATASETS,
    category_id: Callable[[str], int] | None = None,
    process_index: int | None = None, process_count: int | None = None,
    max_length: int = tokenizer_lib.MAX_LENGTH,
    index: sampling_lib.AssemblyIndex | None = None,
) -> tuple[PretrainingBatch, int, sampling_lib.AssemblyIndex]:
  """The pre-training input: ``build(i)`` makes batch ``i`` of ``num_batches``.

  Args:
    sources: random-access sources of examples (``image``, ``dataset``,
      ``categories``, ``attributes``), e.g. ``tfds.data_source(...)``
      splits; several are pooled and grouped by their ``dataset`` field.
    batch_size: per-process batch size ``b``.
    seed: everything random derives from it.
    tokenizer: a transformers BERT tokenizer (``tokenizer.load_tokenizer``).
    knowledge: dictionary name, path or mapping; ``None`` turns off the
      expert-knowledge substitution.
    canvas: square canvas side; stored images must have it as longest side.
    sampling: ``'balanced'`` (FLAIR's default) or ``'shuffled'``.
    epoch_length: samples per epoch; default the number of kept examples.
    num_epochs: ``None`` for an endless stream. Batches run across epoch
      boundaries (no remainder is dropped there); the stream ends after
      ``num_epochs * epoch_length // (P*b)`` batches.
    banned_categories: held-out words (FLAIR's list); ``None`` keeps all.
    template, skip_datasets: the caption template and the datasets never
      rewritten with expert knowledge.
    category_id: category name -> int id; ``data_pipelines.categories``'s
      by default.
    process_index, process_count: this process's shard; default JAX's
      (JAX is imported only then).
    max_length: static token length.
    index: a precomputed ``index_sources(sources, banned_categories)``.
  Returns:
    ``(build, num_batches, index)``.
  """
  process_index, process_count = _process_index_and_count(process_index, process_count)
  if index is None:
    index = sampling_lib.index_sources(sources, banned_categories)
  if isinstance(knowledge, str) or hasattr(knowledge, '__fspath__'):
    knowledge = knowledge_lib.load_knowledge(knowledge)
  sampler = sampling_lib.Sampler(index, seed=seed, sampling=sampling, epoch_length=epoch_length)
  make_batch = PretrainingBatch(
      sources, sampler, batch_size=batch_size, process_index=process_index,
      process_count=process_count, tokenizer=tokenizer, knowledge=knowledge, canvas=canvas,
      category_id=category_id or categories_lib.category_id, template=template,
      skip_datasets=skip_datasets, max_length=max_length)
  global_batch = batch_size * process_count
  if num_epochs is None:
    num_batches = _ENDLESS_BATCHES
  else:
    num_batches = num_epochs * sampler.epoch_length // global_batch
  if num_batches < 1:
    raise ValueError(f'{num_epochs} epoch(s) of {sampler.epoch_length} samples hold no global '
                     f'batch of {global_batch}; expected epoch_length * num_epochs >= batch')
  return make_batch, num_batches, index


def pretraining_batches(sources: Sequence, **kwargs
                        ) -> tuple[grain.MapDataset, sampling_lib.AssemblyIndex]:
  """The pre-training input as a ``grain.MapDataset``: element ``i`` is batch ``i``.

  Takes the arguments of ``pretraining_builder``; returns ``(batches, index)``.
  """
  build, num_batches, index = pretraining_builder(sources, **kwargs)
  return grain.MapDataset.range(num_batches).map(build), index


def make_pretraining_iterator(sources: Sequence, *, batch_size: int, seed: int, tokenizer,
                              process_index: int | None = None, process_count: int | None = None,
                              worker_count: int = 0, read_threads: int = 1, prefetch: int = 2,
                              **kwargs) -> BatchIterator:
  """The pre-training batch iterator (see ``pretraining_builder`` for the arguments).

  Args:
    worker_count: grain worker processes (0: batches built in this process).
    read_threads: threads building batches inside each process.
    prefetch: batches buffered per worker and per reader.
  Returns:
    a ``BatchIterator``: ``next()`` gives a batch dict; ``get_state()`` is
    ``{'next_batch', 'seed', 'global_batch_size', 'epoch_length',
    'sampling'}`` (JSON); ``.index`` is the ``AssemblyIndex``;
    orbax saves it with ``grain.checkpoint.CheckpointSave(iterator)`` and
    restores into a freshly made iterator with
    ``grain.checkpoint.CheckpointRestore(iterator)``. ``close()`` it when it
    has workers.
  """
  process_index, process_count = _process_index_and_count(process_index, process_count)
  build, num_batches, index = pretraining_builder(
      sources, batch_size=batch_size, seed=seed, tokenizer=tokenizer,
      process_index=process_index, process_count=process_count, **kwargs)
  fingerprint = {'seed': int(seed), 'global_batch_size': batch_size * process_count,
                 'epoch_length': int(kwargs.get('epoch_length') or index.size),
                 'sampling': kwargs.get('sampling', 'balanced')}
  return BatchIterator(build, num_batches, worker_count=worker_count, read_threads=read_threads,
                       prefetch=prefetch, fingerprint=fingerprint, index=index)
