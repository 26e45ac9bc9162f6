"""The grain pre-training pipeline on small in-memory sources.

Each stored image carries its identity in pixel (0, 0) = (source, record, 7),
so a test reads which example a batch row came from without asking the
pipeline.
"""

import collections
import io
import json
import os
import subprocess

import grain
import numpy as np
import PIL.Image
import pytest
from scipy import stats

from data_pipelines import batch_memory
from data_pipelines import categories as categories_lib
from data_pipelines import knowledge as knowledge_lib
from data_pipelines import pipeline
from data_pipelines import sampling
from data_pipelines import tokenizer as tokenizer_lib

CANVAS = 16
SEED = 3
KNOWLEDGE = knowledge_lib.load_knowledge('flair_repo')
# (dataset, categories, attributes) per record; two sources pooled.
RECORDS = (
    [('02_MESSIDOR', ['normal'], ['clean']), ('11_STARE', ['glaucoma'], []),
     ('02_MESSIDOR', ['mild diabetic retinopathy'], []),
     ('02_MESSIDOR', ['glaucoma', 'normal'], ['clean']),
     ('11_STARE', ['normal', 'glaucoma'], ['clean']), ('02_MESSIDOR', ['normal'], []),
     ('02_MESSIDOR', ['cataract'], []), ('11_STARE', ['glaucoma'], ['clean']),
     ('02_MESSIDOR', [], ['clean']), ('02_MESSIDOR', ['glaucoma'], [])],
    [('23_HRF', ['normal'], ['clean']) if r % 3 else ('23_HRF', ['glaucoma'], [])
     for r in range(9)] + [('23_HRF', ['myopic maculopathy grade one'], []),
                           ('23_HRF', ['normal', 'cataract'], ['clean'])],
)
KEPT = {'02_MESSIDOR': 6, '11_STARE': 3, '23_HRF': 9}
BANNED = 3


def _encode(array, fmt):
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def _image(rng, s, r):
  long_side_first = (s + r) % 2 == 0
  short = int(rng.integers(CANVAS // 2, CANVAS + 1))
  shape = (CANVAS, short, 3) if long_side_first else (short, CANVAS, 3)
  image = rng.integers(0, 256, shape, dtype=np.uint8)
  image[0, 0] = (s, r, 7)
  return image


def make_sources():
  rng = np.random.default_rng(0)
  sources = []
  for s, records in enumerate(RECORDS):
    examples = []
    for r, (dataset, cats, attrs) in enumerate(records):
      image = _image(rng, s, r)
      examples.append({
          'image': image if r % 2 else _encode(image, 'PNG'),
          'dataset': dataset.encode(),
          'categories': np.array([c.encode() for c in cats], dtype=object),
          'attributes': np.array([a.encode() for a in attrs], dtype=object),
          'original_size': np.array(image.shape[:2], np.int32), 'path': b'x.png'})
    sources.append(examples)
  return sources


def _identity(image):
  s, r, tag = image[0, 0]
  assert tag == 7
  return int(s), int(r)


def _possible_captions(dataset, attributes, category):
  names = [category]
  if dataset not in knowledge_lib.SKIP_DATASETS and category in KNOWLEDGE:
    names += KNOWLEDGE[category]
  out = set()
  for attribute in attributes or ['']:
    for name in names:
      out.add(' '.join(f'A {attribute} fundus photograph of {name}'.split()).lower())
  return out


@pytest.fixture(scope='module')
def sources():
  return make_sources()


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  corpus = [f'A clean fundus photograph of {c} {" ".join(d)}' for c, d in KNOWLEDGE.items()]
  return tokenizer_lib.build_wordpiece_vocab(corpus, tmp_path_factory.mktemp('tok'), vocab_size=400)


@pytest.fixture(scope='module')
def index(sources):
  return sampling.index_sources(sources)


def _iterator(sources, tokenizer, index, **kwargs):
  settings = dict(batch_size=4, seed=SEED, tokenizer=tokenizer, canvas=CANVAS, epoch_length=10,
                  process_index=0, process_count=1, index=index)
  settings.update(kwargs)
  return pipeline.make_pretraining_iterator(sources, **settings)


@pytest.fixture(scope='module')
def reference_batches(sources, tokenizer, index):
  iterator = _iterator(sources, tokenizer, index)
  return [next(iterator) for _ in range(8)]


def _assert_same(batches, expected):
  assert len(batches) == len(expected)
  for got, want in zip(batches, expected):
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_index_groups_by_dataset_and_drops_banned(sources, index):
  assert index.datasets == tuple(sorted(KEPT))
  assert index.counts() == KEPT and index.num_banned == BANNED and index.size == sum(KEPT.values())
  for name, records in zip(index.datasets, index.records):
    for s, r in records:
      dataset, cats, _ = RECORDS[s][r]
      assert dataset == name
      assert not any(w in c for c in cats for w in categories_lib.BANNED_CATEGORY_WORDS)
  assert sampling.index_sources(sources, banned_categories=None).size == sum(map(len, RECORDS))


def test_balanced_sampling_gives_equal_dataset_shares_and_uniform_images(index):
  length = 3000
  sampler = sampling.Sampler(index, seed=SEED, sampling='balanced', epoch_length=length)
  per_record = collections.Counter()
  for epoch in range(2):
    per_dataset = collections.Counter()
    for k in range(epoch * length, (epoch + 1) * length):
      d, s, r = sampler.locate(k, sampling.sample_rng(SEED, k))
      assert RECORDS[s][r][0] == index.datasets[d]
      per_dataset[d] += 1
      per_record[(s, r)] += 1
    # FLAIR: a permutation of range(length), dataset = index mod 3: exactly a third each.
    assert per_dataset == {0: 1000, 1: 1000, 2: 1000}
  kept = {(int(s), int(r)) for records in index.records for s, r in records}
  assert set(per_record) == kept  # banned records never drawn
  for d, records in enumerate(index.records):
    counts = [per_record[(int(s), int(r))] for s, r in records]
    assert sum(counts) == 2000
    assert stats.chisquare(counts).pvalue > 1e-4, (index.datasets[d], counts)


def test_balanced_order_is_a_fresh_permutation_each_epoch(index):
  sampler = sampling.Sampler(index, seed=SEED, epoch_length=300)
  epochs = [[sampler.locate(k, sampling.sample_rng(SEED, k))[0]
             for k in range(e * 300, (e + 1) * 300)] for e in range(2)]
  assert epochs[0] != epochs[1]
  # Positions in a row agree with dataset i mod 3 only by chance (a shuffled loader).
  assert np.mean(np.asarray(epochs[0]) == np.arange(300) % 3) < 0.6


def test_shuffled_sampling_visits_each_kept_example_once_per_epoch(index):
  sampler = sampling.Sampler(index, seed=SEED, sampling='shuffled')
  n = index.size
  epochs = [[sampler.locate(k, None)[1:] for k in range(e * n, (e + 1) * n)] for e in range(2)]
  kept = sorted((int(s), int(r)) for records in index.records for s, r in records)
  assert sorted(epochs[0]) == kept and sorted(epochs[1]) == kept
  assert epochs[0] != epochs[1]
  with pytest.raises(ValueError, match='balanced'):
    sampling.Sampler(index, seed=SEED, sampling='shuffled', epoch_length=n + 1)


def test_batches_hold_padded_images_and_consistent_captions(sources, tokenizer, reference_batches):
  for batch in reference_batches:
    assert batch['image'].dtype == np.uint8 and batch['image'].shape == (4, CANVAS, CANVAS, 3)
    assert batch['input_ids'].dtype == np.int32 and batch['input_ids'].shape == (4, 77)
    for key in ('lengths', 'category', 'dataset_index'):
      assert batch[key].dtype == np.int32 and batch[key].shape == (4,)
    for row in range(4):
      s, r = _identity(batch['image'][row])
      dataset, cats, attrs = RECORDS[s][r]
      stored = sources[s][r]['image']
      if not isinstance(stored, np.ndarray):
        stored = np.asarray(PIL.Image.open(io.BytesIO(stored)))
      original = stored
      h, w, _ = original.shape
      np.testing.assert_array_equal(batch['image'][row, :h, :w], original)
      assert not batch['image'][row, h:].any() and not batch['image'][row, :, w:].any()
      assert batch['dataset_index'][row] == sorted(KEPT).index(dataset)
      category = categories_lib.category_name(batch['category'][row])
      assert category in cats or (category == '' and not cats)
      length = batch['lengths'][row]
      assert (batch['input_ids'][row, length:] == tokenizer.pad_token_id).all()
      assert (batch['input_ids'][row, :length] != tokenizer.pad_token_id).all()
      caption = tokenizer.decode(batch['input_ids'][row, :length], skip_special_tokens=True)
      assert caption in _possible_captions(dataset, attrs, category), (caption, dataset, category)


def test_same_seed_gives_the_same_stream_and_another_seed_does_not(sources, tokenizer, index,
                                                                   reference_batches):
  again = _iterator(sources, tokenizer, index)
  _assert_same([next(again) for _ in range(3)], reference_batches[:3])
  other = next(_iterator(sources, tokenizer, index, seed=SEED + 1))
  assert not np.array_equal(other['image'], reference_batches[0]['image'])


@pytest.mark.parametrize('position', [0, 1, 2, 5])
def test_checkpoint_round_trip_resumes_the_same_batches(sources, tokenizer, index,
                                                        reference_batches, position):
  # epoch_length 10, batch 4: batch 2 holds samples 8-11 and straddles the first epoch boundary.
  original = _iterator(sources, tokenizer, index)
  for _ in range(position):
    next(original)
  state = json.loads(json.dumps(original.get_state()))
  assert state['next_batch'] == position
  restored = _iterator(sources, tokenizer, index)
  restored.set_state(state)
  _assert_same([next(restored) for _ in range(3)], reference_batches[position:position + 3])


def test_orbax_checkpoint_round_trip(sources, tokenizer, index, reference_batches, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  iterator = _iterator(sources, tokenizer, index)
  for _ in range(3):
    next(iterator)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  fresh = _iterator(sources, tokenizer, index)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same([next(fresh) for _ in range(2)], reference_batches[3:5])


def test_state_from_other_settings_is_refused(sources, tokenizer, index, reference_batches):
  iterator = _iterator(sources, tokenizer, index)
  with pytest.raises(ValueError, match='seed'):
    iterator.set_state({'next_batch': 1, 'seed': SEED + 1})
  with pytest.raises(ValueError, match='global_batch_size'):
    iterator.set_state({'next_batch': 1, 'global_batch_size': 8})


def _slot_files():
  """This process's slot files in /dev/shm."""
  return batch_memory.leftover_names(f'{batch_memory.PREFIX}{os.getpid()}_')


def test_two_workers_give_the_zero_worker_batches_after_a_restore(sources, tokenizer, index,
                                                                  reference_batches):
  iterator = _iterator(sources, tokenizer, index, worker_count=2)
  try:
    iterator.set_state({'next_batch': 2})
    batches = [next(iterator) for _ in range(4)]
    assert iterator.get_state()['next_batch'] == 6
    iterator.set_state({'next_batch': 1})  # restarts the workers (and their slots)
    batches += [next(iterator) for _ in range(3)]
  finally:
    iterator.close()
  assert not _slot_files()
  if batch_memory.available():
    assert iterator.transfer_counts == {'shared_memory': 7, 'fallback': 0}
  # The held batches outlive close(): their pages stay mapped while arrays use them.
  _assert_same(batches, reference_batches[2:6] + reference_batches[1:4])


def test_held_batches_are_never_overwritten_and_released_slots_are_reused(sources, tokenizer,
                                                                           index):
  settings = dict(batch_size=4, seed=SEED, tokenizer=tokenizer, canvas=CANVAS, epoch_length=10,
                  process_index=0, process_count=1, index=index)
  build, _, _ = pipeline.pretraining_builder(sources, **settings)
  iterator = _iterator(sources, tokenizer, index, worker_count=1, read_threads=0, prefetch=1)
  slots = iterator._slots_per_worker()  # pylint: disable=protected-access
  try:
    held = [next(iterator) for _ in range(slots + 4)]
    for i, batch in enumerate(held):
      _assert_same([batch], [build(i)])
    counts = dict(iterator.transfer_counts)
    del held, batch
    later = [(next(iterator)['image'][:, :2].copy(), i) for i in range(slots + 4, 3 * slots)]
  finally:
    iterator.close()
  if batch_memory.available():
    assert counts['shared_memory'] <= slots and counts['fallback'] >= 4
    assert iterator.transfer_counts['shared_memory'] > slots  # slots came back and were reused
  for image, i in later:
    np.testing.assert_array_equal(image, build(i)['image'][:, :2])
  assert not _slot_files()


def test_a_bad_image_in_a_worker_raises_as_in_process_and_leaves_no_slot(sources, tokenizer,
                                                                         index):
  wrong_canvas = [[dict(e, image=np.zeros((CANVAS // 2, CANVAS // 2, 3), np.uint8)) for e in s]
                  for s in sources]
  for worker_count in (0, 1):
    iterator = _iterator(wrong_canvas, tokenizer, index, worker_count=worker_count)
    try:
      with pytest.raises(ValueError, match='the canvas is 16'):
        next(iterator)
    finally:
      iterator.close()
  assert not _slot_files()


def test_slot_files_of_a_dead_main_process_are_removed():
  if not batch_memory.available():
    pytest.skip('no /dev/shm')
  dead = subprocess.Popen(['true'])  # a main process killed before it could clean up
  dead.wait()
  stale, alive = (f'{batch_memory.PREFIX}{pid}_test_1_0' for pid in (dead.pid, os.getpid()))
  for name in (stale, alive):
    with open(os.path.join(batch_memory.SHM_DIR, name), 'wb'):
      pass
  try:
    assert batch_memory.remove_stale() >= 1
    assert stale not in batch_memory.leftover_names()
    assert alive in batch_memory.leftover_names()
  finally:
    for name in set(batch_memory.leftover_names()) & {stale, alive}:
      os.unlink(os.path.join(batch_memory.SHM_DIR, name))


def test_process_shards_make_up_the_single_process_batch(sources, tokenizer, index):
  whole, _ = pipeline.pretraining_batches(sources, batch_size=6, seed=SEED, tokenizer=tokenizer,
                                          canvas=CANVAS, process_index=0, process_count=1,
                                          index=index)
  shards = [pipeline.pretraining_batches(sources, batch_size=3, seed=SEED, tokenizer=tokenizer,
                                         canvas=CANVAS, process_index=j, process_count=2,
                                         index=index)[0] for j in range(2)]
  for i in range(3):
    joined = {k: np.concatenate([shards[0][i][k], shards[1][i][k]]) for k in whole[i]}
    _assert_same([joined], [whole[i]])


def test_num_epochs_ends_the_stream(sources, tokenizer, index):
  iterator = _iterator(sources, tokenizer, index, num_epochs=2)  # 20 samples, batch 4
  assert len([batch for batch in iterator]) == 5


@pytest.fixture(scope='module')
def synthetic_build(tmp_path_factory):
  from data_pipelines import build as build_lib  # pylint: disable=g-import-not-at-top

  data_dir = tmp_path_factory.mktemp('tfds')
  report = build_lib.build('fundus_synthetic', data_dir, canvas=32, n_train=40, n_test=7,
                           verbose=False)
  return report['tfds_name'], data_dir


def test_built_fundus_synthetic_through_tfds_data_source(synthetic_build, tokenizer):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name, data_dir = synthetic_build
  train = tfds.data_source(name, split='train', data_dir=data_dir, download=False)
  encoded = tfds.data_source(name, split='train', data_dir=data_dir, download=False,
                             decoders={'image': tfds.decode.SkipDecoding()})
  assert isinstance(encoded[0]['image'], bytes) and isinstance(train[0]['image'], np.ndarray)
  examples = [train[i] for i in range(len(train))]
  index = sampling.index_sources([train])
  assert index.counts() == dict(collections.Counter(e['dataset'].decode() for e in examples))
  settings = dict(batch_size=8, seed=SEED, tokenizer=tokenizer, canvas=32, process_index=0,
                  process_count=1)
  decoded_batches, _ = pipeline.pretraining_batches([train], **settings)
  encoded_batches, _ = pipeline.pretraining_batches([encoded], **settings)
  for i in range(3):
    batch = decoded_batches[i]
    _assert_same([encoded_batches[i]], [batch])
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].any()
    for row in range(8):
      dataset = index.datasets[batch['dataset_index'][row]]
      allowed = {categories_lib.category_id(c.decode()) for e in examples
                 if e['dataset'].decode() == dataset for c in e['categories']}
      assert batch['category'][row] in allowed
