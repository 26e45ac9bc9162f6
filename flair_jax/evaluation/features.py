"""Frozen image features of a whole dataset, batch-sharded over all devices.

Images are prepared as PyTorch FLAIR's transfer loader does (optional
field-of-view crop, intensities to [0, 1], square images resized straight to
the canvas, others fitted on it with zero padding bottom and right), grouped
in fixed-size batches (the last one padded, so the step compiles once) and
run through one jitted function that returns both the un-projected features
(linear probe) and the projected embeddings (zero-shot, adapters).
"""

from __future__ import annotations

import collections
import concurrent.futures
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from flair_jax import parallel
from flair_jax.preprocess import canvas_size, to_rgb


def crop_foreground(image: np.ndarray) -> np.ndarray:
  """FLAIR's field-of-view crop of a uint8 ``[H, W, 3]`` image (unchanged if none)."""
  from data_pipelines.images import foreground_box  # pylint: disable=g-import-not-at-top
  if image.dtype != np.uint8:
    raise ValueError(f'the field-of-view crop expects uint8 pixels, got {image.dtype}')
  box = foreground_box(image)
  if box is None:
    return image
  top, bottom, left, right = box
  return image[top:bottom, left:right]


def transfer_canvas(image: np.ndarray, image_size: int = 512, crop: bool = False) -> np.ndarray:
  """One image -> float32 ``[S, S, 3]`` as FLAIR's transfer loader makes it."""
  image = to_rgb(np.asarray(image))
  if crop:
    image = crop_foreground(image)
  x = np.asarray(image, np.float32)
  if x.max() > 1:  # FLAIR's loader scales only images that are not already in [0, 1].
    x = x / 255.0
  h, w = x.shape[:2]
  out_h, out_w = (image_size, image_size) if h == w else canvas_size(h, w, image_size)
  if (out_h, out_w) != (h, w):
    x = np.asarray(jax.image.resize(jnp.asarray(x), (out_h, out_w, 3), method='linear',
                                    antialias=True))
  return np.pad(x, ((0, image_size - out_h), (0, image_size - out_w), (0, 0)))


class ImageEncoder:
  """The jitted image tower over a mesh: canvases -> (features, embeddings).

  Args:
    graphdef, state: ``nnx.split`` of a FLAIR model in eval mode.
    mesh: default: all local devices on the ``'data'`` axis.
  """

  def __init__(self, graphdef, state, mesh=None):
    self.mesh = mesh or parallel.make_mesh(devices=jax.local_devices())
    self.num_shards = self.mesh.shape[parallel.BATCH_AXIS]
    self.state = jax.device_put(state, parallel.replicated(self.mesh))
    batch = parallel.batch_sharding(self.mesh)

    def forward(state, images_bhwc):
      model = nnx.merge(graphdef, state)
      feat_bf = model.image_features(images_bhwc)
      return feat_bf.astype(jnp.float32), model.vision_projection(feat_bf)

    self._forward = jax.jit(forward, in_shardings=(parallel.replicated(self.mesh), batch),
                            out_shardings=(batch, batch))
    self._batch = batch

  def round_batch(self, batch_size: int) -> int:
    """``batch_size`` rounded up to a multiple of the number of shards."""
    return -(-max(batch_size, 1) // self.num_shards) * self.num_shards

  def __call__(self, images_bhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(features [B, F], embeddings [B, D])``; B must divide over the shards."""
    x = jax.device_put(np.asarray(images_bhwc, np.float32), self._batch)
    feat_bf, emb_bd = self._forward(self.state, x)
    return np.asarray(feat_bf), np.asarray(emb_bd)


def extract(encoder: ImageEncoder, images: Sequence, *, image_size: int = 512,
            batch_size: int = 32, crop: bool = False, desc: str = 'features',
            prepare: Optional[Callable] = None, num_workers: int = 4,
            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Features and embeddings of every image of a sequence.

  Images are read and prepared by ``num_workers`` threads, up to two batches
  ahead of the device.

  Args:
    encoder: the jitted tower.
    images: random-access sequence of uint8 ``[H, W, C]`` images.
    image_size: canvas side.
    batch_size: images per step (rounded up to a multiple of the devices).
    crop: FLAIR's field-of-view crop first.
    prepare: replaces ``transfer_canvas`` (image -> ``[S, S, 3]`` float).
  Returns:
    ``(features [N, F], embeddings [N, D])`` float32, in sequence order.
  """
  prepare = prepare or (lambda im: transfer_canvas(im, image_size, crop))
  n = len(images)
  if n == 0:
    raise ValueError('no images to encode')
  batch_size = encoder.round_batch(min(batch_size, n))
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
      feat_bf, emb_bd = encoder(x)
      feats.append(feat_bf[:count])
      embs.append(emb_bd[:count])
      bar.update(count)
  return np.concatenate(feats), np.concatenate(embs)
