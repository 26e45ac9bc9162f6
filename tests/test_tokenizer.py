"""Tokenization to static length 77 against transformers' own pad-to-longest output."""

import pickle

import numpy as np
import pytest
import transformers

from data_pipelines import tokenizer as tokenizer_lib

VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'fundus', 'photograph', 'of', 'normal',
         'glau', '##coma', 'clean', '.', 'Optic']
TEXTS = ['A clean fundus photograph of glaucoma', 'A fundus photograph of normal', 'optic disc',
         'normal ' * 100]


@pytest.fixture(scope='module')
def vocab_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('vocab') / 'vocab.txt'
  path.write_text('\n'.join(VOCAB) + '\n', encoding='utf-8')
  return path


def test_vocab_file_is_really_used(vocab_file):
  tok = tokenizer_lib.load_tokenizer(vocab_file)
  assert len(tok) == len(VOCAB)
  assert tok.model_max_length == 77
  ids = tok('A fundus photograph of glaucoma zebra')['input_ids']
  # [CLS] a fundus photograph of glau ##coma [UNK] [SEP]
  assert ids == [2, 5, 6, 7, 8, 10, 11, 1, 3]


def test_vocab_file_case_follows_do_lower_case(vocab_file):
  cased = tokenizer_lib.load_tokenizer(vocab_file, do_lower_case=False)
  assert cased('Optic optic')['input_ids'] == [2, 14, 1, 3]
  uncased = tokenizer_lib.load_tokenizer(vocab_file)
  assert uncased('Optic optic')['input_ids'] == [2, 1, 1, 3]


def test_static_padding_matches_pad_to_longest(vocab_file):
  tok = tokenizer_lib.load_tokenizer(vocab_file)
  ids_bl, lengths_b = tokenizer_lib.tokenize(tok, TEXTS)
  assert ids_bl.dtype == np.int32 and lengths_b.dtype == np.int32
  assert ids_bl.shape == (len(TEXTS), 77)
  reference = tok(TEXTS, padding=True, truncation=True)  # FLAIR's call
  ref_ids = np.asarray(reference['input_ids'])
  ref_mask = np.asarray(reference['attention_mask'])
  assert ref_ids.shape[1] == 77  # the long text truncates to model_max_length
  np.testing.assert_array_equal(lengths_b, ref_mask.sum(1))
  for n in range(len(TEXTS)):
    np.testing.assert_array_equal(ids_bl[n, :lengths_b[n]], ref_ids[n, :lengths_b[n]])
    assert (ids_bl[n, lengths_b[n]:] == tok.pad_token_id).all()
  assert lengths_b[-1] == 77 and ids_bl[-1, -1] == tok.sep_token_id


def test_static_tokenizer_equals_transformers_and_pickles(vocab_file):
  tok = tokenizer_lib.load_tokenizer(vocab_file)
  static = pickle.loads(pickle.dumps(tokenizer_lib.StaticTokenizer(tok)))
  for got, want in zip(tokenizer_lib.tokenize(static, TEXTS), tokenizer_lib.tokenize(tok, TEXTS)):
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32
  with pytest.raises(ValueError, match='77'):
    tokenizer_lib.tokenize(static, TEXTS, max_length=64)


def test_wordpiece_vocab_round_trips_through_from_pretrained(tmp_path):
  corpus = ['A fundus photograph of glaucoma', 'A clean fundus photograph of normal',
            'Optic disc cupping', 'few microaneurysms'] * 5
  built = tokenizer_lib.build_wordpiece_vocab(corpus, tmp_path, vocab_size=200, lowercase=True)
  loaded = transformers.BertTokenizer.from_pretrained(tmp_path)
  assert len(loaded) == len(built) > len(tokenizer_lib.SPECIAL_TOKENS)
  vocab_lines = (tmp_path / 'vocab.txt').read_text(encoding='utf-8').splitlines()
  assert vocab_lines[:5] == list(tokenizer_lib.SPECIAL_TOKENS)
  assert len(vocab_lines) == len(loaded)
  ids = loaded('Optic disc cupping')['input_ids']
  assert ids == built('optic DISC cupping')['input_ids']
  assert loaded.unk_token_id not in ids
  tokens = loaded.convert_ids_to_tokens(ids)
  assert tokens[0] == '[CLS]' and tokens[-1] == '[SEP]' and 'optic' in tokens
  reloaded = tokenizer_lib.load_tokenizer(tmp_path)
  assert reloaded.model_max_length == 77
  assert reloaded('optic')['input_ids'] == built('optic')['input_ids']


def test_bucket_is_the_smallest_width_holding_the_longest_text():
  buckets = (16, 24, 32, 48, 64)
  got = [tokenizer_lib.bucket_length(n, 77, buckets) for n in (0, 1, 16, 17, 24, 25, 64, 65, 77)]
  assert got == [16, 16, 16, 24, 24, 32, 64, 77, 77]
  assert tokenizer_lib.bucket_length(20, 77, ()) == 77  # no buckets: the full width
  assert tokenizer_lib.bucket_length(10, 12, buckets) == 12  # never wider than the ids
  ids = np.arange(4 * 77).reshape(4, 77)
  lengths = np.array([3, 20, 5, 1])
  np.testing.assert_array_equal(tokenizer_lib.cut_to_bucket(ids, lengths), ids[:, :24])
  # A longer text elsewhere (another process's rows) widens the cut.
  assert tokenizer_lib.cut_to_bucket(ids, lengths, longest=50).shape == (4, 64)
