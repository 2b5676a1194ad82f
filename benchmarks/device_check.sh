#!/usr/bin/env bash
# The checks to run in the few minutes a GPU is lent (about 8 minutes on one H100), each with its own time limit,
# every result in one folder:
#   environment       torch, transformers, bitsandbytes, triton versions and the device (CPU)
#   memory_plan       the plan's predictions from benchmarks/memory_plan.jsonl, to set beside what the GPU measures (CPU)
#   gpu_tests         the kernel tests on CUDA tensors (Triton compiled) and the GPU tests of the closed-form start
#   kernel_bench      benchmarks/bench_kernel.py: the modulated SwiGLU against the copy-bandwidth floor
#   train_8b_bf16     benchmarks/bench_train.py, llama8b-random, 2048 tokens, exact target rank 384, kl: step time and
#                     peak memory, gradient checkpointing off and on
#   train_8b_nf4      the same in 4-bit NF4 (fp32 compute, as --use_quantization), checkpointing off
#   start_8b          the closed-form start (fisher pass over one 2048-token batch, moments kept where they fit, the
#                     per-layer solve) on 4 Llama-3.1-8B-shaped layers: time and peak memory
# Without a CUDA GPU every GPU part is skipped, each saying so in the table, and the script still exits 0.
#
#   bash benchmarks/device_check.sh [OUT_DIR]       # default: device_check_results
set -u
cd "$(dirname "$0")/.."
OUT=${1:-device_check_results}
mkdir -p "$OUT"
TABLE="$OUT/table.md"
PY=${PYTHON:-python}
GPU=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" 2>/dev/null)
{
  echo "# device check, $(date -u '+%Y-%m-%d %H:%M UTC'), ${GPU:-no CUDA GPU}"
  echo
  echo "| part | status | seconds | output |"
  echo "| --- | --- | --- | --- |"
} > "$TABLE"

# part NAME LIMIT_S NEEDS(gpu|cpu) COMMAND...: runs COMMAND with its output in OUT/NAME.log, one row in the table
part() {
  local name=$1 limit=$2 needs=$3
  shift 3
  if [ "$needs" = gpu ] && [ -z "$GPU" ]; then
    echo "| $name | skipped: no CUDA GPU here (torch.cuda.is_available() is False) | 0 | - |" >> "$TABLE"
    echo "$name: skipped (no CUDA GPU)"
    return
  fi
  local t0=$SECONDS status
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  case $rc in
    0) status=ok ;;
    124) status="TIMED OUT after ${limit} s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  echo "| $name | $status | $((SECONDS - t0)) | $name.log |" >> "$TABLE"
  echo "$name: $status ($((SECONDS - t0)) s)"
}

part environment 60 cpu $PY -c "import torch, transformers, bitsandbytes; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
part memory_plan 60 cpu $PY -m benchmarks.memory_plan table
part gpu_tests 120 gpu env NPT_TEST_DEVICE=cuda $PY -m pytest -q --full -p no:cacheprovider tests/test_kernels.py \
  tests/test_scale.py -k "not embedded and not device_check"
part kernel_bench 100 gpu $PY -m benchmarks.bench_kernel
part train_8b_bf16 150 gpu $PY -m benchmarks.bench_train --model llama8b-random --device cuda --dtype bf16 \
  --seq_len 2048 --steps 3 --target exact --rank 384 --variants kl --checkpointing both --json "$OUT/train_8b_bf16.json"
part train_8b_nf4 120 gpu $PY -m benchmarks.bench_train --model llama8b-random --device cuda --dtype nf4 \
  --seq_len 2048 --steps 3 --target exact --rank 384 --variants kl --json "$OUT/train_8b_nf4.json"
part start_8b 80 gpu $PY -m benchmarks.memory_plan one --shape llama-3.1-8b --phase solve --layers 4 --seq 2048 \
  --precision bf16 --device cuda --json "$OUT/start_8b.json"
echo
cat "$TABLE"
