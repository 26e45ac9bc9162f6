"""The encoder traces each tower once per batch shape: periodic evaluation
during a training run passes new weights and never re-traces."""

import collections
import json

import numpy as np

from configs import demo
from flair_jax import encoder


def test_periodic_evals_of_a_run_trace_each_tower_once_per_batch_shape(tmp_path):
  from flair_jax.training import loop  # pylint: disable=g-import-not-at-top
  cfg = demo.get_config('tiny')
  cfg.data.build.n_train = 64  # batch 16, 2 epochs: 8 steps
  cfg.checkpoint.every_steps = 100  # the final save only
  cfg.eval.every_steps = 2  # evals at steps 2, 4 and 6, and the final one at 8
  before = collections.Counter(encoder.trace_counts)
  summary = loop.train_and_evaluate(cfg, str(tmp_path))
  traced = collections.Counter(encoder.trace_counts)
  traced.subtract(before)
  traced = {key: n for key, n in traced.items() if n}

  with open(tmp_path / 'metrics.jsonl', encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  eval_steps = [r['step'] for r in rows if 'zero_shot/synthetic/aca' in r]
  assert eval_steps == [2, 4, 6, 8]
  assert 0 <= summary['results']['zero_shot/synthetic/aca'] <= 1
  towers = {tower for tower, _ in traced}
  assert towers == {'image', 'text'}
  assert traced == {key: 1 for key in traced}, traced  # four evals, one trace per shape
  image_rows = sorted(shape[0] for tower, shape in traced if tower == 'image')
  assert all(rows % 8 == 0 for rows in image_rows)  # split over the 8 test devices
  text_rows = [shape[0] for tower, shape in traced if tower == 'text']
  assert np.all(np.asarray(text_rows) % encoder.TEXT_ROWS_MULTIPLE == 0)
