"""Checkpoints and exports written before the image tower had its own config
(tests/data/legacy, made by make_legacy.py at commit e511233) still load,
bitwise, into the config of today's form."""

import dataclasses
import json
import os

import numpy as np
import pytest

from flair_jax import checkpoint, trees
from flair_jax.convert import export_to_torch, read_torch_flair
from flair_jax.inference import FLAIRModel
from flair_jax.models import BertConfig, ModelConfig, VisionConfig
from flair_jax.models.state import model_state

from tests.conftest import DATA

LEGACY = DATA / 'legacy'
BERT_DIR = str(LEGACY / 'bert')
# What make_legacy.py built, in today's form.
EXPECTED = ModelConfig(
    bert=BertConfig(vocab_size=13, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=16, max_position_embeddings=32),
    bert_type='legacy-org/tiny-bert', vision=VisionConfig(type='resnet', stages=(1, 1, 1, 1),
                                                          width=4),
    proj_dim=16, text_pooling='masked', logit_scale_init_value=0.05, image_size=64,
    caption='A retinal image of [CLS]')
# The hub form carries neither the pooling nor the tokenizer; the text tower's
# folder is the one passed as bert_type.
EXPECTED_FROM_EXPORT = dataclasses.replace(EXPECTED, bert_type=os.path.abspath(BERT_DIR),
                                           text_pooling='flair')


@pytest.fixture(scope='module')
def reference():
  with np.load(LEGACY / 'state.npz') as npz:
    return {k: npz[k] for k in npz.files}


def _assert_bitwise(state, reference):
  flat = trees.flatten(state)
  assert sorted(flat) == sorted(reference)
  for k, want in reference.items():
    got = np.asarray(flat[k])
    assert got.dtype == want.dtype and got.shape == want.shape, k
    assert np.array_equal(got, want), k


def test_the_legacy_config_file_has_the_old_keys_and_reads_as_today():
  with open(LEGACY / 'model' / 'model_config.json') as f:
    legacy = json.load(f)
  assert (legacy['resnet_stages'], legacy['resnet_width']) == ([1, 1, 1, 1], 4)
  assert 'vision_config' not in legacy
  config = ModelConfig.from_dict(legacy)
  assert config == EXPECTED
  today = config.to_dict()
  assert today['vision_config'] == {'type': 'resnet', 'stages': [1, 1, 1, 1], 'width': 4}
  assert 'resnet_stages' not in today and 'resnet_width' not in today
  assert ModelConfig.from_dict(today) == EXPECTED


def test_both_vision_forms_at_once_are_refused():
  d = EXPECTED.to_dict() | {'resnet_width': 4}
  with pytest.raises(ValueError, match='both vision_config and'):
    ModelConfig.from_dict(d)


@pytest.mark.parametrize('folder', ['model', 'workdir'])
def test_model_folder_and_workdir_load_bitwise(folder, reference):
  state, config = checkpoint.load_state(str(LEGACY / folder))
  assert config == EXPECTED
  _assert_bitwise(state, reference)
  model, config = checkpoint.load_model(str(LEGACY / folder))
  assert config == EXPECTED
  _assert_bitwise(model_state(model), reference)


def test_from_pretrained_reads_the_model_folder(reference):
  model = FLAIRModel.from_pretrained(LEGACY / 'model', tokenizer=BERT_DIR)
  assert (model.image_size, model.caption) == (EXPECTED.image_size, EXPECTED.caption)
  assert len(model.tokenizer) == EXPECTED.bert.vocab_size
  _assert_bitwise(model_state(model.model), reference)


def test_read_torch_flair_reads_the_export(reference):
  state, config = read_torch_flair(str(LEGACY / 'export'), bert_type=BERT_DIR)
  assert config == EXPECTED_FROM_EXPORT
  _assert_bitwise(state, reference)


def test_from_pretrained_reads_the_export(reference):
  model = FLAIRModel.from_pretrained(LEGACY / 'export', bert_type=BERT_DIR)
  assert (model.image_size, model.caption) == (EXPECTED.image_size, EXPECTED.caption)
  _assert_bitwise(model_state(model.model), reference)


def test_exporting_the_legacy_folder_again_gives_the_same_files(tmp_path):
  from safetensors.numpy import load_file
  out = export_to_torch(str(LEGACY / 'model'), str(tmp_path / 'export'), fmt='hf')
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors']
  for name in ('config.json',):
    with open(os.path.join(out, name)) as f, open(LEGACY / 'export' / name) as g:
      assert json.load(f) == json.load(g)
  got, want = load_file(os.path.join(out, 'model.safetensors')), load_file(
      str(LEGACY / 'export' / 'model.safetensors'))
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k


def test_a_training_workdir_of_the_previous_layout_resumes_from_its_state(tmp_path):
  """legacy/run: `python -m flair_jax.train --config configs/demo.py:tiny
  --config.eval.every_steps=0` on 2 devices with the code of commit 3633264
  (trainer.py, model_config.json with top-level resnet_stages), stopped after
  its step-6 checkpoint (model, optimiser, meta and data items). The same
  command today, with the run's length cut to those 6 steps, restores every
  item and exports the restored model: bitwise the weights of the step folder
  read back independently (machine-independent: no step runs)."""
  import shutil  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from flair_jax.convert import flair_torch  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO, subprocess_env  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'run'
  shutil.copytree(LEGACY / 'run', workdir)
  result = subprocess.run(
      [sys.executable, '-m', 'flair_jax.train', '--config', str(REPO / 'configs' / 'demo.py')
       + ':tiny', '--workdir', str(workdir), '--config.eval.every_steps=0',
       '--config.train.epochs=1', '--config.train.warmup_epochs=0',
       '--config.export_torch=True'],
      env=subprocess_env(2), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from step 6' in result.stderr
  state, config = checkpoint.load_state(str(LEGACY / 'run'))
  assert config.vision == VisionConfig(type='resnet', stages=(1, 1, 1, 1), width=4)
  want = flair_torch.to_torch_state(state, config)
  got = load_file(str(workdir / 'export_torch' / 'model.safetensors'))
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  summary = json.loads((workdir / 'config.json').read_text())
  assert summary['train']['epochs'] == 1  # the command's config, rewritten on resume
