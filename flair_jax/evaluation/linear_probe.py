"""FLAIR's linear probe: logistic regression on frozen image features.

PyTorch FLAIR fits scikit-learn's ``LogisticRegression(C=0.316,
max_iter=1000, class_weight='balanced', random_state=0)`` on the image
tower's features without projection or normalisation (2048-d for ResNet-50)
and scores with the fitted linear layer: a sigmoid for two classes, a
softmax otherwise, i.e. ``predict_proba``.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression

C = 0.316
MAX_ITER = 1000


def fit(feat_nf, labels_n, *, c: float = C, max_iter: int = MAX_ITER,
        random_state: int = 0) -> LogisticRegression:
  """A fitted classifier for ``feat_nf [N, F]`` with classes ``labels_n [N]``."""
  labels_n = np.asarray(labels_n).reshape(-1)
  if np.unique(labels_n).size < 2:
    raise ValueError(f'a linear probe needs at least 2 classes in its training split, got '
                     f'{np.unique(labels_n).tolist()}; raise shots_train')
  classifier = LogisticRegression(C=c, max_iter=max_iter, class_weight='balanced',
                                  random_state=random_state)
  return classifier.fit(np.asarray(feat_nf), labels_n)


def predict(classifier: LogisticRegression, feat_nf, num_classes: int) -> np.ndarray:
  """Probabilities ``[N, num_classes]``; classes unseen in training score 0."""
  probs = classifier.predict_proba(np.asarray(feat_nf))
  out = np.zeros((probs.shape[0], num_classes), np.float64)
  out[:, classifier.classes_.astype(np.int64)] = probs
  return out
