#!/usr/bin/env bash
# Every GPU check in one go, for a machine with CUDA: the CUDA tests, bench_gpu.py
# (pinned staging, overlap, a staging budget, DCP beside them), multirank.py with
# two ranks sharing the GPU (replica-sharded staging into pinned memory), then the
# fast test set with CUDA present (every staging buffer pinned). Each step has its
# own time limit, so one that hangs cannot take the others' time.
#
#     benchmarks/run_gpu.sh OUTDIR [GIB]
set -u
out=${1:?usage: benchmarks/run_gpu.sh OUTDIR [GIB]}
gib=${2:-2}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MASTER_ADDR=127.0.0.1

step() {  # step NAME SECONDS COMMAND...: its output in OUTDIR/NAME.log, its status in the summary
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    tail -n 25 "$out/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'
    nproc; free -g | head -2; df -h /tmp | tail -1
} >"$out/summary.txt" 2>&1
cat "$out/summary.txt"
step cuda_tests 180 python3 -m pytest -q -p no:cacheprovider -o addopts='-ra -p async_ckpt.testing' tests/test_async_cuda.py
step bench_gpu 240 python3 benchmarks/bench_gpu.py --gib "$gib" --repeats 3 --json "$out/bench_gpu.json"
step multirank_gpu 150 python3 benchmarks/multirank.py --gib "$(python3 -c "print($gib / 2)")" --ranks 2 --replicated 1 --device cuda --skip-dcp --repeats 3 --json "$out/multirank_gpu.json"
step fast_tests "${FAST_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider -m 'not slow' -n 8 --maxfail=20 --timeout 120
cat "$out/summary.txt"
