"""The category vocabulary: contents from the reference dictionaries, stable
ids, unknown names, user extensions and FLAIR's held-out rule."""

import hashlib
import json

import pytest

from data_pipelines import categories
from data_pipelines import synthetic
from tests.test_captions import KNOWLEDGE_SHA256, shipped_knowledge_bytes

FLAIR_BANNED = ['myopia', 'cataract', 'macular hole', 'retinitis pigmentosa',
                'myopic', 'myope', 'myop', 'retinitis']


def test_vocabulary_is_sorted_union_of_dictionaries_banned_and_synthetic():
  keys = set()
  for name, digest in KNOWLEDGE_SHA256.items():  # The reference files, pinned by digest.
    raw = shipped_knowledge_bytes(name)
    assert hashlib.sha256(raw).hexdigest() == digest, name
    keys |= set(json.loads(raw.decode('utf-8')))
  expected = sorted(keys | set(FLAIR_BANNED) | set(synthetic.CATEGORIES))
  assert categories.CATEGORIES == ('',) + tuple(expected)
  assert len(categories.CATEGORIES) == 116


@pytest.mark.parametrize('name, expected_id', [
    ('', 0), ('Bietti crystalline dystrophy', 1), ('drusens', 31),
    ('glaucoma', 36), ('haemorrhages', 37), ('hard exudates', 40),
    ('microaneurysms', 54), ('myop', 60), ('normal', 82),
    ('yellow-white spots flecks', 115)])
def test_ids_are_stable(name, expected_id):
  # Pinned: a change here changes the label ids of every built dataset.
  assert categories.category_id(name) == expected_id
  assert categories.category_name(expected_id) == name


def test_unknown_name_raises_key_error_naming_close_matches():
  with pytest.raises(KeyError, match="unknown category 'glaucomma'.*'glaucoma'"):
    categories.category_id('glaucomma')
  with pytest.raises(KeyError, match='outside'):
    categories.category_name(len(categories.CATEGORIES))


def test_user_file_appends_after_shipped_names(tmp_path):
  extra = tmp_path / 'extra.txt'
  extra.write_text('# my sets\nno diabetic macular edema\n\nglaucoma\nhealthy\n'
                   'no diabetic macular edema\n')
  vocab = categories.load_vocabulary(extra)
  n = len(categories.CATEGORIES)
  assert vocab.names[:n] == categories.CATEGORIES
  assert vocab.names[n:] == ('no diabetic macular edema', 'healthy')
  assert categories.category_id('healthy', vocab) == n + 1
  assert 'healthy' not in categories.VOCABULARY


def test_names_with_surrounding_spaces_are_refused(tmp_path):
  extra = tmp_path / 'extra.txt'
  extra.write_text('glaucoma \n')
  with pytest.raises(ValueError, match='spaces'):
    categories.load_vocabulary(extra)


def flair_banned(cats, banned):
  # FLAIR's loop in pretraining/data/dataloader.py, restated.
  banned_flag = False
  for cat in cats:
    for word in banned:
      if word in cat:
        banned_flag = True
  return banned_flag


@pytest.mark.parametrize('cats', [
    [], ['glaucoma'], ['cataract'], ['no cataract'], ['normal', 'macular hole'],
    ['myopic maculopathy grade one'], ['chorioretinitis'], ['Myopia'],
    ['pathologic myopia', 'normal'], ['retinitis pigmentosa'], ['drusens']])
def test_banned_rule_matches_flair(cats):
  assert categories.BANNED_CATEGORY_WORDS == tuple(FLAIR_BANNED)
  assert categories.is_banned(cats) == flair_banned(cats, FLAIR_BANNED)


def test_banned_rule_examples():
  assert categories.is_banned(['no cataract'])  # Substring, as FLAIR.
  assert not categories.is_banned(['Myopia'])  # Case-sensitive, as FLAIR.
  assert not categories.is_banned(['glaucoma', 'normal'])
  assert not categories.is_banned(['myopia'], banned=())


def test_synthetic_findings_are_in_the_vocabulary():
  for name in synthetic.CATEGORIES:
    assert categories.category_id(name) > 0
