"""End-to-end training: exact resume after SIGKILL, clean stop on SIGTERM,
the paper recipe's smoke run, and failures that say what to do."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, subprocess_env

TINY = ['--config', str(REPO / 'configs' / 'demo.py') + ':tiny']


def _env(devices=2):
  return subprocess_env(devices)


def _train_cmd(workdir, *extra, accumulation_steps=4):
  # Four micro-batches of 2 rows per device: resume and damage handling are
  # checked on the accumulated step (the multi-host tests run K = 1).
  return [sys.executable, '-m', 'flair_jax.train', *TINY, '--workdir', str(workdir),
          '--config.eval.every_steps=0',
          f'--config.train.accumulation_steps={accumulation_steps}', *extra]


def _steps_logged(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return max((r['step'] for r in rows if 'train/loss' in r), default=0)


def _checkpoint_steps(workdir):
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(int(p) for p in os.listdir(folder) if p.isdigit())


def _final_model(workdir):
  from flair_jax import checkpoint  # pylint: disable=g-import-not-at-top
  state, _ = checkpoint.load_state(str(workdir))
  leaves = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, f'{prefix}{k}/')
      else:
        leaves[f'{prefix}{k}'] = np.asarray(v)

  walk(state, '')
  return leaves


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  subprocess.run(_train_cmd(workdir), env=_env(), check=True, capture_output=True, timeout=600)
  return workdir


def test_sigkill_at_a_random_step_then_resume_gives_identical_parameters(uninterrupted, tmp_path):
  total = 12  # the tiny demo: 2 epochs of 6 steps
  kill_after = random.Random().randint(2, total - 2)
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(_train_cmd(workdir), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 400
  # A random step at or after the first complete checkpoint (every 3 steps).
  while ((_steps_logged(workdir) < kill_after or not _checkpoint_steps(workdir))
         and proc.poll() is None and time.time() < deadline):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _steps_logged(workdir) < total, 'the run finished before it could be killed'
  resumed = subprocess.run(_train_cmd(workdir), env=_env(), capture_output=True, text=True,
                           timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resumed from step' in resumed.stderr
  want, got = _final_model(uninterrupted), _final_model(workdir)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
  workdir = tmp_path / 'term'
  proc = subprocess.Popen(_train_cmd(workdir, '--config.checkpoint.every_steps=100',
                                     accumulation_steps=2),
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 400
  while _steps_logged(workdir) < 2 and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  summary = json.JSONDecoder().raw_decode(out[out.index('{'):])[0]
  stopped = summary['stopped_at']
  assert 2 <= stopped < 12
  assert _checkpoint_steps(workdir) == [stopped]  # saved at the step it stopped, no half checkpoint


def test_config_typo_names_the_closest_key(tmp_path):
  result = subprocess.run(_train_cmd(tmp_path, '--config.train.bach_size=8'), env=_env(),
                          capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'Did you mean "batch_size"' in result.stderr


def test_config_typo_without_a_config_file_is_one_line(tmp_path):
  # The default config (the demo) is read when the flag is defined.
  result = subprocess.run([sys.executable, '-m', 'flair_jax.train', '--workdir', str(tmp_path),
                           '--config.train.bach_size=8'], env=_env(), capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().startswith('error: ')
  assert 'Did you mean "batch_size"' in result.stderr


def test_missing_data_says_how_to_build_it(tmp_path):
  cmd = [sys.executable, '-m', 'flair_jax.train', '--config',
         str(REPO / 'configs' / 'flair_resnet50.py') + ':smoke', '--workdir', str(tmp_path)]
  result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'python -m data_pipelines build fundus_assembly' in result.stderr


def _bert_base_folder(folder, **shape):
  """A Bio_ClinicalBERT-shaped BERT (random weights) with a 28,996-token vocab
  (``shape``: BertConfig fields that make it smaller)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=28996, **shape)
  transformers.BertModel(cfg).save_pretrained(folder)
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  words += ['a', 'fundus', 'photograph', 'of', 'glaucoma', 'normal', 'clean', 'noisy']
  words += [f'tok{i}' for i in range(28996 - len(words))]
  with open(os.path.join(folder, 'vocab.txt'), 'w') as f:
    f.write('\n'.join(words) + '\n')
  transformers.BertTokenizer(vocab=os.path.join(folder, 'vocab.txt')).save_pretrained(folder)


def test_paper_recipe_compiles_and_runs_two_steps(tmp_path):
  """ResNet-50 + BERT-base (the paper's towers) at 64 px, 2 steps, CPU.

  One device: replicated over 8 simulated devices the float32 state and
  AdamW moments alone would take 8 x 2 GB.
  """
  from data_pipelines import build as build_lib  # pylint: disable=g-import-not-at-top

  report = build_lib.build('fundus_synthetic', tmp_path / 'data', n_train=16, n_test=4,
                           canvas=64, verbose=False)
  bert = tmp_path / 'bert'
  _bert_base_folder(bert)
  run = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'flair_jax.train', '--config',
         str(REPO / 'configs' / 'flair_resnet50.py') + ':smoke', '--workdir', str(run),
         f'--config.data.path={report["path"]}', '--config.data.epoch_length=16',
         f'--config.model.bert_type={bert}', '--config.train.epochs=1',
         '--config.export_torch=False', '--config.plots=False', '--config.log_every_steps=1']
  result = subprocess.run(cmd, env=_env(devices=1), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.JSONDecoder().raw_decode(result.stdout[result.stdout.index('{'):])[0]
  assert summary['final_step'] == 2
  rows = [json.loads(line) for line in open(run / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2]
  assert all(np.isfinite(r['train/loss']) for r in rows)
  # FLAIR's warm-up: base_lr / warmup_steps, then base_lr at the epoch's end.
  assert rows[0]['train/lr'] == pytest.approx(5e-5)
  assert rows[1]['train/lr'] == pytest.approx(1e-4)


def test_non_finite_values_stop_the_run_naming_the_step(tmp_path):
  result = subprocess.run(_train_cmd(tmp_path, '--config.train.lr=1e30'), env=_env(),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 2  # an expected outcome: one line saying what to do
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'at step 1;' in last and 'lower train.lr' in last
  assert 'Traceback' not in result.stderr
  assert _checkpoint_steps(tmp_path) == []  # nothing non-finite was saved


# ------------------------------------------------------- damaged checkpoints


def _array_files(step_dir):
  """The array data files of a step's model item (orbax OCDBT)."""
  return [p for p in (step_dir / 'model').rglob('*') if p.is_file() and p.parent.name == 'd'
          and p.parent.parent.name.startswith('ocdbt.process_')]


def _truncate_largest_array_file(step_dir):
  victim = max(_array_files(step_dir), key=lambda p: p.stat().st_size)
  with open(victim, 'r+b') as f:
    f.truncate(victim.stat().st_size // 2)


def _set_aside(workdir, kind):
  return sorted(p.name for p in (workdir / 'checkpoints').iterdir() if f'.{kind}-' in p.name)


def _assert_same_final_model(workdir, reference):
  want, got = _final_model(reference), _final_model(workdir)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_a_truncated_latest_checkpoint_is_set_aside_and_the_run_resumes_bitwise(
    uninterrupted, tmp_path):
  workdir = tmp_path / 'damaged'
  shutil.copytree(uninterrupted, workdir)
  assert _checkpoint_steps(workdir) == [6, 9, 12]
  _truncate_largest_array_file(workdir / 'checkpoints' / '12')
  result = subprocess.run(_train_cmd(workdir), env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'checkpoint step 12 is not usable' in result.stderr
  assert 'resumed from step 9' in result.stderr
  aside = _set_aside(workdir, 'damaged')
  assert len(aside) == 1 and aside[0].startswith('12.damaged-')
  assert _array_files(workdir / 'checkpoints' / aside[0])  # kept, not deleted
  _assert_same_final_model(workdir, uninterrupted)


def test_a_save_that_never_finished_is_ignored(uninterrupted, tmp_path):
  workdir = tmp_path / 'unfinished'
  shutil.copytree(uninterrupted, workdir)
  ckpts = workdir / 'checkpoints'
  # What a save killed halfway leaves: orbax's temporary folder (local disks
  # rename it into place when complete) or, on storage without atomic renames,
  # a step folder that lacks the commit marker orbax writes last.
  shutil.copytree(ckpts / '12', ckpts / '15.orbax-checkpoint-tmp-1764620000')
  (ckpts / '12' / 'commit_success.txt').unlink()
  result = subprocess.run(_train_cmd(workdir), env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from step 9' in result.stderr
  assert [n.split('-')[0] for n in _set_aside(workdir, 'incomplete')] == ['12.incomplete']
  _assert_same_final_model(workdir, uninterrupted)


def test_when_no_checkpoint_restores_the_run_stops_naming_the_folder(uninterrupted, tmp_path):
  workdir = tmp_path / 'all_damaged'
  shutil.copytree(uninterrupted, workdir)
  for step in _checkpoint_steps(workdir):
    _truncate_largest_array_file(workdir / 'checkpoints' / str(step))
  result = subprocess.run(_train_cmd(workdir), env=_env(), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and errors[0].startswith('error: no checkpoint in ')
  assert str(workdir / 'checkpoints') in errors[0]
  assert 'step 12: ' in errors[0] and 'step 6: ' in errors[0]
  where = result.stderr.find('Traceback')
  assert where < 0, result.stderr[max(0, where - 1500):where + 1500]
  # The cause may be a changed config rather than damage: everything is put back.
  assert _set_aside(workdir, 'damaged') == [] and _checkpoint_steps(workdir) == [6, 9, 12]


def test_echoes_of_abandoned_tensorstore_reads_are_dropped_and_nothing_else(caplog):
  """asyncio reports an exception no one retrieved when its future is
  collected, which for the reads of a failed restore can be at exit."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import gc  # pylint: disable=g-import-not-at-top
  from flair_jax.training import checkpoints  # pylint: disable=g-import-not-at-top

  def abandon(message):
    loop = asyncio.new_event_loop()
    future = loop.create_future()
    future.set_exception(Exception(message))
    del future
    gc.collect()
    loop.close()

  log = logging.getLogger('asyncio')
  log.addFilter(checkpoints._ABANDONED_READ_ECHOES)  # pylint: disable=protected-access
  try:
    with caplog.at_level(logging.ERROR, logger='asyncio'):
      abandon('Encountered error while reading array index: (slice(0, 64, 1),). See full '
              'TensorStore details')
      abandon("OUT_OF_RANGE: Error opening \"cast\" driver [tensorstore_spec[0]='{}']")
      assert not caplog.records
      abandon('something else')
      assert [r.getMessage().splitlines()[0] for r in caplog.records] == [
          'Future exception was never retrieved']
  finally:
    log.removeFilter(checkpoints._ABANDONED_READ_ECHOES)  # pylint: disable=protected-access

  # A read coroutine closed unfinished reaches sys.unraisablehook instead.
  import types  # pylint: disable=g-import-not-at-top
  passed = []
  hook = checkpoints._UnraisableAbandonedReads(passed.append)  # pylint: disable=protected-access

  async def read():
    pass

  coroutine = read()
  hook(types.SimpleNamespace(object=coroutine, exc_value=Exception(
      'Encountered error while reading array index: (slice(0, 1, 1),).')))
  assert passed == []
  other = types.SimpleNamespace(object=coroutine, exc_value=Exception('something else'))
  hook(other)
  not_a_read = types.SimpleNamespace(object=object(), exc_value=Exception('reading array index'))
  hook(not_a_read)
  assert passed == [other, not_a_read]
  coroutine.close()



def test_vit_recipe_compiles_and_runs_two_steps(tmp_path):
  """configs/flair_vit.py:smoke: its ViT-B/16, 2 steps on the CPU.

  The text tower is a 2-layer BERT: BERT-base's compilation is the paper
  recipe test's, and would double this one's time.
  """
  from data_pipelines import build as build_lib  # pylint: disable=g-import-not-at-top

  report = build_lib.build('fundus_synthetic', tmp_path / 'data', n_train=16, n_test=4,
                           canvas=64, verbose=False)
  bert = tmp_path / 'bert'
  _bert_base_folder(bert, num_hidden_layers=2, hidden_size=64, num_attention_heads=2,
                    intermediate_size=128)
  run = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'flair_jax.train', '--config',
         str(REPO / 'configs' / 'flair_vit.py') + ':smoke', '--workdir', str(run),
         f'--config.data.path={report["path"]}', '--config.data.epoch_length=16',
         f'--config.model.bert_type={bert}', '--config.train.epochs=1',
         '--config.export_torch=False', '--config.plots=False', '--config.log_every_steps=1']
  result = subprocess.run(cmd, env=_env(devices=1), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [json.loads(line) for line in open(run / 'metrics.jsonl')]
  assert [r['step'] for r in rows] == [1, 2]
  assert all(np.isfinite(r['train/loss']) for r in rows)
  config = json.load(open(run / 'model_config.json'))['vision_config']
  assert (config['type'], config['embed_dim'], config['depth'], config['image_size']) == (
      'vit', 768, 12, 32)


def test_vit_demo_learns_the_synthetic_set_and_exports_for_timm(tmp_path):
  """configs/demo.py:vit: a tiny ViT learns zero-shot from scratch on the CPU."""
  cmd = [sys.executable, '-m', 'flair_jax.train', '--config',
         str(REPO / 'configs' / 'demo.py') + ':vit', '--workdir', str(tmp_path)]
  result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.JSONDecoder().raw_decode(result.stdout[result.stdout.index('{'):])[0]
  # 6 classes: chance is 0.167; the ResNet demo reaches 0.9 in more steps.
  assert summary['results']['zero_shot/synthetic/aca'] >= 0.8
  assert {'image_encoder.safetensors', 'heads.safetensors', 'text_encoder'} <= set(
      summary['export_files'])
