"""Captions and expert-knowledge substitution against FLAIR's rules, by hand and by counting."""

import collections
import hashlib
import importlib.resources
import json

import numpy as np
import pytest
from scipy import stats

from data_pipelines import captions
from data_pipelines import knowledge as knowledge_lib

DRAWS = 3000
P_MIN = 1e-4  # chi-square p-value below which a frequency table is not uniform

# SHA-256 of the reference expert_knowledge_*.json: 'flair_repo' is the file in
# FLAIR's repository (jusiro/FLAIR, commit d6652d5, Apache-2.0), the dictionary
# the released weights were trained with; 'seed' is the dictionary of the FLAIR
# slides. The package ships both byte for byte.
KNOWLEDGE_SHA256 = {
    'flair_repo': 'aeb6d4848b065a50271c8afa1ddb9b85444a44a39fdd44cd8437582f855d7302',
    'seed': '95ff7e1dab35ec9a6a65c4ce57154b2b8409dac727e8b27b7d75d7f671db070d',
}
KNOWLEDGE_SIZES = {'flair_repo': 109, 'seed': 36}


def shipped_knowledge_bytes(name):
  """The bytes of data_pipelines/resources/expert_knowledge_{name}.json."""
  resource = importlib.resources.files('data_pipelines') / 'resources' / (
      f'expert_knowledge_{name}.json')
  return resource.read_bytes()


def _assert_uniform(counter, options, draws):
  assert set(counter) == set(options)
  observed = [counter[o] for o in options]
  assert sum(observed) == draws
  assert stats.chisquare(observed).pvalue > P_MIN, counter


def test_shipped_dictionaries_are_flairs_files():
  for name, size in KNOWLEDGE_SIZES.items():
    raw = shipped_knowledge_bytes(name)
    assert hashlib.sha256(raw).hexdigest() == KNOWLEDGE_SHA256[name], name
    reference = json.loads(raw.decode('utf-8'))
    loaded = knowledge_lib.load_knowledge(name)
    assert len(reference) == len(loaded) == size
    assert loaded == {k: tuple(v) for k, v in reference.items()}
    assert list(loaded) == list(reference)


def test_load_knowledge_by_path_and_bad_name(tmp_path):
  path = tmp_path / 'k.json'
  path.write_text(json.dumps({'glaucoma': ['large cup']}))
  assert knowledge_lib.load_knowledge(path) == {'glaucoma': ('large cup',)}
  with pytest.raises(FileNotFoundError, match='flair_repo'):
    knowledge_lib.load_knowledge('flair')
  path.write_text(json.dumps({'glaucoma': 'large cup'}))
  with pytest.raises(ValueError, match='list of strings'):
    knowledge_lib.load_knowledge(path)


def test_default_dictionary_and_skip_list_are_flairs():
  assert knowledge_lib.load_knowledge() == knowledge_lib.load_knowledge('flair_repo')
  assert knowledge_lib.SKIP_DATASETS == ('06_EYENET', '11_STARE', '08_ODIR-5K', '31_JICHI')


@pytest.mark.parametrize('attributes, categories, expected', [
    (['clean'], ['glaucoma'], 'A clean fundus photograph of glaucoma'),
    ([], ['glaucoma'], 'A fundus photograph of glaucoma'),
    (['clean'], [], 'A clean fundus photograph of '),
    ([], [], 'A fundus photograph of '),
])
def test_naive_caption_strings(attributes, categories, expected):
  caption, category = captions.naive_caption(np.random.default_rng(0), attributes, categories)
  assert caption == expected
  assert category == (categories[0] if categories else '')


def test_double_space_is_collapsed_in_one_pass_only():
  # '  ' -> ' ' once, as str.replace: three spaces become two.
  caption, _ = captions.naive_caption(np.random.default_rng(0), [' '], ['x'])
  assert caption == 'A  fundus photograph of x'


def test_attribute_and_category_are_uniform_and_independent():
  rng = np.random.default_rng(1)
  attributes, categories = ['clean', 'noisy', 'blurry'], ['normal', 'glaucoma']
  pairs = collections.Counter()
  for _ in range(DRAWS):
    caption, category = captions.naive_caption(rng, attributes, categories)
    attribute = caption.split(' ')[1]
    assert caption == f'A {attribute} fundus photograph of {category}'
    pairs[(attribute, category)] += 1
  _assert_uniform(pairs, [(a, c) for a in attributes for c in categories], DRAWS)


def test_substitution_is_uniform_over_category_and_descriptions():
  knowledge = knowledge_lib.load_knowledge('flair_repo')
  options = ['glaucoma', *knowledge['glaucoma']]
  rng = np.random.default_rng(2)
  counter = collections.Counter()
  for _ in range(DRAWS):
    caption, category = captions.flair_caption(rng, ['clean'], ['glaucoma'], '02_MESSIDOR',
                                               knowledge)
    assert category == 'glaucoma'
    counter[caption.removeprefix('A clean fundus photograph of ')] += 1
  _assert_uniform(counter, options, DRAWS)


@pytest.mark.parametrize('dataset', knowledge_lib.SKIP_DATASETS)
def test_skip_list_datasets_are_never_substituted(dataset):
  knowledge = knowledge_lib.load_knowledge('flair_repo')
  rng = np.random.default_rng(3)
  for _ in range(200):
    caption, category = captions.flair_caption(rng, [], ['normal', 'glaucoma'], dataset, knowledge)
    assert caption == f'A fundus photograph of {category}'


def test_odir_under_its_pretraining_name_is_substituted():
  # FLAIR skips '08_ODIR-5K' but pre-trains on '08_ODIR': the quirk is kept.
  knowledge = {'normal': ('healthy',)}
  rng = np.random.default_rng(4)
  seen = {captions.flair_caption(rng, [], ['normal'], '08_ODIR', knowledge)[0] for _ in range(100)}
  assert seen == {'A fundus photograph of normal', 'A fundus photograph of healthy'}


def test_substitution_replaces_every_occurrence_like_str_replace():
  knowledge = {'normal': ('healthy',)}
  rng = np.random.default_rng(5)
  seen = {captions.flair_caption(rng, ['normal'], ['normal'], '23_HRF', knowledge)[0]
          for _ in range(100)}
  assert seen == {'A normal fundus photograph of normal', 'A healthy fundus photograph of healthy'}


def test_category_without_descriptions_or_no_knowledge_is_unchanged():
  rng = np.random.default_rng(6)
  assert captions.flair_caption(rng, [], ['glaucoma'], '23_HRF', {'normal': ('x',)})[0] == (
      'A fundus photograph of glaucoma')
  assert captions.flair_caption(rng, [], ['glaucoma'], '23_HRF', None)[0] == (
      'A fundus photograph of glaucoma')


def test_text_values_from_tfds_are_decoded():
  mixed = np.array([b'normal', 'glaucoma'], dtype=object)
  assert captions.as_texts(mixed) == ('normal', 'glaucoma')
  assert captions.as_text(np.bytes_(b'02_MESSIDOR')) == '02_MESSIDOR'
