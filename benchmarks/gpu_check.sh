#!/usr/bin/env bash
# The GPU check of issue 4: CUDA tests + NF4 kernel benchmark (+ the training-step benchmark when present).
#
#   bash benchmarks/gpu_check.sh                 # results under benchmarks/results/gpu-<UTC date>
#   OUT=/some/dir bash benchmarks/gpu_check.sh   # results under $OUT (a device machine's $OUT comes back)
#
# Budget: under 8 minutes on an H100/H200 (step timeouts add up to 465 s; a failing step is recorded and the
# next one still runs; the exit code is non-zero if any step failed). Everything it prints also goes to
# $OUT/gpu_check.log; the last lines are the summary table. Needs: python3 with torch + triton + pytest (the
# device image has them); installs nothing from the network (lowrank itself is put on the path from this tree).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=${OUT:-$ROOT/benchmarks/results/gpu-$STAMP}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
declare -a SUMMARY=()
FAILED=0

step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, record rc and wall time, never abort the script
    local name=$1 limit=$2; shift 2
    local t0 rc
    t0=$(date +%s)
    echo "=== [$(date -u +%H:%M:%S)] $name (timeout ${limit}s): $*"
    set +e
    timeout --signal=TERM --kill-after=10 "$limit" "$@"
    rc=$?
    set -e
    local dt=$(( $(date +%s) - t0 ))
    [ "$rc" -eq 0 ] || FAILED=1
    [ "$rc" -eq 124 ] && echo "!!! $name timed out after ${limit}s"
    SUMMARY+=("$(printf '%-28s rc=%-4s %4ss' "$name" "$rc" "$dt")")
}

echo "=== gpu_check $STAMP, output in $OUT"
nvidia-smi -L || echo "nvidia-smi -L failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv || true
git rev-parse HEAD 2>/dev/null | tee "$OUT/git_sha.txt" || echo "no git here" | tee "$OUT/git_sha.txt"

# lowrank on the path without installing: a copy of lowrank/ with kernels/ as lowrank/kernels (what
# pyproject.toml's package-dir maps), first on PYTHONPATH. `python -P` keeps the tree's own lowrank/ (which
# has no kernels/ inside) off sys.path.
SITE=$(mktemp -d)
cp -r "$ROOT/lowrank" "$SITE/lowrank"
cp -r "$ROOT/kernels" "$SITE/lowrank/kernels"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1
export TRITON_DEFAULT_FP_FUSION=1  # state the default (our NF4 launches pass enable_fp_fusion=False themselves)
unset TRITON_INTERPRET LOWRANK_REFERENCE || true

step versions 30 "$PY" -P -c "
import sys, torch, triton, lowrank, lowrank.kernels.nf4_matmul as m
print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| triton', triton.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', p.name, torch.cuda.get_device_capability(0), 'SMs', p.multi_processor_count, 'L2', p.L2_cache_size)
else:
    print('NO CUDA DEVICE: the gpu tests will be skipped and bench_nf4 needs --smoke')
print('lowrank from', lowrank.__file__, '| large-M method', m.LARGE_M_METHOD)
try:
    import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)
except Exception as e:
    print('bitsandbytes not available:', type(e).__name__)
"

# The CUDA twins of the kernel tests (compiled Triton, autotuning on), then every other `gpu` test. Most of
# their time is Triton compiling ~100 kernel variants, one per process at a time: 4 xdist workers when present.
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)
step pytest-gpu 180 "$PY" -P -m pytest "$ROOT/tests" -m gpu -q -rs -p no:cacheprovider "${XDIST[@]}" \
    --junitxml="$OUT/pytest_gpu.xml" -o addopts=""

# GPU_CHECK_SMOKE=1: tiny shapes (a dry run of this script on a CPU-only machine, through the interpreter).
SMOKE_ARGS=()
[ "${GPU_CHECK_SMOKE:-0}" = "1" ] && SMOKE_ARGS=(--smoke --quick)
step bench_nf4 210 "$PY" -P "$ROOT/benchmarks/bench_nf4.py" --out "$OUT" "${SMOKE_ARGS[@]}"

if [ -f "$ROOT/benchmarks/bench_train.py" ] && [ "${SKIP_TRAIN:-0}" != "1" ]; then
    # --quick: the tiny model, and never the real SmolLM2-135M (bench_train.parse_args).
    step bench_train 45 "$PY" -P "$ROOT/benchmarks/bench_train.py" --quick --no-memory --no-plots --out "$OUT/train"
fi

rm -rf "$SITE"
echo
echo "=== summary ($(date -u +%H:%M:%S) UTC), results in $OUT"
printf '%s\n' "${SUMMARY[@]}"
[ -f "$OUT/bench_nf4.md" ] && tail -n 40 "$OUT/bench_nf4.md"
exit $FAILED
