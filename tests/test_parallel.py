"""Mesh, shardings, global batches; a real two-process run on CPU (gloo)."""

import json
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flair_jax import parallel

from flair_jax.training import losses
from tests.conftest import subprocess_env


def test_make_mesh_covers_all_devices_with_auto_axes():
  mesh = parallel.make_mesh()
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  if jax.device_count() >= 8:
    assert dict(parallel.make_mesh(data=4, fsdp=2).shape) == {'data': 4, 'fsdp': 2}


def test_make_mesh_refuses_sizes_that_do_not_cover_the_devices():
  with pytest.raises(ValueError, match='does not cover the'):
    parallel.make_mesh(data=jax.device_count() + 1)
  with pytest.raises(ValueError, match='fsdp axis size 0'):
    parallel.make_mesh(fsdp=0)


def test_global_batch_on_one_process_is_the_local_batch_sharded():
  mesh = parallel.make_mesh()
  n = jax.device_count()
  local = {'image': np.arange(2 * n * 3, dtype=np.uint8).reshape(2 * n, 3),
           'category': np.arange(2 * n, dtype=np.int32)}
  batch = parallel.global_batch(local, mesh)
  for key, value in local.items():
    np.testing.assert_array_equal(np.asarray(batch[key]), value)
    assert batch[key].sharding.is_equivalent_to(parallel.batch_sharding(mesh), value.ndim)
    assert {s.data.shape[0] for s in batch[key].addressable_shards} == {2}


def test_replicated_places_the_whole_array_on_every_device():
  x = jax.device_put(jnp.arange(5.0), parallel.replicated(parallel.make_mesh()))
  assert all(s.data.shape == (5,) for s in x.addressable_shards)


def test_place_takes_host_uncommitted_and_committed_arrays_onto_the_mesh():
  mesh = parallel.make_mesh()
  sharding = parallel.replicated(mesh)
  value = np.arange(12, dtype=np.float32).reshape(3, 4)
  tree = {'host': value, 'uncommitted': jnp.asarray(value),
          'committed': jax.device_put(value, jax.devices()[-1]), 'name': 'kept'}
  placed = parallel.place(tree, sharding)
  assert placed['name'] == 'kept'
  for key in ('host', 'uncommitted', 'committed'):
    x = placed[key]
    assert x.sharding == sharding and len(x.addressable_shards) == jax.device_count()
    for shard in x.addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), value)
  assert parallel.place(placed, sharding)['host'] is placed['host']  # already there
  rows = np.arange(2 * jax.device_count() * 3, dtype=np.float32).reshape(-1, 3)
  batch = parallel.place(jax.device_put(rows, jax.devices()[0]), parallel.batch_sharding(mesh))
  assert batch.sharding == parallel.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(batch), rows)


def test_specs_split_the_leading_dimension_over_the_named_axes():
  assert parallel.batch_spec() == jax.sharding.PartitionSpec('data')
  assert parallel.batch_spec(('data', 'fsdp')) == jax.sharding.PartitionSpec(('data', 'fsdp'))
  assert parallel.replicated_spec() == jax.sharding.PartitionSpec()
  mesh = parallel.make_mesh()
  assert parallel.batch_sharding(mesh).spec == jax.sharding.PartitionSpec('data')


def test_agreements_on_one_process_are_the_local_values():
  assert parallel.is_main_process()
  assert parallel.any_process(True) is True and parallel.any_process(False) is False
  assert parallel.on_main_process(lambda: 42, 'the answer') == 42
  parallel.sync_processes('nothing to wait for')  # no collective on one process
  with pytest.raises(KeyError):  # process 0's own error, not ProcessZeroError
    parallel.on_main_process(lambda: {}['missing'], 'a lookup')


def test_maybe_initialize_distributed_calls_jax_only_when_asked(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  assert not parallel.maybe_initialize_distributed(False, 'host:1234', 4, 0)
  assert not parallel.maybe_initialize_distributed(True, num_processes=1)
  assert calls == []
  assert parallel.maybe_initialize_distributed(True, 'host:1234', 4, 2)
  assert calls == [dict(coordinator_address='host:1234', num_processes=4, process_id=2)]


def _worker(process_id, port):
  """One of two processes x 2 CPU devices: global batch + sharded loss."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  assert parallel.maybe_initialize_distributed(True, f'localhost:{port}', 2, process_id)
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  img, txt = rng.standard_normal((2, 8, 5)).astype(np.float32)
  cat = np.array([0, 1, 1, 2, 0, 3, 3, 3], np.int32)
  mine = slice(4 * process_id, 4 * process_id + 4)
  batch = parallel.global_batch({'img': img[mine], 'txt': txt[mine], 'cat': cat[mine]}, mesh)
  loss = jax.jit(losses.sharded_label_aware_contrastive_loss(mesh))(
      batch['img'], batch['txt'], jnp.float32(1.0), batch['cat'])
  longest = parallel.ProcessMax('test')  # a text length per process, per step
  agreed = [longest(pair[process_id]) for pair in ((5, 30), (17, 3), (9, 9), (1, 2))]
  print(json.dumps({
      'agreed': agreed,
      'devices': jax.device_count(), 'shape': list(batch['img'].shape),
      'local_rows': sorted(int(s.index[0].start) for s in batch['img'].addressable_shards),
      'loss': float(loss),
      'reference': float(losses.label_aware_contrastive_loss(img, txt, jnp.float32(1.0), cat)),
  }))


def test_two_processes_assemble_the_global_batch_and_agree_on_the_loss():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = subprocess_env(2)
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  results = []
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert [r['local_rows'] for r in results] == [[0, 2], [4, 6]]
  assert [r['agreed'] for r in results] == [[30, 17, 9, 2]] * 2
  for r in results:
    assert r['devices'] == 4 and r['shape'] == [8, 5]
    np.testing.assert_allclose(r['loss'], r['reference'], rtol=1e-6)


if __name__ == '__main__':
  _worker(int(sys.argv[1]), int(sys.argv[2]))
