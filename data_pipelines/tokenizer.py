"""BERT WordPiece tokenization to FLAIR's static length of 77, and text buckets.

PyTorch FLAIR pads each batch to its longest caption (``padding=True``);
here every batch is padded to 77 on the host and the true lengths travel
with the ids (attention mask = position < length). Before a batch goes to
the device its ids are cut to the smallest of a few fixed widths holding its
longest text (``bucket_length``): a jitted function compiles once per
width, not once per batch, and FLAIR's pooling (a mean over the positions
before the batch's longest length) gives the same numbers at every width.

transformers 5 folded the slow and fast BERT tokenizers into one class whose
vocabulary argument is ``vocab``: ``BertTokenizer(vocab_file=...)`` (and the
``BertTokenizerFast`` alias) silently ignores the file and keeps a 5-token
vocabulary. ``load_tokenizer`` therefore passes ``vocab=``.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers

MAX_LENGTH = 77
# Widths a batch of texts is cut to (the ids' own width, 77, is the last).
TEXT_BUCKETS = (16, 24, 32, 48, 64)
SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def load_tokenizer(name_or_path: str | os.PathLike, *, do_lower_case: bool = True,
                   max_length: int = MAX_LENGTH):
  """A ``BertTokenizer`` from a folder, a hub id or a ``vocab.txt`` file.

  Args:
    name_or_path: a tokenizer folder or hub id (``from_pretrained``; its own
      config decides lower-casing) or the path of a WordPiece ``vocab.txt``.
    do_lower_case: for a bare ``vocab.txt`` only. ``True`` is what
      ``AutoTokenizer.from_pretrained('emilyalsentzer/Bio_ClinicalBERT')``
      does (that repo has no tokenizer config), so it is FLAIR's behaviour.
    max_length: stored as ``model_max_length``.
  Returns:
    a ``transformers.BertTokenizer``.
  """
  import transformers  # pylint: disable=g-import-not-at-top

  path = os.fspath(name_or_path)
  if os.path.isfile(path):
    tokenizer = transformers.BertTokenizer(vocab=path, do_lower_case=do_lower_case)
    if len(tokenizer) <= len(SPECIAL_TOKENS):
      raise ValueError(f'vocabulary {path!r} gave only {len(tokenizer)} tokens; expected one '
                       'WordPiece token per line')
  else:
    tokenizer = transformers.BertTokenizer.from_pretrained(path)
  tokenizer.model_max_length = max_length
  return tokenizer


class StaticTokenizer:
  """A transformers tokenizer's own backend, set to pad and truncate to one length.

  Gives what ``tokenizer(texts, padding='max_length', truncation=True,
  max_length=...)`` gives (transformers configures the same backend the same
  way) without importing transformers, so worker processes start faster.
  """

  def __init__(self, tokenizer, max_length: int = MAX_LENGTH):
    self.max_length = max_length
    self.pad_token_id = tokenizer.pad_token_id
    self.pad_token = tokenizer.pad_token
    self._json = tokenizer.backend_tokenizer.to_str()
    self._backend = None

  def __getstate__(self):
    return {**self.__dict__, '_backend': None}

  def __call__(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    if self._backend is None:
      backend = tokenizers.Tokenizer.from_str(self._json)
      backend.enable_truncation(self.max_length)
      backend.enable_padding(length=self.max_length, pad_id=self.pad_token_id,
                             pad_token=self.pad_token)
      self._backend = backend
    encodings = self._backend.encode_batch(list(texts))
    ids_bl = np.asarray([e.ids for e in encodings], np.int32).reshape(len(texts), self.max_length)
    mask_bl = np.asarray([e.attention_mask for e in encodings], np.int32)
    return ids_bl, mask_bl.reshape(len(texts), self.max_length).sum(1).astype(np.int32)


def bucket_length(longest: int, width: int, buckets: Sequence[int] = TEXT_BUCKETS) -> int:
  """The smallest of ``buckets`` holding ``longest`` tokens, else ``width``
  (the ids' padded width); never more than ``width``."""
  for b in sorted(buckets):
    if longest <= b < width:
      return int(b)
  return int(width)


def cut_to_bucket(ids_bl: np.ndarray, lengths_b: np.ndarray,
                  buckets: Sequence[int] = TEXT_BUCKETS, longest: int | None = None
                  ) -> np.ndarray:
  """``ids_bl[:, :bucket]``: the ids cut to the bucket of the longest text
  (``longest``, default that of ``lengths_b``; pass a larger one agreed
  with other processes)."""
  if longest is None:
    longest = int(np.max(lengths_b)) if len(lengths_b) else 0
  return ids_bl[:, :bucket_length(longest, ids_bl.shape[1], buckets)]


def tokenize(tokenizer, texts: Sequence[str], max_length: int = MAX_LENGTH
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token ids padded (and truncated) to a static length.

  Args:
    tokenizer: a transformers tokenizer or a ``StaticTokenizer`` (whose own
      length then applies).
  Returns:
    ``(ids_bl int32 [N, max_length], lengths_b int32 [N])``; the ids of
    sequence ``n`` at positions ``>= lengths[n]`` are the pad id.
  """
  if isinstance(tokenizer, StaticTokenizer):
    if tokenizer.max_length != max_length:
      raise ValueError(f'StaticTokenizer pads to {tokenizer.max_length}, asked for {max_length}')
    return tokenizer(texts)
  encoded = tokenizer(list(texts), padding='max_length', truncation=True, max_length=max_length,
                      return_attention_mask=True, return_token_type_ids=False)
  ids_bl = np.asarray(encoded['input_ids'], np.int32).reshape(len(texts), max_length)
  lengths_b = np.asarray(encoded['attention_mask'], np.int32).reshape(len(texts), max_length).sum(1)
  return ids_bl, lengths_b.astype(np.int32)


def build_wordpiece_vocab(texts: Iterable[str], out_dir: str | os.PathLike, *,
                          vocab_size: int = 2048, lowercase: bool = True, min_frequency: int = 1,
                          max_length: int = MAX_LENGTH):
  """Builds a small WordPiece vocabulary and saves a loadable tokenizer folder.

  For an offline text tower trained from scratch (no Bio_ClinicalBERT). The
  text is normalised and split into words by the ``tokenizers`` library's
  BERT normaliser and pre-tokenizer; the vocabulary is the special tokens,
  every character (alone and as a ``##`` continuation) and the most frequent
  whole words (ties in alphabetical order). Unlike a trained WordPiece
  model, whose merge ties are broken by hash order, the same texts always
  give the same file, so token ids are reproducible across runs and hosts.
  The folder gets ``vocab.txt`` and the tokenizer config;
  ``BertTokenizer.from_pretrained(out_dir)`` and ``load_tokenizer(out_dir)``
  read it back.

  Args:
    texts: sentences (e.g. captions and expert descriptions).
    out_dir: folder to write (created if missing).
    vocab_size: upper bound on the vocabulary; whole words beyond it are
      left to character pieces.
    lowercase: lower-case (and strip accents) first, as uncased BERT does.
    min_frequency: minimum count of a whole word.
  Returns:
    the ``transformers.BertTokenizer``, ``model_max_length = max_length``.
  """
  import collections  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  normalizer = tokenizers.normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
  splitter = tokenizers.pre_tokenizers.BertPreTokenizer()
  counts = collections.Counter()
  for text in texts:
    counts.update(w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
  chars = sorted({c for w in counts for c in w})
  vocab = list(SPECIAL_TOKENS) + chars + [f'##{c}' for c in chars]
  words = sorted((w for w, n in counts.items() if n >= min_frequency and len(w) > 1),
                 key=lambda w: (-counts[w], w))
  vocab += words[:max(0, vocab_size - len(vocab))]
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  vocab_file = os.path.join(out_dir, 'vocab.txt')
  with open(vocab_file, 'w', encoding='utf-8') as f:
    f.write('\n'.join(vocab) + '\n')
  tokenizer = transformers.BertTokenizer(vocab=vocab_file, do_lower_case=lowercase,
                                         strip_accents=lowercase, model_max_length=max_length)
  tokenizer.save_pretrained(out_dir)
  return tokenizer
