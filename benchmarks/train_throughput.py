"""Training throughput and MFU: the flair_jax step against a PyTorch FLAIR step.

In one process, timing blocks of the jitted flair_jax training step
(``flair_jax.training.step.make_train_step``) alternate with blocks of a PyTorch
FLAIR-equivalent iteration (``benchmarks/torch_flair_step.py``) on the same
batches; warm-up steps and compilation are excluded. Reported: images/s of
each and their ratio; for flair_jax the FLOPs of one step from XLA's cost
analysis of the compiled program (2 per multiply-add; per device, times the
devices), FLOPs per sample, the achieved rate and the MFU against the
device's dense peak (accelerators only), and the peak memory of each.

Precision: float32 on CPU; on GPU flair_jax computes in bfloat16 and torch in
PyTorch FLAIR's own setting, fp16 autocast with a GradScaler. torch pads each
batch's captions to its longest one (as FLAIR's tokenizer call does);
flair_jax cuts each batch's ids to its text bucket (``--text-buckets``, the
training loop's default widths; with no values, the static
``--text-length``, 77, the pipeline's). ``--captions knowledge`` draws
FLAIR's captions (template, category, expert-knowledge description) and
tokenizes them with ``--tokenizer`` instead of drawing random lengths.

  python benchmarks/train_throughput.py --image-size 64 --batch 16 \\
      --resnet-stages 1 1 1 1 --resnet-width 16 --bert-layers 2 --bert-hidden 64 \\
      --bert-heads 2 --bert-intermediate 128 --bert-vocab 1000 --proj-dim 32
  python benchmarks/train_throughput.py --image-size 224 --batch 8   # ResNet-50 + BERT-base
  python benchmarks/train_throughput.py --vision vit --image-size 224 --batch 128
      # ViT-B/16 (timm's VisionTransformer on the torch side) + BERT-base

``--mode grain`` feeds both from the grain pipeline over a ``fundus_synthetic``
set built (once) at the image size under ``--data-dir``.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import datetime
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import machine_info
from data_pipelines import tokenizer as tokenizer_lib
from flair_jax import parallel
from flair_jax.training import optim, step as step_lib
from flair_jax.models import BertConfig, ModelConfig, VisionConfig, build_model
# pylint: enable=g-import-not-at-top,wrong-import-position

# Dense peak TFLOP/s per chip: (device-kind substring, compute dtype) -> peak.
# bfloat16: tensor-core dense; float32: TF32 tensor-core dense.
PEAK_TFLOPS = {
    ('H200', 'bfloat16'): 989.0, ('H100', 'bfloat16'): 989.0, ('A100', 'bfloat16'): 312.0,
    ('H200', 'float32'): 494.0, ('H100', 'float32'): 494.0, ('A100', 'float32'): 156.0,
}
FROZEN = ('text_model/pooler/.*',)  # unused by FLAIR: torch gives it no gradient
NUM_CATEGORIES = 8


def make_model(args, dtype):
  """The FLAIR model of the requested sizes, in train mode."""
  bert = BertConfig(vocab_size=args.bert_vocab, hidden_size=args.bert_hidden,
                    num_hidden_layers=args.bert_layers, num_attention_heads=args.bert_heads,
                    intermediate_size=args.bert_intermediate)
  if args.vision == 'vit':
    vision = VisionConfig(type='vit', image_size=args.image_size, patch_size=args.vit_patch,
                          embed_dim=args.vit_width, depth=args.vit_depth, heads=args.vit_heads,
                          remat=args.remat)
  else:
    vision = VisionConfig(stages=tuple(args.resnet_stages), width=args.resnet_width)
  model = build_model(ModelConfig(bert=bert, vision=vision, proj_dim=args.proj_dim), dtype,
                      nnx.Rngs(0))
  model.train()
  return model


def _leaf_value(name, shape, dtype, rng):
  if name == 'kernel':  # He-like scale keeps activations O(1); values do not matter here
    return (rng.standard_normal(shape, np.float32) / math.sqrt(np.prod(shape[:-1]))).astype(dtype)
  if name in ('embedding', 'cls_token', 'pos_embed'):
    return (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)
  if name in ('scale', 'var'):
    return np.ones(shape, dtype)
  if name in ('bias', 'mean', 'num_batches_tracked'):
    return np.zeros(shape, dtype)
  if name == 'logit_scale':
    return np.full(shape, math.log(1 / 0.07), dtype)
  raise ValueError(f'no benchmark initialiser for parameter kind {name!r}; expected one of '
                   'kernel, embedding, cls_token, pos_embed, scale, var, bias, mean, num_batches_tracked, '
                   'logit_scale')


def init_train_state(make, tx, mesh, seed=0):
  """``(graphdef, TrainState)`` without running the model's initialisers.

  The structure comes from ``nnx.eval_shape``; values are NumPy draws of the
  right scale (about 6x faster than eager construction of ResNet-50 +
  BERT-base on 2 CPU cores, and no compile as a jitted init needs).
  """
  graphdef, params, stats = step_lib.split_model(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = optim.path_name(path).rsplit('/', 1)[-1]
    return _leaf_value(name, leaf.shape, leaf.dtype, rng)

  replicated = NamedSharding(mesh, P())
  params, stats = jax.device_put(jax.tree_util.tree_map_with_path(fill, (params, stats)),
                                 replicated)
  opt_state = jax.jit(tx.init, out_shardings=replicated)(params)
  state = step_lib.TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated),
                              params=params, batch_stats=stats, opt_state=opt_state)
  return graphdef, state


class JaxRunner:
  """The compiled flair_jax step and its state; ``run(batches)`` steps through."""

  name = 'flair_jax'

  def __init__(self, args, mesh, dtype, example_batch):
    self.mesh = mesh
    t0 = time.perf_counter()
    schedule = optim.flair_schedule(1e-4, steps_per_epoch=1000)
    tx = optim.make_optimizer(schedule, trainable_mask=lambda p: optim.trainable_mask(p, FROZEN))
    graphdef, self.state = init_train_state(lambda: make_model(args, dtype), tx, mesh)
    self.init_s = time.perf_counter() - t0
    options = step_lib.StepOptions(augment=args.augment, text_dropout=True, remat=args.remat,
                                   accumulation_steps=args.accumulation_steps)
    step = step_lib.make_train_step(graphdef, tx, mesh, schedule=schedule, options=options,
                                    compute_dtype=dtype)
    self.key = jax.random.key(0)
    self.step, self.steps, self.used = step, {}, []
    t0 = time.perf_counter()
    self.compiled = self._compiled(example_batch)
    self.compile_s = time.perf_counter() - t0
    self.num_params = sum(x.size for x in jax.tree.leaves(self.state.params))

  def _compiled(self, batch):
    """The step compiled for this batch's text width (once per width)."""
    width = batch['input_ids'].shape[1]
    if width not in self.steps:
      self.steps[width] = self.step.lower(self.state, batch, self.key).compile()
    return self.steps[width]

  def prepare(self, batches):
    """Compiles the step for every text width of ``batches`` (untimed)."""
    for batch in batches:
      self._compiled(batch)

  def _flops(self, compiled):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops']) * self.mesh.size

  def flops_per_step(self):
    """FLOPs of one global step: XLA's per-device count times the devices,
    averaged over the text widths of the steps run (else the first batch's)."""
    widths = self.used or [next(iter(self.steps))]
    return float(np.mean([self._flops(self.steps[w]) for w in widths]))

  def memory_analysis_bytes(self):
    """Per-device arguments + outputs - aliased + temporaries, as XLA plans them
    (the widest text compiled)."""
    m = self.steps[max(self.steps)].memory_analysis()
    if m is None:
      return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes)

  def run(self, batches):
    metrics = None
    for batch in batches:
      self.used.append(batch['input_ids'].shape[1])
      self.state, metrics = self._compiled(batch)(self.state, batch, self.key)
    jax.block_until_ready((self.state, metrics))
    self.last_loss = float(metrics['loss'])
    return self.last_loss


def torch_bert_config(args) -> dict:
  """transformers ``BertConfig`` fields of the requested text tower."""
  return dict(vocab_size=args.bert_vocab, hidden_size=args.bert_hidden,
              num_hidden_layers=args.bert_layers, num_attention_heads=args.bert_heads,
              intermediate_size=args.bert_intermediate, max_position_embeddings=512,
              hidden_act='gelu', hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def torch_model_args(args) -> tuple:
  """``TorchFLAIRModel`` arguments of the requested towers."""
  vit = (dict(img_size=args.image_size, patch_size=args.vit_patch, embed_dim=args.vit_width,
              depth=args.vit_depth, num_heads=args.vit_heads) if args.vision == 'vit' else None)
  return (torch_bert_config(args), args.resnet_stages, args.resnet_width, args.proj_dim, vit)


class TorchRunner:
  """The PyTorch FLAIR-equivalent iteration on the same batches."""

  name = 'torch'

  def __init__(self, args, device, amp):
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_flair_step  # pylint: disable=g-import-not-at-top

    self.torch, self.lib, self.device = torch, torch_flair_step, device
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = torch_flair_step.TorchFLAIRModel(*torch_model_args(args)).to(device)
    if args.torch_channels_last:
      model = model.to(memory_format=torch.channels_last)
    self.init_s = time.perf_counter() - t0
    self.channels_last = args.torch_channels_last
    self.trainer = torch_flair_step.TorchTrainer(model, device, amp=amp,
                                                 augment_images=args.augment,
                                                 flair_loop_extras=args.torch_flair_loop)
    self.num_params = sum(p.numel() for p in model.parameters())

  def to_device(self, host_batch):
    return self.lib.TorchBatch(host_batch, self.device, self.channels_last)

  def run(self, batches):
    loss = None
    for batch in batches:
      loss = self.trainer.step(batch)
    self.trainer.synchronize()
    return float(loss)

  def peak_memory(self):
    if self.device != 'cuda':
      return None
    return int(self.torch.cuda.max_memory_allocated())


def knowledge_captions(args):
  """``draw(rng, n) -> (ids [n, 77], lengths [n])`` of FLAIR's captions: the
  template with a random category of the expert-knowledge dictionary, the
  category replaced by one of ``[category] + descriptions`` (as the
  pre-training pipeline does), tokenized by ``--tokenizer``."""
  # pylint: disable-next=g-import-not-at-top
  from data_pipelines import captions, knowledge, tokenizer
  if not args.tokenizer:
    raise ValueError('--captions knowledge needs --tokenizer: a BERT vocab.txt or tokenizer '
                     'folder (e.g. the Bio_ClinicalBERT or MiniLM one)')
  tok = tokenizer.load_tokenizer(args.tokenizer)
  dictionary = knowledge.load_knowledge()
  categories = sorted(dictionary)

  def draw(rng, n):
    texts = [captions.flair_caption(rng, [], [categories[rng.integers(len(categories))]],
                                    'bench', dictionary)[0] for _ in range(n)]
    ids, lengths = tokenizer.tokenize(tok, texts)
    return np.minimum(ids, args.bert_vocab - 1), lengths
  return draw


def random_host_batch(rng, args, draw_captions=None):
  """A host batch of the pipeline's format with random content."""
  b, s = args.batch, args.image_size
  if draw_captions is None:
    lo, hi = args.caption_tokens
    lengths = rng.integers(lo, hi + 1, b).astype(np.int32)
    ids = rng.integers(5, args.bert_vocab, (b, 77)).astype(np.int32)
    ids *= np.arange(77)[None] < lengths[:, None]
  else:
    ids, lengths = draw_captions(rng, b)
  return dict(image=rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), input_ids=ids,
              lengths=lengths, category=rng.integers(0, NUM_CATEGORIES, b).astype(np.int32))


def for_jax(host_batch, args):
  """The step's keys, token ids cut to the batch's text bucket (or to the
  static ``--text-length`` without buckets)."""
  longest = int(np.max(host_batch['lengths']))
  out = {k: np.asarray(host_batch[k]) for k in step_lib.BATCH_KEYS}
  if args.text_buckets:
    out['input_ids'] = tokenizer_lib.cut_to_bucket(out['input_ids'], out['lengths'],
                                                   args.text_buckets)
    return out
  if longest > args.text_length:
    raise ValueError(f'a caption has {longest} tokens but --text-length is '
                     f'{args.text_length}; expected --text-length >= the longest caption')
  out['input_ids'] = out['input_ids'][:, :args.text_length]
  return out


def grain_batches(args):
  """An endless iterator of pipeline batches over a built synthetic set."""
  # pylint: disable-next=g-import-not-at-top
  from data_pipelines import build, knowledge, pipeline, tokenizer
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()

  data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), 'flair_jax_bench_tfds')
  report = build.build('fundus_synthetic', data_dir, canvas=args.image_size,
                       n_train=args.grain_images, n_test=1, num_workers=os.cpu_count() or 1,
                       verbose=False)
  if args.tokenizer:
    tok = tokenizer.load_tokenizer(args.tokenizer)
  else:
    corpus = [f'A clean fundus photograph of {c} {" ".join(d)}'
              for c, d in knowledge.load_knowledge().items()]
    tok = tokenizer.build_wordpiece_vocab(corpus, os.path.join(data_dir, 'bench_tokenizer'),
                                          vocab_size=min(args.bert_vocab, 1000))
  if len(tok) > args.bert_vocab:
    raise ValueError(f'tokenizer has {len(tok)} tokens but --bert-vocab is {args.bert_vocab}; '
                     'expected a vocabulary no larger than the embedding table')
  source = build.data_source(report, 'train', decode_images=False)
  return pipeline.make_pretraining_iterator(
      [source], batch_size=args.batch, seed=0, tokenizer=tok, canvas=args.image_size,
      process_index=0, process_count=1, worker_count=args.workers,
      prefetch=2 if args.workers else 0)


def device_prefetch(host_batches, put, depth=2):
  """Yields ``put(batch)`` for each batch, ``depth`` transfers ahead."""
  queue = collections.deque()
  for batch in host_batches:
    queue.append(put(batch))
    if len(queue) > depth:
      yield queue.popleft()
  yield from queue


def alternate(runners, feeds, *, warmup, steps, block):
  """Warm each runner up, then time alternating blocks; ``{name: [(n, s)]}``."""
  for r in runners:
    r.run([next(feeds[r.name]) for _ in range(warmup)])
  times = {r.name: [] for r in runners}
  done = 0
  while done < steps:
    n = min(block, steps - done)
    for r in runners:
      if feeds[r.name].preloaded:
        batches = [next(feeds[r.name]) for _ in range(n)]
        t0 = time.perf_counter()
        r.run(batches)
      else:  # input built inside the timed block
        t0 = time.perf_counter()
        r.run(feeds[r.name].take(n))
      times[r.name].append((n, time.perf_counter() - t0))
    done += n
  return times


class Feed:
  """Batches for one runner: preloaded device batches, or a live iterator."""

  def __init__(self, items, preloaded):
    self.items, self.preloaded = items, preloaded

  def __next__(self):
    return next(self.items)

  def take(self, n):
    for _ in range(n):
      yield next(self.items)


def machine_description():
  """CPU model, cores and RAM of this machine."""
  return machine_info.describe()


def peak_tflops(device_kind, dtype_name, override):
  """Dense peak TFLOP/s of one device from the table, or the override."""
  if override:
    return override
  for (name, dt), value in PEAK_TFLOPS.items():
    if name in device_kind and dt == dtype_name:
      return value
  return None


def summarize(args, jax_runner, torch_runner, times, extra):
  """The result record: rates, FLOPs, MFU and memory of whatever ran."""
  rate = lambda name: args.batch * sum(n for n, _ in times[name]) / sum(s for _, s in times[name])
  blocks = lambda name: [args.batch * n / s for n, s in times[name]]
  device = jax.devices()[0]
  out = dict(extra)
  out.update(date=datetime.datetime.now().isoformat(timespec='seconds'),
             device_kind=device.device_kind, platform=device.platform, devices=args.devices)
  if jax_runner is not None:
    flops = jax_runner.flops_per_step()
    out.update(jax_compile_s=jax_runner.compile_s, jax_init_s=jax_runner.init_s,
               jax_params=int(jax_runner.num_params), xla_flops_per_step=flops,
               xla_gflops_per_sample=flops / args.batch / 1e9,
               xla_memory_plan_bytes_per_device=jax_runner.memory_analysis_bytes())
    if 'flair_jax' in times:
      out.update(jax_images_per_s=rate('flair_jax'), jax_block_images_per_s=blocks('flair_jax'),
                 final_loss=jax_runner.last_loss)
      out['achieved_tflops'] = flops * out['jax_images_per_s'] / args.batch / 1e12
      peak = peak_tflops(device.device_kind, out['dtype'], args.peak_tflops)
      if device.platform != 'cpu' and peak:
        out['peak_tflops_per_device'] = peak
        out['mfu'] = out['achieved_tflops'] / (peak * args.devices)
    stats = device.memory_stats() if device.platform != 'cpu' else None
    if stats:
      out['jax_peak_bytes'] = int(stats.get('peak_bytes_in_use', 0))
  if torch_runner is not None:
    out.update(torch_params=int(torch_runner.num_params),
               torch_peak_bytes=torch_runner.peak_memory())
    if 'torch' in times:
      out.update(torch_images_per_s=rate('torch'), torch_block_images_per_s=blocks('torch'))
  if 'jax_images_per_s' in out and 'torch_images_per_s' in out:
    out['ratio_jax_over_torch'] = out['jax_images_per_s'] / out['torch_images_per_s']
  return out


MD_HEADER = ('| run | device | dtype jax / torch | image | batch | mode | flair_jax img/s '
             '| torch img/s | jax / torch | XLA GFLOP / sample | torch-counted GFLOP / sample '
             '| achieved TFLOP/s | MFU | peak mem jax / torch GiB | compile s |\n'
             '|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|')


def markdown_row(r):
  """One table row (columns of ``MD_HEADER``) of a result record."""
  f = lambda v, fmt: '-' if v is None else format(v, fmt)
  gib = lambda v: '-' if v is None else f'{v / 2**30:.1f}'
  mem = f"{gib(r.get('jax_peak_bytes'))} / {gib(r.get('torch_peak_bytes'))}"
  torch_flops = r.get('torch_counted_flops_per_step')
  per_sample = lambda v: None if v is None else v / r['batch'] / 1e9
  return (f"| {r['label']} | {r['device_kind']} x{r['devices']} "
          f"| {r['dtype']} / {r['torch_dtype']} | {r['image_size']} | {r['batch']} | {r['mode']} "
          f"| {f(r.get('jax_images_per_s'), '.2f')} | {f(r.get('torch_images_per_s'), '.2f')} "
          f"| {f(r.get('ratio_jax_over_torch'), '.2f')} "
          f"| {f(per_sample(r.get('xla_flops_per_step')), '.2f')} "
          f"| {f(per_sample(torch_flops), '.2f')} "
          f"| {f(r.get('achieved_tflops'), '.3g')} | {f(r.get('mfu'), '.1%')} | {mem} "
          f"| {f(r.get('jax_compile_s'), '.0f')} |")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--label', default='', help='name of this run in the table')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--batch', type=int, default=8, help='global batch')
  p.add_argument('--vision', choices=('resnet', 'vit'), default='resnet',
                 help='image tower: ResNet (torchvision) or ViT (timm)')
  p.add_argument('--vit-patch', type=int, default=16)
  p.add_argument('--vit-width', type=int, default=768)
  p.add_argument('--vit-depth', type=int, default=12)
  p.add_argument('--vit-heads', type=int, default=12)
  p.add_argument('--resnet-stages', type=int, nargs='+', default=[3, 4, 6, 3])
  p.add_argument('--resnet-width', type=int, default=64)
  p.add_argument('--bert-hidden', type=int, default=768)
  p.add_argument('--bert-layers', type=int, default=12)
  p.add_argument('--bert-heads', type=int, default=12)
  p.add_argument('--bert-intermediate', type=int, default=3072)
  p.add_argument('--bert-vocab', type=int, default=28996)
  p.add_argument('--proj-dim', type=int, default=512)
  p.add_argument('--dtype', choices=('auto', 'float32', 'bfloat16'), default='auto',
                 help='flair_jax compute dtype; auto: float32 on CPU, bfloat16 elsewhere')
  p.add_argument('--torch-amp', action=argparse.BooleanOptionalAction, default=None,
                 help='torch fp16 autocast + GradScaler (default: on CUDA only)')
  p.add_argument('--steps', type=int, default=20, help='timed steps per framework')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps per framework')
  p.add_argument('--block-steps', type=int, default=5, help='steps per alternating block')
  p.add_argument('--mode', choices=('device', 'grain'), default='device')
  p.add_argument('--torch', action=argparse.BooleanOptionalAction, default=True)
  p.add_argument('--remat', action=argparse.BooleanOptionalAction, default=False)
  p.add_argument('--accumulation-steps', type=int, default=1,
                 help='flair_jax micro-batches per step (benchmarks/accumulation.py)')
  p.add_argument('--augment', action=argparse.BooleanOptionalAction, default=True)
  p.add_argument('--devices', type=int, default=1,
                 help='devices of the data mesh (on CPU: simulated host devices)')
  p.add_argument('--text-length', type=int, default=77,
                 help='static token length of flair_jax without --text-buckets')
  p.add_argument('--text-buckets', type=int, nargs='*',
                 default=list(tokenizer_lib.TEXT_BUCKETS),
                 help='widths flair_jax cuts each batch\'s ids to (the smallest holding its '
                 'longest caption; none given: the static --text-length)')
  p.add_argument('--captions', choices=('random', 'knowledge'), default='random',
                 help="device mode: random lengths (--caption-tokens) or FLAIR's captions "
                 'with expert knowledge, tokenized by --tokenizer')
  p.add_argument('--caption-tokens', type=int, nargs=2, default=[8, 40], metavar=('LO', 'HI'),
                 help='device mode: caption lengths drawn uniformly in [LO, HI] '
                 "(FLAIR's captions with expert knowledge: 6 to 29 words)")
  p.add_argument('--device-batches', type=int, default=2, help='device mode: distinct batches')
  p.add_argument('--workers', type=int, default=0, help='grain mode: grain worker processes')
  p.add_argument('--grain-images', type=int, default=256, help='grain mode: images built')
  p.add_argument('--data-dir', default=None, help='grain mode: TFDS folder (default: a temp dir)')
  p.add_argument('--tokenizer', default=None, help='grain mode: tokenizer folder or vocab.txt')
  p.add_argument('--torch-flair-loop', action=argparse.BooleanOptionalAction, default=True,
                 help="torch: FLAIR's per-step loss.item() and cuda.empty_cache()")
  p.add_argument('--torch-threads', type=int, default=None, help='torch CPU threads')
  p.add_argument('--torch-channels-last', action=argparse.BooleanOptionalAction, default=False)
  p.add_argument('--jax', action=argparse.BooleanOptionalAction, default=True)
  p.add_argument('--compile-only', action='store_true',
                 help='compile and count FLOPs and memory; time nothing')
  p.add_argument('--profile-dir', default=None,
                 help='after timing, trace a few flair_jax steps here and list the top ops')
  p.add_argument('--profile-steps', type=int, default=3)
  p.add_argument('--profile-top', type=int, default=25)
  p.add_argument('--peak-tflops', type=float, default=None, help='dense peak per device')
  p.add_argument('--json-out', default=None, help='append the result as one JSON line')
  p.add_argument('--markdown-header', action='store_true', help='print the table header too')
  return p.parse_args(argv)


def _profile(args, jax_runner, feed):
  """A ``jax.profiler`` trace of a few flair_jax steps and its top operations."""
  from benchmarks import profile_summary  # pylint: disable=g-import-not-at-top

  os.makedirs(args.profile_dir, exist_ok=True)
  hlo = jax_runner.compiled.as_text()
  with open(os.path.join(args.profile_dir, 'step.hlo.txt'), 'w', encoding='utf-8') as f:
    f.write(hlo)
  batches = [next(feed) for _ in range(args.profile_steps)]
  with jax.profiler.trace(args.profile_dir, create_perfetto_trace=True):
    jax_runner.run(batches)
  summary = profile_summary.summarize_trace(profile_summary.latest_trace(args.profile_dir), hlo,
                                            top=args.profile_top)
  table = profile_summary.markdown(summary)
  with open(os.path.join(args.profile_dir, 'top_ops.md'), 'w', encoding='utf-8') as f:
    f.write(table + '\n')
  print(table)
  return summary


def main(argv=None):
  args = parse_args(argv)
  if not (args.jax or args.torch):
    raise ValueError('nothing to run: pass --jax and/or --torch')
  if args.devices > 1:
    jax.config.update('jax_num_cpu_devices', args.devices)  # only affects the CPU platform
  if args.torch:
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # leave room for torch
    # On a shared CPU, OpenMP's spinning barriers stall torch for seconds when a
    # core is busy elsewhere; passive waiting keeps its step times steady.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
  devices = jax.devices()
  if len(devices) < args.devices:
    raise ValueError(f'--devices {args.devices} but only {len(devices)} {devices[0].platform} '
                     'devices are visible')
  mesh = parallel.make_mesh(devices=devices[:args.devices])
  on_cpu = devices[0].platform == 'cpu'
  dtype_name = ('float32' if on_cpu else 'bfloat16') if args.dtype == 'auto' else args.dtype
  load_before = os.getloadavg()

  if args.mode == 'device':
    rng = np.random.default_rng(0)
    draw = knowledge_captions(args) if args.captions == 'knowledge' else None
    host = [random_host_batch(rng, args, draw) for _ in range(args.device_batches)]
  else:
    iterator = grain_batches(args)
    host = [next(iterator)]
  put_jax = lambda b: parallel.global_batch(for_jax(b, args), mesh)

  runners, feeds, extra = [], {}, {}
  jax_runner = torch_runner = None
  torch_dtype = '-'
  if args.jax:
    jax_runner = JaxRunner(args, mesh, jnp.dtype(dtype_name), put_jax(host[0]))
    if not args.compile_only:
      jax_runner.prepare([put_jax(b) for b in host])
    runners.append(jax_runner)
  if args.torch:
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_flair_step  # pylint: disable=g-import-not-at-top
    device = 'cuda' if (not on_cpu and torch.cuda.is_available()) else 'cpu'
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    amp = (device == 'cuda') if args.torch_amp is None else args.torch_amp
    torch_dtype = 'float16 autocast' if amp else 'float32'
    extra['torch_counted_flops_per_step'] = torch_flair_step.count_flops(
        torch_model_args(args), host[0], augment_images=args.augment)
    extra.update(torch_device=device, torch_threads=torch.get_num_threads(),
                 omp_wait_policy=os.environ.get('OMP_WAIT_POLICY'))
    if not args.compile_only:
      torch_runner = TorchRunner(args, device, amp)
      runners.append(torch_runner)
      extra['torch_init_s'] = torch_runner.init_s

  times = {}
  if not args.compile_only:
    if args.mode == 'device':
      if jax_runner:
        feeds['flair_jax'] = Feed(itertools.cycle([put_jax(b) for b in host]), preloaded=True)
      if torch_runner:
        feeds['torch'] = Feed(itertools.cycle([torch_runner.to_device(b) for b in host]),
                              preloaded=True)
    else:
      if jax_runner:
        feeds['flair_jax'] = Feed(device_prefetch(iterator, put_jax), preloaded=False)
      if torch_runner:
        feeds['torch'] = Feed((torch_runner.to_device(b) for b in iterator), preloaded=False)
    times = alternate(runners, feeds, warmup=args.warmup, steps=args.steps,
                      block=args.block_steps)
  extra.update(
      label=args.label or f'{args.image_size}px b{args.batch}', dtype=dtype_name,
      torch_dtype=torch_dtype, image_size=args.image_size, batch=args.batch, mode=args.mode,
      steps=args.steps, warmup=args.warmup, block_steps=args.block_steps, remat=args.remat,
      augment=args.augment, text_length=args.text_length, text_buckets=args.text_buckets,
      captions=args.captions,
      longest_caption=int(max(np.max(b['lengths']) for b in host)),
      mean_caption=float(np.mean([np.mean(b['lengths']) for b in host])),
      text_widths=sorted(jax_runner.steps) if jax_runner else None,
      towers=dict(vision=args.vision, **(
                      dict(vit_patch=args.vit_patch, vit_width=args.vit_width,
                           vit_depth=args.vit_depth, vit_heads=args.vit_heads)
                      if args.vision == 'vit' else
                      dict(resnet_stages=args.resnet_stages, resnet_width=args.resnet_width)),
                  bert_hidden=args.bert_hidden, bert_layers=args.bert_layers,
                  bert_heads=args.bert_heads, bert_intermediate=args.bert_intermediate,
                  bert_vocab=args.bert_vocab, proj_dim=args.proj_dim),
      machine=machine_description(), load_before=load_before, load_after=os.getloadavg(),
      argv=sys.argv[1:] if argv is None else list(argv))
  result = summarize(args, jax_runner, torch_runner, times, extra)
  print(json.dumps(result, default=str))
  if args.markdown_header:
    print(MD_HEADER)
  print(markdown_row(result))
  if args.json_out:  # written before profiling, which may be cut short
    with open(args.json_out, 'a', encoding='utf-8') as f:
      f.write(json.dumps(result, default=str) + '\n')
  if args.profile_dir and jax_runner and not args.compile_only:
    try:
      _profile(args, jax_runner, feeds['flair_jax'])
    except Exception as e:  # pylint: disable=broad-except
      print(f'profile failed, timings kept: {e!r}')  # the profiler is optional
  if args.mode == 'grain':
    iterator.close()
  return result


if __name__ == '__main__':
  main()
