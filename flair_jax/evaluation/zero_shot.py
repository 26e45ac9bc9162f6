"""Zero-shot classification as PyTorch FLAIR does it.

A class's prototype is the mean of the projected, normalised embeddings of
its prompts (the mean is not re-normalised). With expert knowledge, a class
found in the dictionary is prompted by its descriptions followed by its own
name (unless the descriptions already hold it, or it is one of MMAC's
"myopic maculopathy" grades, whose names FLAIR leaves out as uninformative);
otherwise by its name alone. Each prompt is the caption with ``[CLS]``
replaced. Scores are ``exp(logit_scale) * img @ prototypes.T``, softmaxed.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import captions as captions_lib

CAPTION = captions_lib.PROMPT_TEMPLATE
UNINFORMATIVE_NAMES = ('myopic maculopathy',)  # MMAC's grade names.


def class_descriptions(category: str,
                       knowledge: Optional[Mapping[str, Sequence[str]]] = None) -> list[str]:
  """The texts that stand for ``category`` (before the caption)."""
  if knowledge is None or category not in knowledge:
    return [category]
  descriptions = list(knowledge[category])
  if category not in descriptions and not any(w in category for w in UNINFORMATIVE_NAMES):
    descriptions.append(category)
  return descriptions


def class_prompts(category: str, knowledge: Optional[Mapping[str, Sequence[str]]] = None,
                  caption: str = CAPTION) -> list[str]:
  """The captions whose embeddings average into ``category``'s prototype."""
  return [caption.replace('[CLS]', d) for d in class_descriptions(category, knowledge)]


def zero_shot_logits(img_nd, prototypes_cd, logit_scale):
  """``exp(logit_scale) * img @ prototypes.T`` -> ``(probs_nc, logits_nc)``.

  ``logit_scale`` is the log-temperature as the caller wants it (FLAIR's
  zero-shot adapter exponentiates the stored parameter; its ``forward``
  clamps it first).
  """
  logits_nc = jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * jnp.einsum(
      'nd,cd->nc', jnp.asarray(img_nd, jnp.float32), jnp.asarray(prototypes_cd, jnp.float32))
  return jax.nn.softmax(logits_nc, axis=-1), logits_nc


def predict(img_nd, prototypes_cd, logit_scale) -> np.ndarray:
  """Zero-shot class probabilities ``[N, C]`` (NumPy)."""
  return np.asarray(zero_shot_logits(img_nd, prototypes_cd, logit_scale)[0])
