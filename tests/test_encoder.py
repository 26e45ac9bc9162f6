"""The encoder traces each tower once per batch shape: periodic evaluation
during a training run passes new weights and never re-traces."""

import collections
import json
import logging
import re

import numpy as np

from configs import demo
from data_pipelines import tokenizer as tokenizer_lib
from flair_jax import encoder


def test_periodic_evals_of_a_run_trace_each_tower_once_per_batch_shape(tmp_path, caplog):
  from flair_jax.training import loop  # pylint: disable=g-import-not-at-top
  caplog.set_level(logging.INFO, logger=loop.__name__)
  cfg = demo.get_config('tiny')
  cfg.data.build.n_train = 64  # batch 16, 2 epochs: 8 steps
  cfg.checkpoint.every_steps = 100  # the final save only
  cfg.eval.every_steps = 2  # evals at steps 2, 4 and 6, and the final one at 8
  before = collections.Counter(encoder.trace_counts)
  summary = loop.train_and_evaluate(cfg, str(tmp_path))
  # The training step is compiled once per text width the batches met, at
  # a bucket width; every other step reuses it.
  compiled = [int(m.group(1)) for r in caplog.records
              if (m := re.match(r'step compiled for texts of (\d+) tokens', r.getMessage()))]
  assert compiled and len(compiled) == len(set(compiled)), compiled
  assert set(compiled) <= set(tokenizer_lib.TEXT_BUCKETS) | {tokenizer_lib.MAX_LENGTH}
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
  # Prompts go to the device cut to their text bucket (the demo's are short).
  widths = {shape[1] for tower, shape in traced if tower == 'text'}
  assert widths and widths <= set(tokenizer_lib.TEXT_BUCKETS), widths


def test_text_embeddings_cut_to_a_bucket_equal_the_model_at_77_tokens():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from flair_jax.models import BertConfig, ModelConfig, VisionConfig, build_model  # pylint: disable=g-import-not-at-top
  from tests import torch_flair  # pylint: disable=g-import-not-at-top
  model = build_model(ModelConfig(bert=BertConfig.from_dict(torch_flair.tiny_bert_config()),
                                  vision=VisionConfig(stages=(1, 1, 1, 1), width=8), proj_dim=16),
                      rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  rng = np.random.default_rng(0)
  lengths = np.array([5, 30, 12], np.int32)  # the longest, 30, takes bucket 32
  ids = rng.integers(5, 100, (3, 77)).astype(np.int32) * (np.arange(77) < lengths[:, None])
  enc = encoder.Encoder(graphdef, mesh=None)
  before = collections.Counter(encoder.trace_counts)
  got = enc.text_embeddings(enc.place(state), ids, lengths)
  new = {k for k, v in encoder.trace_counts.items() if v > before[k]}
  assert new == {('text', (encoder.TEXT_ROWS_MULTIPLE, 32))}
  model.eval()
  mask = (np.arange(77) < lengths[:, None]).astype(np.int32)
  want = np.asarray(jax.jit(model.encode_text)(jnp.asarray(ids), jnp.asarray(mask)))
  # Sums over up to 77 positions in another order (the extra positions add
  # exact zeros): within 77 * 2**-24 of the unit-norm embeddings' scale.
  np.testing.assert_allclose(got, want, rtol=0, atol=77 * 2.0 ** -24)
