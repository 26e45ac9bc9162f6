"""What a training run needs before its first step: the built data, the
tokenizer, the model (initialised, born sharded), the optimiser and schedule.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from data_pipelines import build as build_lib
from data_pipelines import captions as captions_lib
from data_pipelines import categories as categories_lib
from data_pipelines import knowledge as knowledge_lib
from data_pipelines import pipeline
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines.console import UserError
from flair_jax import parallel
from flair_jax.training import optim
from flair_jax.convert import pretrained
from flair_jax.models import BertConfig, ModelConfig, VisionConfig, build_model
from flair_jax.models.config import PIXEL_NORMS
from flair_jax.models.state import assign_state

logger = logging.getLogger(__name__)

SYNTHETIC = 'fundus_synthetic'


class DataNotFoundError(UserError, FileNotFoundError):
  """The configured pre-training data is not built."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (the message says which and why)."""


def compute_dtype(name: str):
  """``'auto'``: bfloat16 on accelerators, float32 on the CPU."""
  if name == 'auto':
    return jnp.float32 if jax.default_backend() == 'cpu' else jnp.bfloat16
  return jnp.dtype(name)


def prepare_data(cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """The version folder of the pre-training dataset, building it if allowed.

  The synthetic set is built under ``<workdir>/data`` when absent; any other
  set must have been built with ``python -m data_pipelines build``.
  """
  if cfg.path:
    path = os.path.abspath(os.path.expanduser(cfg.path))
    if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
      raise DataNotFoundError(
          f'{path} is not a built dataset (no dataset_info.json). Build it with\n'
          f'  python -m data_pipelines build {cfg.name} --data-dir DIR [options]\n'
          'and pass the version folder it prints (".../<config>/<version>") as '
          '--config.data.path.')
    return path
  if cfg.name != SYNTHETIC:
    raise DataNotFoundError(
        f'no pre-training data given for {cfg.name!r}. Build it once with\n'
        f'  python -m data_pipelines build {cfg.name} --data-dir DIR --dataframes_dir CSV_DIR '
        '--data_root IMAGES_DIR\n'
        'then pass the folder it reports as --config.data.path=DIR/<builder>/<config>/<version>.')
  report = build_lib.build(SYNTHETIC, os.path.join(workdir, 'data'), **dict(cfg.build))
  return report['path']


def train_sources(path: str):
  """The ``train`` split as a random-access source (images still encoded)."""
  source = build_lib.data_source(path, 'train', decode_images=False)
  if len(source) == 0:
    raise DataNotFoundError(f'the train split of {path} is empty; rebuild the dataset')
  return [source]


def _vocabulary_texts(sources, knowledge: Optional[str]):
  """Every word a caption can hold: template, attributes, categories, descriptions."""
  attributes, category_names = set(), set(categories_lib.CATEGORIES)
  for source in sources:
    for i in range(len(source)):
      record = source[i]
      attributes.update(captions_lib.as_texts(record['attributes']))
      category_names.update(captions_lib.as_texts(record['categories']))
  texts = [captions_lib.fill(captions_lib.CAPTION_TEMPLATE, c, a)
           for a in sorted(attributes | {''}) for c in sorted(category_names)]
  for name in ('flair_repo', 'seed') + ((knowledge,) if knowledge else ()):
    for descriptions in knowledge_lib.load_knowledge(name).values():
      texts.extend(captions_lib.fill(captions_lib.PROMPT_TEMPLATE, d) for d in descriptions)
  return texts


def prepare_tokenizer(cfg: ml_collections.ConfigDict, workdir: str, sources):
  """``(tokenizer, tokenizer_folder)``: the BERT's own, or a WordPiece one
  built from the captions into ``<workdir>/tokenizer`` (kept across runs)."""
  if cfg.model.bert_type:
    return tokenizer_lib.load_tokenizer(cfg.model.bert_type), cfg.model.bert_type
  folder = os.path.join(workdir, 'tokenizer')
  if not os.path.isdir(folder):
    # Built aside and renamed: a killed build never leaves a partial folder.
    tmp = f'{folder}.tmp{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer_lib.build_wordpiece_vocab(_vocabulary_texts(sources, cfg.data.knowledge), tmp)
    os.replace(tmp, folder)
  return tokenizer_lib.load_tokenizer(folder), folder


def check_datasets(expected, counts: dict, data_path: str) -> None:
  """Refuses datasets outside ``expected`` (e.g. a transfer set that would
  leak into pre-training); logs the expected ones that are missing."""
  if not expected:
    return
  extra = sorted(set(counts) - set(expected))
  if extra:
    raise ConfigError(
        f'{data_path} holds datasets outside data.datasets: {extra}. Rebuild without them '
        '(python -m data_pipelines build fundus_assembly --datasets ...) or list them in '
        '--config.data.datasets')
  missing = sorted(set(expected) - set(counts))
  if missing:
    logger.warning('%d of the %d configured datasets are not in the built set: %s',
                   len(missing), len(expected), missing)


@dataclasses.dataclass
class TrainingData:
  """The pre-training input of a run.

  Attributes:
    path: version folder of the built dataset.
    sources: random-access sources of its ``train`` split.
    tokenizer: the caption tokenizer.
    tokenizer_folder: where it was loaded from (a folder or a hub name).
    iterator: the grain iterator of this process's share of each batch.
    steps_per_epoch: PyTorch FLAIR's ``len(DataLoader)``:
      ``ceil(epoch length / batch size)``.
    total_steps: ``train.epochs`` epochs of steps.
  """
  path: str
  sources: list
  tokenizer: Any
  tokenizer_folder: str
  iterator: Any
  steps_per_epoch: int
  total_steps: int

  @classmethod
  def from_config(cls, cfg: ml_collections.ConfigDict, workdir: str) -> 'TrainingData':
    """Opens (building what is missing) the data and tokenizer ``cfg`` names.

    Process 0 builds what is missing (synthetic set, vocabulary) while the
    other processes wait, then they open it.

    Raises:
      DataNotFoundError: the configured data is not built.
      ConfigError: the data holds datasets outside ``data.datasets``.
    """
    def open_input():
      path = prepare_data(cfg.data, workdir)
      sources = train_sources(path)
      return (path, sources) + prepare_tokenizer(cfg, workdir, sources)

    opened = parallel.on_main_process(open_input, 'the data and tokenizer build')
    path, sources, tokenizer, tokenizer_folder = (
        opened if parallel.is_main_process() else open_input())
    iterator = pipeline.make_pretraining_iterator(
        sources, batch_size=cfg.train.batch_size // jax.process_count(), seed=cfg.seed,
        tokenizer=tokenizer, knowledge=cfg.data.knowledge or None, canvas=cfg.model.image_size,
        sampling=cfg.data.sampling, epoch_length=cfg.data.epoch_length or None,
        worker_count=cfg.data.worker_count, read_threads=cfg.data.read_threads)
    check_datasets(cfg.data.datasets, iterator.index.counts(), path)
    epoch_length = cfg.data.epoch_length or iterator.index.size
    steps_per_epoch = max(1, -(-epoch_length // cfg.train.batch_size))
    return cls(path=path, sources=sources, tokenizer=tokenizer,
               tokenizer_folder=tokenizer_folder, iterator=iterator,
               steps_per_epoch=steps_per_epoch, total_steps=cfg.train.epochs * steps_per_epoch)

  def close(self) -> None:
    if hasattr(self.iterator, 'close'):
      self.iterator.close()


def model_config(cfg: ml_collections.ConfigDict, tokenizer, tokenizer_folder: str):
  """``(ModelConfig, bert_state or None)`` from the config.

  With a ``bert_type`` the text tower takes that checkpoint's shape and
  weights; otherwise its shape comes from ``model.bert`` and the vocabulary.
  """
  bert_state = None
  if cfg.model.bert_type:
    bert, bert_state = pretrained.load_hf_bert(cfg.model.bert_type)
  else:
    bert = BertConfig.from_dict(dict(cfg.model.bert) | {'vocab_size': len(tokenizer)})
  config = ModelConfig(
      bert=bert, bert_type=os.path.abspath(tokenizer_folder) if not cfg.model.bert_type
      else tokenizer_folder,
      vision=vision_config(cfg.model), proj_dim=cfg.model.proj_dim,
      text_pooling=cfg.model.text_pooling, image_size=cfg.model.image_size)
  return config, bert_state


def vision_config(model_cfg: ml_collections.ConfigDict) -> VisionConfig:
  """The image tower of ``model.vision`` with its shape and normalisation."""
  norm = model_cfg.get('vision_norm', '')
  if norm and norm not in PIXEL_NORMS:
    raise ConfigError(f'model.vision_norm {norm!r} unknown; expected "" (the tower\'s '
                      f'default) or one of {sorted(PIXEL_NORMS)}')
  mean, std = PIXEL_NORMS[norm] if norm else (None, None)
  kind = model_cfg.get('vision', 'resnet')
  if kind == 'resnet':
    return VisionConfig(stages=tuple(model_cfg.resnet_stages), width=model_cfg.resnet_width,
                        pixel_mean=mean, pixel_std=std)
  if kind == 'vit':
    return VisionConfig(type='vit', pixel_mean=mean, pixel_std=std, **dict(model_cfg.vit))
  raise ConfigError(f'model.vision {kind!r} unknown; expected "resnet" or "vit"')


def vision_weights(model_cfg: ml_collections.ConfigDict) -> str:
  """The image tower's weights file (``vision_weights``, or its older name)."""
  new, old = model_cfg.get('vision_weights', ''), model_cfg.get('resnet_weights', '')
  if new and old and new != old:
    raise ConfigError('model.vision_weights and model.resnet_weights name different files; '
                      'set only model.vision_weights')
  return new or old


def init_model(model_config, bert_state, cfg: ml_collections.ConfigDict, dtype, sharding):
  """The model, initialised by one jitted function with its state born on
  ``sharding``; then the pre-trained towers named in the config."""
  seed = cfg.seed
  abstract = nnx.eval_shape(lambda: build_model(model_config, dtype, nnx.Rngs(seed)))
  graphdef = nnx.graphdef(abstract)
  init = jax.jit(lambda: nnx.state(build_model(model_config, dtype, nnx.Rngs(seed))),
                 out_shardings=sharding)
  model = nnx.merge(graphdef, init())
  weights = vision_weights(cfg.model)
  if (not weights and model_config.vision.type == 'resnet'
      and model_config.vision.stages == (3, 4, 6, 3)):
    logger.warning('the ResNet-50 image tower starts from random weights; FLAIR starts from '
                   'ImageNet: pass --config.model.vision_weights=<torchvision IMAGENET1K_V2 .pth>')
  if weights:
    assign_state(model.vision_model, pretrained.load_vision_weights(weights, model_config.vision))
    logger.info('image tower from %s', weights)
  if bert_state is not None:
    assign_state(model.text_model, bert_state)
    logger.info('text tower from %s', cfg.model.bert_type)
  return model


def make_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int):
  """``step -> learning rate`` of ``train.schedule``."""
  train = cfg.train
  if train.schedule == 'flair':
    return optim.flair_schedule(train.lr, steps_per_epoch, warmup_epochs=train.warmup_epochs,
                                horizon_epochs=train.horizon_epochs)
  if train.schedule == 'cosine':
    if not 0 <= train.warmup_epochs < train.epochs:
      raise ConfigError(f'train.warmup_epochs {train.warmup_epochs} must be at least 0 and less '
                        f'than train.epochs {train.epochs} with the cosine schedule; lower '
                        'train.warmup_epochs or raise train.epochs')
    return optim.warmup_cosine_schedule(train.lr, train.warmup_epochs * steps_per_epoch,
                                        total_steps)
  raise ConfigError(f'train.schedule {train.schedule!r} unknown; expected "flair" or "cosine"')


def make_optimizer(cfg: ml_collections.ConfigDict, schedule):
  """AdamW with the config's weight decay, clipping and frozen parameters."""
  train = cfg.train
  frozen = tuple(train.frozen)
  return optim.make_optimizer(
      schedule, weight_decay=train.weight_decay, clip_norm=train.clip_norm or None,
      trainable_mask=(lambda p: optim.trainable_mask(p, frozen)) if frozen else None)


def eval_sets(cfg, data_path: str) -> dict:
  """``{key: DownstreamSet}`` of the configured zero-shot sets, resolved
  before training so that a wrong path fails at once, not after hours."""
  from flair_jax.evaluation import data as eval_data  # pylint: disable=g-import-not-at-top
  sets = {}
  for name in cfg.eval.sets:
    if name == 'synthetic':
      if cfg.data.name != SYNTHETIC:
        raise ConfigError(
            "eval set 'synthetic' needs data.name 'fundus_synthetic'; for "
            f'{cfg.data.name!r} name built fundus_classification folders')
      sets['synthetic'] = eval_data.from_pretraining_split(data_path, 'test')
    else:
      sets[os.path.basename(name.rstrip('/'))] = eval_data.from_tfds(name)
  return sets
