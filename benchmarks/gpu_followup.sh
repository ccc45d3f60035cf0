#!/usr/bin/env bash
# The GPU figures the kit's two profiles do not take, on its random-weight Llama-2-7B shape (one call, ~5 min on an H200):
#   bash benchmarks/gpu_followup.sh [OUTDIR]
# * prune_7b_cap24: DLP + Wanda at the paper's setting (128 x 2048 calibration, fp16) under a 24 GiB device-memory
#   cap (torch.cuda.set_per_process_memory_fraction), its wall time, peak CUDA memory and the sweep's placement line;
# * sliced_speed_7b: prefill (4 x 2048) and decode (batch 1, 128 new tokens) of the dense 7B shape against the same
#   shape sliced uniformly by 25% and 30% (random weights), timed in turns in one process.
# Needs .gpu/ from `bash ../shared/gpu/prepare.sh`; it uses the kit's installed wheels and builds the model once
# (a warm machine that already ran `bash .gpu/check.sh 7b ...` reuses it). One "STEP name rc= wall_s=" line each.
set -u
out=${1:-${OUT:-/tmp/gpu_out}}
mkdir -p "$out"
model=/tmp/gpu_check/model_7b
STEPS=model bash .gpu/check.sh 7b pipeline "$out" | grep -v "^logs:"
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

step() {
  local name=$1 limit=$2 start
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "STEP $name rc=$? wall_s=$(($(date +%s) - start))"
  tr '\r' '\n' < "$out/$name.log" | grep -v "it/s]\|s/it]\|/layer]\|layer/s]\|batch/s]\|/batch]" | tail -14
}

step prune_7b_cap24 330 python3 benchmarks/prune_speed.py --model "$model" --variants engine --nsamples 128 \
  --seqlen 2048 --dtype float16 --memory_cap_gib 24 --ppl 0 --out "$out/prune_7b_cap24.json"
step sliced_speed_7b 200 python3 benchmarks/sliced_speed.py --dense "$model" --shapes 0.25,0.3 --prefill 4x2048 \
  --decode 128 --repeats 5 --out "$out/sliced_speed_7b.json"
