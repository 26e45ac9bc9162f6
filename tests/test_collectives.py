"""Collectives of the compiled 8-device training step: the loss's gathers,
gradient all-reduces of the right size, and nothing batch-sized moved."""

import numpy as np
import pytest

import jax

from benchmarks import collectives

BATCH = 24  # 3 rows per device; no tower dimension equals 24
IMAGE = collectives.TINY['image']
PROJ = collectives.TINY['proj_dim']


def test_parser_reads_tuples_async_starts_and_metadata():
  hlo = '\n'.join([
      '  %all_gather.10 = s32[16]{0} all-gather(%p), channel_id=1, dimensions={0}, '
      'metadata={op_name="jit(f)/jvp()/shard_map/all_gather" stack_frame_id=1}',
      '  %ar = (f32[3,5]{1,0}, /*index=1*/bf16[7]{0}, f32[]) all-reduce(%a, %b, %c), '
      'to_apply=%add, metadata={op_name="jit(f)/transpose(jvp())/dot_general"}',
      '  %ags = (f32[2,4]{1,0}, f32[16,4]{1,0}) all-gather-start(%x), dimensions={0}',
      '  %agd = f32[16,4]{1,0} all-gather-done(%ags)',
      '  %add = f32[] add(%x, %y)',
  ])
  found = collectives.parse_collectives(hlo)
  assert [c.kind for c in found] == ['all-gather', 'all-reduce', 'all-gather']
  assert found[0].arrays == (('s32', (16,)),) and found[0].bytes == 64
  assert collectives.role(found[0]) == 'loss gather'
  assert found[1].bytes == 3 * 5 * 4 + 7 * 2 + 4 and len(found[1].arrays) == 3
  assert collectives.role(found[1]) == 'backward'
  assert found[2].arrays == (('f32', (16, 4)),)  # the gathered result, not the operand


@pytest.fixture(scope='module')
def step_on_eight_devices():
  if len(jax.devices()) < 8:
    pytest.skip('needs XLA_FLAGS=--xla_force_host_platform_device_count=8')
  compiled, state = collectives.compile_tiny_step(jax.devices()[:8], batch=BATCH)
  return collectives.parse_collectives(compiled.as_text()), state


def test_loss_gathers_embeddings_and_ids_and_nothing_else(step_on_eight_devices):
  found, _ = step_on_eight_devices
  gathers = sorted((c.arrays for c in found if c.kind == 'all-gather'), key=str)
  # Two [B, D] embeddings and the [B] category ids, gathered whole.
  assert gathers == sorted([(('f32', (BATCH, PROJ)),)] * 2 + [(('s32', (BATCH,)),)], key=str)
  assert all(collectives.role(c) == 'loss gather' for c in found if c.kind == 'all-gather')
  assert not [c for c in found if c.kind in ('all-to-all', 'collective-permute')]


def test_no_collective_moves_images_or_activations(step_on_eight_devices):
  found, _ = step_on_eight_devices
  image_elements_per_device = BATCH // 8 * IMAGE * IMAGE * 3
  for c in found:
    for _, dims in c.arrays:
      assert not (dims and dims[0] == BATCH and len(dims) >= 3), (c.kind, dims, c.op_name)
      if c.kind != 'all-reduce':  # gradients may be large; gathers must stay small
        assert np.prod(dims) < image_elements_per_device, (c.kind, dims, c.op_name)


def test_gradients_are_all_reduced_once_within_bounds(step_on_eight_devices):
  found, state = step_on_eight_devices
  params = jax.tree.leaves(state.params)
  param_bytes = sum(p.nbytes for p in params)
  batchnorms = len(jax.tree.leaves(state.batch_stats)) // 3  # mean, var, count each
  summary = collectives.summarize(found)
  reduces = summary['kinds']['all-reduce']
  # One reduction per gradient at most, plus BatchNorm's forward and backward
  # sums and a few scalars; XLA's combiner only lowers the count.
  assert 1 <= reduces['count'] <= len(params) + 4 * batchnorms + 8
  # The gradients cross devices once: about the parameters' bytes (less the
  # unused pooler and the position rows past the static length), not twice.
  weights = summary['backward_operands']['weight_bytes']
  assert 0.8 * param_bytes < weights <= param_bytes
  assert reduces['bytes'] < 1.1 * param_bytes
  stats = summary['roles']['all-reduce: BatchNorm statistics']
  assert stats['operands'] == 2 * batchnorms  # mean and mean of squares per layer
