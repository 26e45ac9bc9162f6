"""flair_jax checkpoints: model folders, trainer workdirs, configs."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from flair_jax import checkpoint, parallel, trees
from flair_jax.convert import export_to_torch
from flair_jax.models import BertConfig, ModelConfig, VisionConfig, build_model
from flair_jax.models.state import assign_state, model_state
from flair_jax.training import step as step_lib

CONFIG = ModelConfig(
    bert=BertConfig(vocab_size=31, hidden_size=12, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=17, max_position_embeddings=23),
    bert_type='some-org/some-bert', vision=VisionConfig(stages=(1, 2), width=4), proj_dim=7,
    text_pooling='masked', image_size=33, caption='An eye with [CLS]')


def _random_state(like, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (rng.integers(0, 1000, s.shape) if s.dtype == np.int32
                 else rng.standard_normal(s.shape)).astype(s.dtype), like)


def _model(seed):
  model = nnx.eval_shape(lambda: build_model(CONFIG))
  assign_state(model, _random_state(model_state(model), seed))
  return model


def _assert_equal(a, b):
  fa, fb = trees.flatten(a), trees.flatten(b)
  assert set(fa) == set(fb)
  for k in fa:
    x, y = np.asarray(fa[k]), np.asarray(fb[k])
    assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k


@pytest.fixture(scope='module')
def model():
  return _model(0)


@pytest.fixture(scope='module')
def model_dir(model, tmp_path_factory):
  return checkpoint.save_model(model, CONFIG, str(tmp_path_factory.mktemp('ckpt') / 'model'))


def test_model_folder_round_trip_is_bitwise(model, model_dir):
  assert sorted(os.listdir(model_dir)) == ['model', 'model_config.json']
  loaded, config = checkpoint.load_model(model_dir)
  assert config == CONFIG
  _assert_equal(model_state(loaded), model_state(model))
  assert loaded.vision_model.bn1.use_running_average  # eval mode
  assert loaded.text_pooling == 'masked' and loaded.vision_model.out_features == 4 * 2 * 4


def test_model_config_json_round_trips_and_refuses_unknown_keys(model_dir):
  with open(os.path.join(model_dir, 'model_config.json')) as f:
    d = json.load(f)
  assert d['vision_config'] == {'type': 'resnet', 'stages': [1, 2], 'width': 4}
  assert d['bert_config']['hidden_size'] == 12
  assert d['bert_type'] == 'some-org/some-bert' and d['caption'] == 'An eye with [CLS]'
  assert ModelConfig.from_dict(d) == CONFIG
  with pytest.raises(ValueError, match="unknown keys \\['proj_dims'\\]"):
    ModelConfig.from_dict({**d, 'proj_dims': 3})


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A trainer-style workdir: CheckpointManager steps 3 and 12, config on top."""
  wd = tmp_path_factory.mktemp('workdir')
  checkpoint.save_model_config(CONFIG, str(wd / 'model_config.json'))
  states = {3: model_state(_model(3)), 12: model_state(_model(12))}
  with ocp.CheckpointManager(str(wd / 'checkpoints')) as mngr:
    for step, state in states.items():
      mngr.save(step, args=ocp.args.Composite(model=ocp.args.StandardSave(state),
                                              extra=ocp.args.JsonSave({'step': step})))
    mngr.wait_until_finished()
  (wd / 'checkpoints' / '15.orbax-checkpoint-tmp-1').mkdir()  # an unfinished save
  return wd, states


def test_resolve_checkpoint_finds_the_latest_step_of_a_workdir(workdir):
  wd, states = workdir
  item = str(wd / 'checkpoints' / '12' / 'model')
  config = str(wd / 'model_config.json')
  for path in (wd, wd / 'checkpoints', wd / 'checkpoints' / '12'):
    assert checkpoint.resolve_checkpoint(str(path)) == (item, config)
  assert checkpoint.resolve_checkpoint(str(wd / 'checkpoints' / '3'))[0].endswith('/3/model')
  state, loaded = checkpoint.load_state(str(wd))
  assert loaded == CONFIG
  _assert_equal(state, states[12])


def test_a_step_without_its_commit_marker_is_not_a_checkpoint(workdir, tmp_path):
  wd, states = workdir
  shutil.copytree(wd, tmp_path / 'wd', symlinks=True)
  unfinished = tmp_path / 'wd' / 'checkpoints' / '20'
  shutil.copytree(wd / 'checkpoints' / '3', unfinished)
  (unfinished / checkpoint.COMMIT_MARKER).unlink()  # a save killed before its commit
  assert checkpoint.resolve_checkpoint(str(tmp_path / 'wd'))[0].endswith('/12/model')
  _assert_equal(checkpoint.load_state(str(tmp_path / 'wd'))[0], states[12])


def test_a_config_inside_the_step_wins(workdir, tmp_path):
  wd, _ = workdir
  step = tmp_path / 'checkpoints' / '5'
  step.mkdir(parents=True)
  os.symlink(wd / 'checkpoints' / '12' / 'model', step / 'model')
  (step / checkpoint.COMMIT_MARKER).write_text('')  # a step orbax finished
  checkpoint.save_model_config(dataclasses.replace(CONFIG, caption='[CLS]'), str(step / 'model_config.json'))
  checkpoint.save_model_config(CONFIG, str(tmp_path / 'model_config.json'))
  _, config = checkpoint.load_state(str(tmp_path))
  assert config.caption == '[CLS]'


def test_to_torch_reads_a_workdir(workdir, tmp_path):
  wd, states = workdir
  out = export_to_torch(str(wd), str(tmp_path / 'export'), fmt='hf')
  from safetensors.numpy import load_file
  sd = load_file(os.path.join(out, 'model.safetensors'))
  np.testing.assert_array_equal(sd['logit_scale'], states[12]['logit_scale'])
  np.testing.assert_array_equal(sd['vision_model.model.layer2.1.conv2.weight'],
                                states[12]['vision_model']['layer2'][1]['conv2']['kernel']
                                .transpose(3, 2, 0, 1))


def test_resolve_checkpoint_refuses_what_is_not_a_checkpoint(workdir, tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoint.resolve_checkpoint(str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='is not a flair_jax checkpoint'):
    checkpoint.resolve_checkpoint(str(tmp_path))
  wd, _ = workdir
  lone = tmp_path / 'lone'
  lone.mkdir()
  os.symlink(wd / 'checkpoints' / '12' / 'model', lone / 'model')
  with pytest.raises(FileNotFoundError, match='has no model_config.json'):
    checkpoint.resolve_checkpoint(str(lone))


def test_a_config_that_does_not_fit_the_state_is_refused(model_dir, tmp_path):
  bad = tmp_path / 'bad'
  bad.mkdir()
  os.symlink(os.path.join(model_dir, 'model'), bad / 'model')
  checkpoint.save_model_config(dataclasses.replace(CONFIG, proj_dim=8), str(bad / 'model_config.json'))
  with pytest.raises(ValueError, match='does not fit the model') as e:
    checkpoint.load_state(str(bad))
  assert 'text_projection/projection/kernel is float32[12, 7], expected float32[12, 8]' in str(e.value)
  assert 'vision_projection/projection/kernel is float32[32, 7]' in str(e.value)


def test_assign_state_names_every_mismatch(model):
  state = dict(model_state(model))
  state['logit_scale'] = np.zeros((2,), np.float32)
  state['extra'] = np.zeros((1,), np.float32)
  del state['text_projection']
  with pytest.raises(ValueError) as e:
    assign_state(model, state)
  msg = str(e.value)
  assert 'missing text_projection/projection/kernel' in msg
  assert 'unexpected extra' in msg
  assert 'logit_scale has shape (2,), expected ()' in msg


def test_save_refuses_a_non_empty_folder_and_keeps_it(model, tmp_path):
  (tmp_path / 'mine.txt').write_text('keep')
  with pytest.raises(FileExistsError, match='not empty'):
    checkpoint.save_model(model, CONFIG, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['mine.txt']


def test_a_loaded_model_goes_onto_a_mesh_of_every_device(model, model_dir):
  # load_model commits its arrays to one device; a jitted creation with
  # out_shardings over all devices refused them before parallel.place.
  loaded, _ = checkpoint.load_model(model_dir)
  mesh = parallel.make_mesh()
  _, state = step_lib.create_train_state(loaded, optax.adam(1e-3), mesh)
  want = parallel.replicated(mesh)
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim), leaf.sharding
  _assert_equal(dict(params=state.params, batch_stats=state.batch_stats),
                dict(params=nnx.state(model, nnx.Param), batch_stats=nnx.state(model, nnx.BatchStat)))
