#!/usr/bin/env bash
# The GPU tests and benchmarks of docs/GPU.md in one run, for a CUDA node without a package index.
#
#   WHEELS=.whl TOKENIZER=.gpu/tokenizer OUT=gpu-results BUDGET_S=540 bash scripts/gpu_check.sh
#
# WHEELS: the carried wheels (docs/GPU.md lists them), installed into /tmp/site; TOKENIZER: the embedded tokenizer
# (`python scripts/build_random_checkpoints.py --tokenizer-only .gpu/tokenizer`); random-weight checkpoints are
# built on the node. Parts run in order of value, each under its own time limit, and a part that cannot finish
# before BUDGET_S seconds is skipped. OUT/summary.txt gets one line per part (exit status, seconds), OUT/log.txt all
# output, OUT/results.tar.gz every benchmark's rows.jsonl and tables.md, refreshed after each part, so whatever
# finished is kept even when the run is cut off. SKIP="kernels eval_smollm2" leaves those parts out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-results}
WHEELS=${WHEELS:-.whl}
TOKENIZER=${TOKENIZER:-.gpu/tokenizer}
BUDGET_S=${BUDGET_S:-540}
CKPT=${CKPT:-/tmp/kvc-ckpt}
WORK=${WORK:-/tmp/kvc-gpu}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
: > "$OUT/summary.txt"

part() {  # part NAME LIMIT_S COMMAND...: run COMMAND if LIMIT_S still fits in the budget
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    echo "$name skipped (SKIP)" | tee -a "$OUT/summary.txt"
    return
  fi
  if (( SECONDS + limit > BUDGET_S )); then
    echo "$name skipped (needs ${limit}s, $((BUDGET_S - SECONDS))s left)" | tee -a "$OUT/summary.txt"
    return
  fi
  echo "=== $name: $*" >> "$OUT/log.txt"
  timeout "$limit" "$@" >> "$OUT/log.txt" 2>&1
  rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  find "$WORK" \( -name rows.jsonl -o -name '*.md' -o -name '*.txt' \) -print0 |
    tar -czf "$OUT/results.tar.gz" --null -T - 2>/dev/null
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$WORK/device.txt" 2>&1
"$PY" -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  >> "$WORK/device.txt" 2>&1
{ git log -1 --format='git HEAD %h %s' && echo "files differing from it: $(git status --porcelain | wc -l)"; } \
  >> "$WORK/device.txt" 2>/dev/null
tee -a "$OUT/summary.txt" < "$WORK/device.txt"

# 1. Install: the carried wheels, then kvcompress itself (no dependencies: torch, triton and transformers are the node's)
"$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$WHEELS"/*.whl \
  >> "$OUT/log.txt" 2>&1
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
part install 60 "$PY" -m pip install -q --no-deps --no-build-isolation -e .

# 2. The SmolLM2 geometry (fp32 weights; the benches cast), then the GPU tests: graphs against eager, the decode
#    kernel on CUDA tensors, host syncs, TF32
part ckpt_smollm2 60 "$PY" scripts/build_random_checkpoints.py --out "$CKPT" --tokenizer "$TOKENIZER" \
  --names smollm2 --dtype fp32
GPU_TESTS=${GPU_TESTS:-tests/engine tests/model tests/kernels/test_paged_decode.py}
part tests_gpu 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu $GPU_TESTS

# 3. Batch-1 generation against HF generate, SmolLM2 geometry: graphs (paged), eager (paged_eager), 8x (paged_x8);
#    fp32 (TF32 matmuls) after the throughput run
SMOL=(model=hf model.path="$CKPT/smollm2" model.device=cuda sections=[generation])
part gen_smollm2_bf16 75 "$PY" experiments/bench.py hydra.run.dir="$WORK/gen-smollm2-bf16" "${SMOL[@]}" model.dtype=bfloat16 repeats=5

# 4. Throughput against compression on a fixed pool: issue 11's workload (Llama-3.1-8B width, 8 layers, bf16)
part ckpt_llama8b 90 "$PY" scripts/build_random_checkpoints.py --out "$CKPT" --tokenizer "$TOKENIZER" \
  --names llama8b-w8
part throughput_llama8b 150 "$PY" experiments/bench.py hydra.run.dir="$WORK/throughput-llama8b" model=hf model.path="$CKPT/llama8b-w8" model.device=cuda \
  model.dtype=bfloat16 repeats=1 sections=[throughput] throughput.ratios=[1,8,16,64] \
  throughput.workload.n_requests=64 throughput.workload.prompt_tokens=2048 throughput.workload.new_tokens=128 \
  throughput.workload.pool_seqs=8 throughput.workload.max_seqs=64 throughput.workload.prefill_chunk=2048 \
  throughput.workload.max_prefill_tokens=8192

# the same pool with four times the requests and sequences at once: at 16x and 64x the 64 requests above all fit
# at once, so only a longer queue shows what 64x's smaller caches admit
part throughput_llama8b_256 240 "$PY" experiments/bench.py hydra.run.dir="$WORK/throughput-llama8b-256" model=hf \
  model.path="$CKPT/llama8b-w8" model.device=cuda model.dtype=bfloat16 repeats=1 sections=[throughput] \
  throughput.ratios=[1,8,16,64] throughput.workload.n_requests=256 throughput.workload.prompt_tokens=2048 \
  throughput.workload.new_tokens=128 throughput.workload.pool_seqs=8 throughput.workload.max_seqs=256 \
  throughput.workload.prefill_chunk=2048 throughput.workload.max_prefill_tokens=8192

part gen_smollm2_fp32 75 "$PY" experiments/bench.py hydra.run.dir="$WORK/gen-smollm2-fp32" "${SMOL[@]}" model.dtype=float32 repeats=3

# 5. Kernel targets (bf16, 32/8/128)
part kernels 80 "$PY" scripts/bench_kernels.py --batch 1,8,32 --context 4096,8192,16384 --prefill 4096,8192 \
  --out "$WORK/kernels.md"

# 6. Evaluation: 40 samples of ~6000 tokens, batched vs one at a time vs an HF generate loop (SmolLM2 geometry)
part eval_smollm2 200 "$PY" experiments/bench.py hydra.run.dir="$WORK/eval-smollm2" model=hf model.path="$CKPT/smollm2" model.device=cuda \
  model.dtype=bfloat16 sections=[evaluation] repeats=1 evaluation.prompt_tokens=6000 evaluation.max_seqs=8

# 7. The whole kernel suite on CUDA tensors (prefill, cache ops, the Hypothesis property test), as time allows
part tests_kernels 150 "$PY" -m pytest -q -p no:cacheprovider tests/kernels
echo "done in ${SECONDS}s" | tee -a "$OUT/summary.txt"
