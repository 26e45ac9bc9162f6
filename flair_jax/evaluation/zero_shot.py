"""Zero-shot classification as PyTorch FLAIR does it.

Scores are ``exp(logit_scale) * img @ prototypes.T``, softmaxed over the
classes; the prototypes and their prompts are ``flair_jax.encoder``'s.
"""

from __future__ import annotations

import numpy as np

from flair_jax.encoder import zero_shot_logits


def predict(img_nd, prototypes_cd, logit_scale) -> np.ndarray:
  """Zero-shot class probabilities ``[N, C]`` (NumPy)."""
  return np.asarray(zero_shot_logits(img_nd, prototypes_cd, logit_scale)[0])
