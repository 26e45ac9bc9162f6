"""FLAIR's training- and test-time augmentation of frozen features (fta, tta).

PyTorch FLAIR's ``AdapterWrapper`` and its adapters: with ``fta`` the
training images are encoded 20 times through the pre-training augmentation
(``flair_jax.training.augment``) and the 20 sets of features concatenated,
round after round, so the linear probe or adapter trains on 20 N samples;
with ``tta`` the test images are encoded 20 times the same way and the
method's logits averaged before the softmax (the binary linear probe's
sigmoid). Fine-tuning's ``fta`` augments its training batches instead
(``finetune``); FLAIR's fine-tuning predicts without test-time augmentation.

Each image's 20 augmented encodings are drawn once, from the seed and the
image's batch, and serve every fold (FLAIR draws new ones in each fold).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from flair_jax.evaluation import adapters, features, linear_probe
from flair_jax.training import augment as augment_lib

ROUNDS = 20  # FLAIR's number_augmentations
METHODS = ('zero-shot', 'linear-probe', 'clip-adapter', 'tip-adapter', 'tip-adapter-f')


def augmented_encoder(encode: features.Encode, *, rounds: int = ROUNDS,
                      seed: int = 0) -> features.Encode:
  """``encode`` of ``rounds`` augmentations of each batch of canvases.

  Returns:
    canvases ``[B, S, S, 3]`` -> ``(features [B, A, F], embeddings [B, A, D])``;
    batch ``b``'s round ``a`` draws from ``fold_in(fold_in(key(seed), b), a)``.
  """
  augment = jax.jit(augment_lib.augment)
  batches = itertools.count()

  def encode_augmented(canvases_bhwc):
    key = jax.random.fold_in(jax.random.key(seed), next(batches))
    outs = [encode(np.asarray(augment(jax.random.fold_in(key, a), canvases_bhwc)))
            for a in range(rounds)]
    return tuple(np.stack(parts, 1) for parts in zip(*outs))

  return encode_augmented


def _rounds_first(x_nad, indices):
  """``[A, M, D]``: the rounds of samples ``indices``."""
  return np.swapaxes(np.asarray(x_nad)[indices], 0, 1)


def _activation(logits_mk):
  logits_mk = jnp.asarray(logits_mk, jnp.float32)
  if logits_mk.shape[-1] == 1:
    s = jax.nn.sigmoid(logits_mk)
    return np.asarray(jnp.concatenate([1 - s, s], -1), np.float64)
  return np.asarray(jax.nn.softmax(logits_mk, -1), np.float64)


def _probe_logits(classifier, num_classes: int):
  """The probe's scores as FLAIR's ``nn.Linear``: ``[M, 1]`` for two classes."""
  seen = len(classifier.classes_)
  if seen != num_classes:
    raise ValueError(f'a linear probe with test-time augmentation needs every class in its '
                     f'training split, got {seen} of {num_classes}; raise shots_train')
  return lambda x: classifier.decision_function(x).reshape(x.shape[0], -1)


def fold_probs(method: str, fold_seed: int, split: dict, feat_nf, emb_nd, labels_n,
               prototypes_cd, logit_scale: float, num_classes: int, *, aug_feat_naf=None,
               aug_emb_nad=None, tta: bool = False, fta: bool = False) -> np.ndarray:
  """Class probabilities ``[N_test, C]`` of one fold with fta and / or tta.

  Args:
    method: one of ``METHODS``.
    fold_seed, split: the fold's seed and indices.
    feat_nf, emb_nd: features and embeddings of the plain canvases.
    labels_n, prototypes_cd, logit_scale, num_classes: as ``run.score``.
    aug_feat_naf, aug_emb_nad: the augmented encodings ``[N, A, .]``.
    tta, fta: FLAIR's flags.
  """
  if method not in METHODS:
    raise ValueError(f'--tta / --fta work with {METHODS} (and --fta with ft, lp+ft), not with '
                     f'{method}')
  train, test = split['train'], split['test']
  if method != 'zero-shot' and train.size == 0:
    raise ValueError(f'{method} needs training samples; raise shots_train (now 0 per class)')
  probe = method == 'linear-probe'
  x_n, aug_nax = (feat_nf, aug_feat_naf) if probe else (emb_nd, aug_emb_nad)
  if fta:
    x_train = _rounds_first(aug_nax, train).reshape(-1, aug_nax.shape[-1])
    y_train = np.tile(labels_n[train], aug_nax.shape[1])
  else:
    x_train, y_train = x_n[train], labels_n[train]
  x_test_amd = _rounds_first(aug_nax, test) if tta else np.asarray(x_n)[test][None]
  if probe:
    classifier = linear_probe.fit(x_train, y_train)
    if not tta:  # scikit-learn's own probabilities (classes it never saw score 0)
      return linear_probe.predict(classifier, x_test_amd[0], num_classes)
    logits = _probe_logits(classifier, num_classes)
  else:
    logits = _language_logits(method, fold_seed, x_train, y_train, prototypes_cd, logit_scale,
                              num_classes)
  return _activation(np.mean([np.asarray(logits(x)) for x in x_test_amd], 0))


def _language_logits(method, fold_seed, x_md, y_m, prototypes_cd, logit_scale, num_classes):
  """The fitted vision-language method's ``x [M, D] -> logits [M, C]``."""
  text_cd = jnp.asarray(prototypes_cd, jnp.float32)
  if method == 'zero-shot':
    return lambda x: jnp.exp(jnp.float32(logit_scale)) * jnp.asarray(x, jnp.float32) @ text_cd.T
  if method == 'clip-adapter':
    params, _ = adapters.fit_clip_adapter(x_md, y_m, prototypes_cd, logit_scale, seed=fold_seed)
    return lambda x: adapters.clip_adapter_logits(params, jnp.asarray(x, jnp.float32), text_cd,
                                                  logit_scale)
  if method == 'tip-adapter':
    keys, values = adapters.tip_cache(x_md, y_m, num_classes)
  else:
    keys, values, _ = adapters.fit_tip_adapter_f(x_md, y_m, prototypes_cd, logit_scale,
                                                 num_classes, seed=fold_seed)
  return lambda x: adapters.tip_adapter_logits(jnp.asarray(x, jnp.float32), text_cd, keys, values)
