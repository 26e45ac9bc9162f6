"""A quick check that the towers run: encode the fundus photograph shipped
with the package and a caption, print embedding shapes and timings.

    python -m flair_jax.smoke [--image-size 512] [--vision resnet|vit]
"""

from __future__ import annotations

import importlib.resources
import sys
import time

import jax
import numpy as np
from flax import nnx
from PIL import Image

from data_pipelines import console
from data_pipelines import images as images_lib
from flair_jax import encoder as encoder_lib
from flair_jax.models import ModelConfig, VisionConfig, build_model


def _timed(fn, *args):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, first, time.perf_counter() - t0


def main(argv=None):
  parser = console.ArgumentParser(prog='python -m flair_jax.smoke',
                                  description=__doc__.splitlines()[0])
  parser.add_argument('--image-size', type=int, default=512)
  parser.add_argument('--vision', choices=('resnet', 'vit'), default='resnet',
                      help='image tower: ResNet-50, or ViT-B/16 (the canvas resized to 224)')
  console.add_verbose_flag(parser)
  args = parser.parse_args(argv)

  asset = importlib.resources.files('flair_jax') / 'assets' / 'fundus_example.jpg'
  with asset.open('rb') as f:
    image = np.asarray(Image.open(f).convert('RGB'))
  pixels = images_lib.flair_inference_canvas(image, args.image_size)[None]
  print(f'devices: {jax.devices()}')
  print(f'image {image.shape} -> canvas {tuple(pixels.shape)}')

  # ResNet-50 or ViT-B/16 and a BERT-base-shaped text tower, random weights.
  model = build_model(ModelConfig(vision=VisionConfig(type=args.vision)), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  encoder = encoder_lib.Encoder(graphdef)
  state = encoder.place(state)
  encode_image = lambda s, x: encoder.image_features(s, x)[1]

  ids = np.zeros((1, 77), np.int32)
  ids[0, :8] = [101, 170, 17733, 20948, 8329, 1104, 2999, 102]
  lengths = np.asarray([8], np.int32)
  img, t_first, t_img = _timed(encode_image, state, pixels)
  txt, u_first, t_txt = _timed(encoder.text_embeddings, state, ids, lengths)
  print(f'image embedding {tuple(img.shape)}: compile+run {t_first:.2f} s, run {t_img * 1e3:.1f} ms')
  print(f'text embedding  {tuple(txt.shape)}: compile+run {u_first:.2f} s, run {t_txt * 1e3:.1f} ms')
  print(f'norms: image {float(np.linalg.norm(img)):.4f}, text {float(np.linalg.norm(txt)):.4f}')


if __name__ == '__main__':
  sys.exit(console.run(main))
