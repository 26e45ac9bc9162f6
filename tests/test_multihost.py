"""Multi-host training as a user runs it: two ``python -m flair_jax.train``
processes on one machine (2 CPU devices each, one workdir), against one
process with 4 devices, and a SIGKILL of both processes then the same
command again."""

import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, subprocess_env
from tests.test_train import _final_model

TOTAL_STEPS = 12  # the tiny demo: 2 epochs of 6 steps, a checkpoint every 3
ARGS = ['-m', 'flair_jax.train', '--config', str(REPO / 'configs' / 'demo.py') + ':tiny',
        '--config.eval.every_steps=0', '--config.export_torch=True']


def _env(devices):
  env = subprocess_env(devices)
  env.pop('JAX_CPU_COLLECTIVES_IMPLEMENTATION', None)  # the trainer picks gloo itself
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start_two(workdir, log_dir):
  port = _free_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, *ARGS, '--workdir', str(workdir),
           '--config.distributed.initialize=True',
           f'--config.distributed.coordinator_address=localhost:{port}',
           '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}']
    log = open(log_dir / f'process_{i}.log', 'w')
    procs.append((subprocess.Popen(cmd, env=_env(2), stdout=log, stderr=subprocess.STDOUT), log))
  return procs


def _wait(procs, timeout=600):
  deadline = time.time() + timeout
  codes = []
  for proc, log in procs:
    try:
      codes.append(proc.wait(timeout=max(1, deadline - time.time())))
    except subprocess.TimeoutExpired:
      proc.kill()
      codes.append(proc.wait())
    log.close()
  return codes


def _logs(log_dir):
  return {i: (log_dir / f'process_{i}.log').read_text() for i in range(2)}


def _summary(text):
  return json.JSONDecoder().raw_decode(text[text.index('{\n'):])[0]


def _committed_steps(workdir):
  folder = workdir / 'checkpoints'
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir()
                if p.name.isdigit() and (p / 'commit_success.txt').is_file())


def _train_metrics(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if 'train/loss' in r]


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  root = tmp_path_factory.mktemp('two_processes')
  codes = _wait(_start_two(root / 'run', root))
  logs = _logs(root)
  assert codes == [0, 0], '\n'.join(t[-3000:] for t in logs.values())
  return root / 'run', logs


def test_two_processes_equal_one_process_with_as_many_devices(two_processes, tmp_path):
  workdir, logs = two_processes
  one = tmp_path / 'one'
  result = subprocess.run([sys.executable, *ARGS, '--workdir', str(one)], env=_env(4),
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  want, got = _final_model(one), _final_model(workdir)
  assert want.keys() == got.keys()
  # Both runs reduce over the same 4 device shards of each global batch; only
  # the order of the cross-device sums differs (gloo between processes, the
  # in-process all-reduce otherwise). Each such sum of 4 float32 partials
  # rounds at <= 3u of its inputs (u = 2**-24); through ~14 layers of
  # reductions and the 6 steps of the first epoch that bounds each logged
  # figure's relative drift by about 6 * 14 * 3u = 1.5e-5 (measured: <= 4e-6).
  # A missing gradient all-reduce changes l2_grads at step 1, per-process
  # BatchNorm statistics the loss, each by far more.
  mine, theirs = _train_metrics(one), _train_metrics(workdir)
  assert [m['step'] for m in mine] == [m['step'] for m in theirs] == list(range(1, 13))
  for a, b in zip(mine[:6], theirs[:6]):
    for key in ('train/loss', 'train/l2_grads', 'train/l2_updates', 'train/l2_params'):
      assert abs(a[key] - b[key]) <= 6 * 14 * 3 * 2.0 ** -24 * abs(a[key]), (a['step'], key)
  # Past that, Adam amplifies the rounding: an element whose gradient is
  # rounding noise moves by up to lr either way each step (g / (|g| + eps)),
  # so the final states differ by at most sum_t lr_t * sqrt(N) over the N
  # float elements (measured: 2.3e-4 of |state| on an AMD EPYC, where the
  # first epoch agrees to 4e-6; an earlier run on another CPU, 1e-7).
  diff = np.sqrt(sum(np.sum((got[k].astype(np.float64) - want[k]) ** 2) for k in want
                     if want[k].dtype.kind == 'f'))
  n = sum(want[k].size for k in want if want[k].dtype.kind == 'f')
  assert diff <= sum(m['train/lr'] for m in mine) * np.sqrt(n), (diff, n)
  for k in want:
    if want[k].dtype.kind != 'f':  # step counters
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_two_processes_evaluate_and_export_on_process_zero(two_processes):
  workdir, logs = two_processes
  summary = _summary(logs[0])
  assert summary['final_step'] == TOTAL_STEPS
  assert 0 <= summary['results']['zero_shot/synthetic/aca'] <= 1
  assert summary['export'] == str(workdir / 'export_torch')
  assert {'config.json', 'model.safetensors', 'text_encoder'} <= set(summary['export_files'])
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from flair_jax.convert import flair_torch as convert_flair  # pylint: disable=g-import-not-at-top
  from flair_jax import checkpoint  # pylint: disable=g-import-not-at-top
  exported = load_file(str(workdir / 'export_torch' / 'model.safetensors'))
  state, config = checkpoint.load_state(str(workdir))
  want = convert_flair.to_torch_state(state, config)  # the last checkpoint, read back independently
  assert exported.keys() == want.keys()
  for k in want:
    np.testing.assert_array_equal(exported[k], want[k], err_msg=k)
  rows = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert [r['step'] for r in rows if 'train/loss' in r] == list(range(1, TOTAL_STEPS + 1))
  assert 'export' not in _summary(logs[1])  # process 1 waited at the barrier


def test_sigkill_of_both_processes_then_the_same_command_resumes_bitwise(two_processes, tmp_path):
  workdir = tmp_path / 'run'
  procs = _start_two(workdir, tmp_path)
  deadline = time.time() + 500
  while (not _committed_steps(workdir) and time.time() < deadline
         and all(p.poll() is None for p, _ in procs)):
    time.sleep(0.05)
  for proc, _ in procs:
    proc.send_signal(signal.SIGKILL)
  _wait(procs)
  killed_at = _committed_steps(workdir)
  assert killed_at and killed_at[-1] < TOTAL_STEPS, f'killed too late: steps {killed_at}'
  codes = _wait(_start_two(workdir, tmp_path))
  logs = _logs(tmp_path)
  assert codes == [0, 0], '\n'.join(t[-3000:] for t in logs.values())
  assert 'resumed from step' in logs[0]
  assert _summary(logs[0])['first_step'] >= killed_at[-1]
  want, got = _final_model(two_processes[0]), _final_model(workdir)
  assert want.keys() == got.keys()
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
