#!/usr/bin/env bash
# The paper recipe on one H200 (ResNet-50 @512 + BERT-base, batch 128,
# flair_jax in bfloat16, PyTorch FLAIR in its fp16 autocast + GradScaler):
# images/s of each, their ratio, MFU, peak memory, then a profile of the
# flair_jax step with its top operations.
#
#   bash benchmarks/gpu_h200.sh        # from the repository root
#
# Results go to $OUT (default runs/gpu_h200), six files at most:
# gpu_h200.log, results.jsonl (one JSON record per run), summary.md,
# top_ops.md, step.hlo.txt.gz and perfetto_trace.json.gz (open it in
# ui.perfetto.dev) of the profiled flair_jax steps. Budget: BUDGET_S
# seconds in all (default 540); the optional runs after the two main ones
# start only while enough of it is left.
#
# Installs nothing: the GPU machine has no package registry, and its image
# already holds JAX with its CUDA plugin, flax, optax, torch, torchvision and
# transformers (other versions than setup.cfg pins: the versions are printed
# first). The repository runs from its folder (PYTHONPATH). The grain-fed run
# needs grain and tensorflow-datasets, which that image lacks: it is skipped
# unless they import (they can be carried as wheels).
#
# SMOKE=1 runs the same flow with tiny towers on whatever JAX sees (a CPU
# check of this script; nothing is installed).
#
# Each framework runs in its own process: both caching allocators keep what
# they took, and at this size each needs tens of GiB, so one process
# alternating the two could run out of memory and would blur the peaks. On a
# dedicated GPU nothing else competes, so alternation is not needed there.

set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/gpu_h200}"
BUDGET_S="${BUDGET_S:-540}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_h200.log") 2>&1
left() { echo $(( BUDGET_S - SECONDS )); }
say() { echo "== [$(date +%T) +${SECONDS}s] $*"; }

say "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
nproc; free -g | head -2

SMOKE="${SMOKE:-0}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
say "versions"
"$PY" - "$SMOKE" <<'EOF' || exit 1
import sys
import flax, jax, optax, torch, torchvision, transformers
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers',
      transformers.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(),
      torch.cuda.is_available() and torch.cuda.get_device_name())
if sys.argv[1] != '1':
  assert jax.default_backend() == 'gpu', 'JAX has no GPU backend'
  assert torch.cuda.is_available(), 'torch sees no CUDA device'
import flair_jax.training.step, benchmarks.torch_flair_step  # the code imports with these versions
EOF
if [ "$SMOKE" = 1 ]; then say "SMOKE=1: tiny towers, no GPU required"; fi

RECIPE=(--image-size 512 --batch 128 --dtype bfloat16 --warmup 3 --block-steps 5
        --json-out "$OUT/results.jsonl")
if [ "$SMOKE" = 1 ]; then
  RECIPE=(--image-size 64 --batch 16 --resnet-stages 1 1 1 1 --resnet-width 16 --bert-layers 2
          --bert-hidden 64 --bert-heads 2 --bert-intermediate 128 --bert-vocab 1000 --proj-dim 32
          --warmup 2 --block-steps 5 --json-out "$OUT/results.jsonl")
fi
BENCH=("$PY" benchmarks/train_throughput.py)
PROFILE="${PROFILE:-/tmp/flair_jax_profile}"  # deep folders: only chosen files go to $OUT
rm -rf "$PROFILE"

say "flair_jax, paper recipe (+ profile)"
XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout 330 "${BENCH[@]}" "${RECIPE[@]}" --steps 30 \
  --no-torch --label "flair_jax, text buckets" --profile-dir "$PROFILE"
if [ $? -ne 0 ] && [ "$(left)" -gt 240 ]; then
  say "failed (out of memory?): retry with per-block remat"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout 240 "${BENCH[@]}" "${RECIPE[@]}" --steps 30 \
    --remat --no-torch --label "flair_jax, text buckets, remat"
fi

say "PyTorch FLAIR-equivalent, fp16 autocast + GradScaler"
timeout "$(( $(left) > 200 ? 200 : $(left) ))" "${BENCH[@]}" "${RECIPE[@]}" --steps 20 \
  --no-jax --label "torch FLAIR"

if [ "$(left)" -gt 150 ]; then
  say "optional: flair_jax with the static 77-token text (no buckets)"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout "$(( $(left) - 20 ))" "${BENCH[@]}" "${RECIPE[@]}" \
    --steps 30 --no-torch --text-buckets --label "flair_jax, text 77"
fi
if [ "$(left)" -gt 90 ]; then
  say "optional: a tuned torch (channels_last, no per-step sync or empty_cache)"
  timeout "$(( $(left) - 10 ))" "${BENCH[@]}" "${RECIPE[@]}" --steps 20 --no-jax \
    --torch-channels-last --no-torch-flair-loop --label "torch, channels_last, lean loop"
fi
if [ "$(left)" -gt 150 ] && "$PY" -c "import grain, tensorflow_datasets" 2>/dev/null; then
  say "optional: flair_jax fed by the grain pipeline (synthetic set, ${WORKERS:-12} workers)"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 timeout "$(( $(left) - 10 ))" "${BENCH[@]}" "${RECIPE[@]}" \
    --steps 20 --no-torch --mode grain --workers "${WORKERS:-12}" --grain-images 512 \
    --data-dir /tmp/flair_jax_tfds --label "flair_jax, grain-fed"
fi

cp "$PROFILE/top_ops.md" "$OUT/" 2>/dev/null
gzip -c "$PROFILE/step.hlo.txt" > "$OUT/step.hlo.txt.gz" 2>/dev/null
TRACE="$(ls -t "$PROFILE"/plugins/profile/*/perfetto_trace.json.gz 2>/dev/null | head -1)"
[ -n "$TRACE" ] && [ "$(stat -c %s "$TRACE")" -lt 16000000 ] && cp "$TRACE" "$OUT/"

say "summary"
"$PY" - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, os, sys
sys.path.insert(0, os.getcwd())
from benchmarks import train_throughput as tt
out = sys.argv[1]
rows = [json.loads(line) for line in open(os.path.join(out, 'results.jsonl'))]
print(tt.MD_HEADER)
for r in rows:
  print(tt.markdown_row(r))
jax_runs = [r for r in rows if r.get('jax_images_per_s')]
torch_runs = [r for r in rows if r.get('torch_images_per_s')]
if jax_runs and torch_runs:
  t = torch_runs[0]  # PyTorch FLAIR's own setting; later torch runs are tuned variants
  print()
  for j in jax_runs:
    ratio = j['jax_images_per_s'] / t['torch_images_per_s']
    peak = j.get('peak_tflops_per_device') or 989.0
    need = 0.2 * peak * 1e12 / j['xla_flops_per_step'] * j['batch']
    model_mfu = j['jax_images_per_s'] * 138e9 / (peak * 1e12)
    print(f"- {j['label']}: {j['jax_images_per_s']:.0f} img/s = {ratio:.2f}x torch FLAIR "
          f"({t['torch_images_per_s']:.0f} img/s; target >= 2.5x); MFU {j.get('mfu', 0):.1%} on "
          f"XLA's {j['xla_gflops_per_sample']:.1f} GFLOP/sample (20% needs {need:.0f} img/s), "
          f"{model_mfu:.1%} on the issue's 138 GFLOP/sample; peak "
          f"{(j.get('jax_peak_bytes') or 0) / 2**30:.1f} GiB")
  best = max(j['jax_images_per_s'] for j in jax_runs)
  for u in torch_runs:
    print(f"- {u['label']}: {u['torch_images_per_s']:.0f} img/s, peak "
          f"{(u.get('torch_peak_bytes') or 0) / 2**30:.1f} GiB, counted "
          f"{u['torch_counted_flops_per_step'] / u['batch'] / 1e9:.1f} GFLOP/sample "
          f"(captions padded to the batch's longest, {u['longest_caption']} tokens); best "
          f"flair_jax / this = {best / u['torch_images_per_s']:.2f}x")
top = os.path.join(out, 'top_ops.md')
if os.path.exists(top):
  print('\nTop operations of the flair_jax step (profile):\n')
  print(open(top).read())
EOF
say "done in ${SECONDS}s"
