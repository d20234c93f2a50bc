#!/usr/bin/env bash
# Every GPU check and benchmark in one call, for a machine with a CUDA GPU, torch, timm and triton installed,
# run from the repository root: the CUDA tests, then the figures of benchmarks/*.py on the GPU.
# No install and no network: the checkout is put on PYTHONPATH (dvt_timm finds weights/ beside it), and
# $DVT_SHARED is not needed (the tests that want real data skip; the benchmarks time random weights).
# The log goes to $OUT/gpu.log when OUT is set (the device tool), else to runs/gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-runs}/gpu.log"
mkdir -p "$(dirname "$log")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset DVT_SHARED CI
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch, timm, triton; print("torch", torch.__version__, "timm", timm.__version__, "triton", triton.__version__)'
    # Each step has its own time limit (seconds), so one slow step cannot starve the rest of a 590 s call;
    # stage1.py prints its elapsed time every 2,000 iterations, so a cut run still leaves a rate behind.
    step() { local limit=$1; shift; echo "== $* (limit ${limit} s)"; timeout -k 5 "$limit" "$@" || echo "== exit $?: $*"; }
    step 120 python3 -m pytest -q -rs -p no:cacheprovider -k cuda \
        tests/test_encoding.py tests/test_table_adam.py tests/test_fields.py tests/test_evaluation.py \
        tests/test_training.py
    step 240 python3 benchmarks/stage1.py --cpu-images 1 --dense-table-adam
    step 60 python3 benchmarks/encoding.py
    step 50 python3 benchmarks/stage2.py
    step 60 python3 benchmarks/overhead.py --device cuda
} 2>&1 | tee "$log"
