"""Frozen image features of a whole dataset, in fixed-size batches.

Images are prepared as PyTorch FLAIR's transfer loader does
(``data_pipelines.images.flair_transfer_canvas``: optional field-of-view
crop, intensities to [0, 1], square images resized straight to the canvas,
others fitted on it with zero padding bottom and right), grouped in
fixed-size batches (the last one padded, so the towers compile once) and
encoded into both the un-projected features (linear probe) and the projected
embeddings (zero-shot, adapters).
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Optional, Sequence

import numpy as np
from tqdm import tqdm

from data_pipelines import images as images_lib

Encode = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def extract(encode: Encode, images: Sequence, *, batch_size: int, image_size: int = 512,
            crop: bool = False, desc: str = 'features', prepare: Optional[Callable] = None,
            num_workers: int = 4, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Features and embeddings of every image of a sequence.

  Images are read and prepared by ``num_workers`` threads, up to two batches
  ahead of the device.

  Args:
    encode: canvases ``[B, S, S, 3]`` -> ``(features, embeddings)``, e.g. a
      ``FLAIRModel.image_features``.
    images: random-access sequence of uint8 ``[H, W, C]`` images.
    batch_size: images per step, every step (``Encoder.round_batch`` gives
      one that splits over the devices).
    image_size: canvas side.
    crop: FLAIR's field-of-view crop first.
    prepare: replaces ``flair_transfer_canvas`` (image -> ``[S, S, 3]`` float).
  Returns:
    ``(features [N, F], embeddings [N, D])`` float32, in sequence order.
  """
  prepare = prepare or (lambda im: images_lib.flair_transfer_canvas(im, image_size, crop))
  n = len(images)
  if n == 0:
    raise ValueError('no images to encode')
  load = lambda i: prepare(images[i])
  feats, embs = [], []
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool, tqdm(
      total=n, desc=desc, unit='img', disable=not progress, dynamic_ncols=True) as bar:
    pending = collections.deque()
    submitted = 0
    for start in range(0, n, batch_size):
      while submitted < min(n, start + 3 * batch_size):
        pending.append(pool.submit(load, submitted))
        submitted += 1
      count = min(batch_size, n - start)
      chunk = [pending.popleft().result() for _ in range(count)]
      x = np.zeros((batch_size, *chunk[0].shape), np.float32)
      x[:count] = np.stack(chunk)
      feat_bf, emb_bd = encode(x)
      feats.append(feat_bf[:count])
      embs.append(emb_bd[:count])
      bar.update(count)
  return np.concatenate(feats), np.concatenate(embs)
