"""Writes the legacy-format fixtures of tests/test_legacy_formats.py.

Run once, with the code of commit e511233 (``ModelConfig`` and
``build_model`` in ``flair_jax/checkpoint.py``, ResNet shape as top-level
``resnet_stages`` / ``resnet_width`` in ``model_config.json``), from the
repository root::

  python tests/data/legacy/make_legacy.py [OUT_DIR]

It writes, into OUT_DIR (default: this folder):

* ``bert/``: the tokenizer (``vocab.txt``) and BERT ``config.json`` of the
  tiny text tower;
* ``model/``: a model folder of ``checkpoint.save_model``;
* ``workdir/``: a trainer-style workdir, ``model_config.json`` on top and an
  orbax ``CheckpointManager`` step 7 holding the items ``model`` and ``extra``;
* ``export/``: ``convert.export_to_torch(model/, fmt='hf')``, PyTorch FLAIR's
  hub form (``config.json`` + ``model.safetensors``);
* ``state.npz``: the same model state, flattened to ``'a/b/c'`` keys and
  saved with NumPy alone: the independent reference the test compares to.

All three checkpoints hold this one state: random numbers of a fixed seed.
"""

import json
import os
import sys

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from data_pipelines import tokenizer as tokenizer_lib
from flair_jax import checkpoint, convert, trees
from flair_jax.models import BertConfig

WORDS = ('a', 'retinal', 'image', 'of', 'normal', 'glaucoma', 'cataract', 'eye')
BERT_TYPE = 'legacy-org/tiny-bert'  # a hub id, never resolved by the tests
STEP = 7


def make_config(vocab_size: int) -> checkpoint.ModelConfig:
  """The tiny model: ResNet (1, 1, 1, 1) of width 4, a one-layer BERT."""
  bert = BertConfig(vocab_size=vocab_size, hidden_size=8, num_hidden_layers=1,
                    num_attention_heads=2, intermediate_size=16, max_position_embeddings=32)
  return checkpoint.ModelConfig(
      bert=bert, bert_type=BERT_TYPE, resnet_stages=(1, 1, 1, 1), resnet_width=4,
      proj_dim=16, text_pooling='masked', logit_scale_init_value=0.05, image_size=64,
      caption='A retinal image of [CLS]')


def random_state(config: checkpoint.ModelConfig) -> dict:
  """Nested state of ``config``'s model: normal floats, integer step counts."""
  model = nnx.eval_shape(lambda: checkpoint.build_model(config))
  rng = np.random.default_rng(20240607)
  like = checkpoint.model_state(model)
  return {k: (rng.integers(0, 1000, v.shape) if v.dtype == np.int32
              else rng.standard_normal(v.shape)).astype(v.dtype)
          for k, v in trees.flatten(like).items()}, like


def write_bert(folder: str, config: checkpoint.ModelConfig) -> None:
  os.makedirs(folder)
  vocab = os.path.join(folder, 'vocab.txt')
  with open(vocab, 'w') as f:
    f.write('\n'.join(tokenizer_lib.SPECIAL_TOKENS + WORDS) + '\n')
  tokenizer_lib.load_tokenizer(vocab).save_pretrained(folder)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config.bert.to_dict(), f, indent=1)


def write_workdir(folder: str, state: dict, config: checkpoint.ModelConfig) -> None:
  os.makedirs(folder)
  checkpoint.save_model_config(config, os.path.join(folder, checkpoint.CONFIG_FILE))
  with ocp.CheckpointManager(os.path.join(folder, checkpoint.CHECKPOINTS_DIR)) as manager:
    manager.save(STEP, args=ocp.args.Composite(model=ocp.args.StandardSave(state),
                                               extra=ocp.args.JsonSave({'step': STEP})))
    manager.wait_until_finished()


def main(out: str) -> None:
  os.makedirs(out, exist_ok=True)
  vocab_size = len(tokenizer_lib.SPECIAL_TOKENS) + len(WORDS)
  config = make_config(vocab_size)
  flat, like = random_state(config)
  state = trees.unflatten(flat, like)
  write_bert(os.path.join(out, 'bert'), config)
  checkpoint.save_state(state, config, os.path.join(out, 'model'))
  write_workdir(os.path.join(out, 'workdir'), state, config)
  convert.export_to_torch(os.path.join(out, 'model'), os.path.join(out, 'export'), fmt='hf')
  np.savez(os.path.join(out, 'state.npz'), **flat)


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
