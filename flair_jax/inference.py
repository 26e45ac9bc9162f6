"""The FLAIR inference API: images and class names in, probabilities out.

    from flair_jax import FLAIRModel
    model = FLAIRModel.from_pretrained('path/to/checkpoint')
    probs, logits = model(image_uint8_hwc, ['normal', 'glaucoma', 'cataract'])

Mirrors PyTorch FLAIR's ``FLAIRModel.forward``: the image is scaled to
[0, 1] and put on the square canvas (longest side ``image_size``, zero
padding bottom and right), each class name goes into the caption, all
captions are encoded as one batch, ``logits = exp(clamped logit_scale) *
img @ txt.T`` and ``probs`` is their softmax over classes. The towers are
the model's ``encoder.Encoder`` (one compilation per batch shape, batches
split over this process's devices); text embeddings are cached per class
list.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines import images as images_lib
from data_pipelines import knowledge as knowledge_lib
from data_pipelines import tokenizer as tokenizer_lib
from flair_jax import checkpoint, convert
from flair_jax import encoder as encoder_lib
from flair_jax.models import FLAIRTowers, build_model
from flair_jax.models.state import assign_state

Knowledge = Union[str, os.PathLike, Mapping[str, Sequence[str]]]


def _image_list(image) -> list:
  """One image ``[H, W]`` / ``[H, W, C]``, a batch ``[B, H, W, C]`` or a list."""
  if isinstance(image, (list, tuple)):
    return [np.asarray(im) for im in image]
  image = np.asarray(image)
  if image.ndim in (2, 3):
    return [image]
  if image.ndim == 4:
    return list(image)
  raise ValueError(f'expected an image [H, W(, C)], a batch [B, H, W, C] or a list of images, '
                   f'got an array of shape {image.shape}')


def _tokenizer_source(folder: str, bert_type: str) -> str:
  """A tokenizer shipped inside ``folder`` (or its ``text_encoder/``), else bert_type."""
  for candidate in (folder, os.path.join(folder, 'text_encoder')):
    if os.path.isfile(os.path.join(candidate, 'vocab.txt')):
      return candidate
  return bert_type


def load_any(path: Union[str, os.PathLike], dtype=jnp.float32,
             bert_type: Optional[str] = None) -> tuple:
  """``(model in eval mode, ModelConfig, tokenizer source)`` of a checkpoint.

  ``path``: a flair_jax model / step folder or training workdir; else a
  PyTorch FLAIR ``.pth`` / ``.safetensors`` file or hub-form folder, whose
  text tower shape and tokenizer come from ``bert_type`` (default: its
  ``config.json``, else Bio_ClinicalBERT).
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint {path} does not exist; expected a flair_jax checkpoint '
                            'or workdir, or a PyTorch FLAIR .pth file or Hugging Face folder')
  try:
    item_dir, _ = checkpoint.resolve_checkpoint(path) if os.path.isdir(path) else (None, None)
  except FileNotFoundError:
    item_dir = None
  if item_dir is not None:
    model, config = checkpoint.load_model(path, dtype=dtype)
    return model, config, _tokenizer_source(os.path.dirname(item_dir), config.bert_type)
  state, config = convert.read_torch_flair(path, bert_type)
  model = nnx.eval_shape(lambda: build_model(config, dtype))
  assign_state(model, state)
  model.eval()
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  return model, config, _tokenizer_source(folder, config.bert_type)


class FLAIRModel:
  """A FLAIR model, its tokenizer, the canvas size and the caption.

  Args:
    model: the NNX model (put in eval mode here).
    tokenizer: its BERT tokenizer (``data_pipelines.tokenizer.load_tokenizer``).
    image_size: side of the square input canvas.
    caption: prompt template; ``[CLS]`` is replaced by each class name.
  """

  def __init__(self, model: FLAIRTowers, tokenizer, *, image_size: int = 512,
               caption: str = encoder_lib.CAPTION):
    if '[CLS]' not in caption:
      raise ValueError(f'caption {caption!r} has no [CLS] placeholder for the class name')
    model.eval()
    self.model = model
    self.tokenizer = tokenizer
    self.image_size = int(image_size)
    self.caption = caption
    graphdef, state = nnx.split(model)
    self.encoder = encoder_lib.Encoder(graphdef)
    self._state = self.encoder.place(state)
    self._cache = {}

  @classmethod
  def from_pretrained(cls, path: Union[str, os.PathLike], *, tokenizer=None,
                      bert_type: Optional[str] = None, dtype=jnp.float32,
                      **kwargs) -> 'FLAIRModel':
    """Loads a flair_jax checkpoint, or a PyTorch FLAIR folder / ``.pth``.

    Args:
      path: a flair_jax model folder, step folder or training workdir (its
        latest step); or a PyTorch FLAIR ``.pth`` state dict or Hugging Face
        folder (``config.json`` + ``model.safetensors``), converted on load.
      tokenizer: a tokenizer or its folder / hub id; default: the checkpoint
        folder's own tokenizer files, else the config's ``bert_type``.
      bert_type: text tower folder or hub id of a PyTorch FLAIR ``.pth``.
      dtype: compute dtype of the towers.
      **kwargs: override ``image_size`` or ``caption`` of the checkpoint.
    """
    model, config, tokenizer_source = load_any(path, dtype=dtype, bert_type=bert_type)
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
      tokenizer = tokenizer_lib.load_tokenizer(tokenizer or tokenizer_source)
    options = dict(image_size=config.image_size, caption=config.caption)
    options.update(kwargs)
    return cls(model, tokenizer, **options)

  def logit_scale(self, clamped: bool = True) -> float:
    """The log-temperature; FLAIR clamps it into [0, ln 100] in ``forward``."""
    return encoder_lib.logit_scale(self._state, clamped)

  def preprocess(self, image) -> jax.Array:
    """FLAIR's canvas ``[B, S, S, 3]`` float32 from uint8 image(s)."""
    return jnp.asarray(np.stack([images_lib.flair_inference_canvas(im, self.image_size)
                                 for im in _image_list(image)]))

  def image_features(self, images_bhwc) -> tuple[np.ndarray, np.ndarray]:
    """``(features [B, 2048], embeddings [B, proj_dim])`` of canvases."""
    return self.encoder.image_features(self._state, images_bhwc)

  def encode_images(self, image) -> np.ndarray:
    """Projected image embeddings ``[B, proj_dim]`` of raw image(s)."""
    return self.image_features(self.preprocess(image))[1]

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Embeddings ``[T, proj_dim]`` of texts encoded as ONE batch
    (``encoder.Encoder.text_embeddings``)."""
    texts = list(texts)
    if not texts:
      raise ValueError('no texts to encode')
    ids_tl, lengths_t = tokenizer_lib.tokenize(self.tokenizer, texts)
    return self.encoder.text_embeddings(self._state, ids_tl, lengths_t)

  def prompt_embeddings(self, categories: Sequence[str]) -> np.ndarray:
    """Caption embeddings ``[C, proj_dim]`` of class names, one batch (cached)."""
    key = ('prompts', tuple(categories), self.caption)
    if key not in self._cache:
      self._cache[key] = self.encode_texts([self.caption.replace('[CLS]', c) for c in categories])
    return self._cache[key]

  def compute_text_embeddings(self, categories: Sequence[str], domain_knowledge: bool = False,
                              knowledge: Optional[Knowledge] = None
                              ) -> tuple[dict, np.ndarray]:
    """FLAIR's class prototypes (cached per class list and dictionary).

    Each class's prompts (``encoder.class_prompts``) are encoded as their
    own batch and their embeddings averaged (not re-normalised).

    Args:
      categories: class names, in label order.
      domain_knowledge: prompt with the expert descriptions.
      knowledge: the dictionary: a shipped name (``'flair_repo'``, the
        default, or ``'seed'``), a JSON path or a mapping.
    Returns:
      ``({name: [1, D]}, [C, D])`` like FLAIR's.
    """
    if domain_knowledge:
      knowledge = self._knowledge(knowledge)
      tag = knowledge[0]
      knowledge = knowledge[1]
    else:
      knowledge, tag = None, None
    key = ('prototypes', tuple(categories), tag, self.caption)
    if key not in self._cache:
      prompts = encoder_lib.ClassPrompts.build(self.tokenizer, categories, knowledge,
                                               self.caption)
      self._cache[key] = prompts.prototypes(self.encoder, self._state)
    protos_cd = self._cache[key]
    return {c: protos_cd[i:i + 1] for i, c in enumerate(categories)}, protos_cd

  def _knowledge(self, knowledge):
    if knowledge is None or isinstance(knowledge, (str, os.PathLike)):
      name = os.fspath(knowledge) if knowledge is not None else knowledge_lib.DEFAULT_DICTIONARY
      key = ('knowledge', name)
      if key not in self._cache:
        self._cache[key] = knowledge_lib.load_knowledge(name)
      return name, self._cache[key]
    frozen = tuple((k, tuple(v)) for k, v in knowledge.items())
    return frozen, dict(frozen)

  def __call__(self, image, categories: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(probs [B, C], logits [B, C])`` of image(s) against class names.

    Args:
      image: uint8 ``[H, W, 3]`` (or greyscale / RGBA), a batch
        ``[B, H, W, C]`` or a list of images of any sizes.
      categories: class names; each is put into the caption.
    """
    categories = list(categories)
    if not categories:
      raise ValueError('no class names given; pass e.g. ["normal", "glaucoma"]')
    img_bd = self.encode_images(image)
    probs, logits = encoder_lib.zero_shot_logits(img_bd, self.prompt_embeddings(categories),
                                                 self.logit_scale(clamped=True))
    return np.asarray(probs), np.asarray(logits)
