#!/usr/bin/env bash
# The GPU check of CGBN's CUDA path, in one call, within ~8 minutes on one GPU:
#
#   bash scripts/gpu_wheels.sh            # once, where pip reaches the index: fills ./.whl
#   bash scripts/gpu_check.sh OUTDIR      # on the GPU machine (no network needed)
#
# Needs python3 with torch + torchvision (CUDA). Installs ./.whl (detectron2 and the
# dependencies the machine lacks) into a temporary folder unless detectron2 is importable
# already. Writes OUTDIR/report.md (the tables) and one log per step beside it:
#   1. pytest: stand-ins vs the real CUDA kernels; every CGBN case on real kernels in 2 and 3
#      processes sharing the GPU over gloo; CGBN's synchronised Function on an NCCL group of
#      one process with its host syncs counted; plus the CPU-emulation tests on this torch;
#   2. benchmarks/bench_cgbn_cuda.py: per layer at R50-FPN shapes, CGBN vs torch's
#      SyncBatchNorm Function vs BatchNorm2d, fp32 and AMP;
#   3. the quickstart trained with --num-gpus 1 on cuda (mmAP / mmAR);
#   4. benchmarks/bench_sublinear.py --device cuda (torch.cuda.max_memory_allocated).
# A failing step is reported and the next one still runs; the exit status is the number of
# failed steps. Without a GPU the CUDA parts skip (CI runs it so: tests/test_gpu_check.py).
# Environment: PYTHON (default python3), GPU_CHECK_SITE (where the wheels go),
# GPU_CHECK_TESTS (the pytest selection of step 1).
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  echo "usage: bash scripts/gpu_check.sh OUTDIR: the GPU check; writes OUTDIR/report.md"
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0
fi
set -uo pipefail
OUT=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::FutureWarning
STEPS="$OUT/.steps"
: >"$STEPS"
FAILED=0

# run NAME SECONDS CMD...: one step, its log in OUT/NAME.log, its status in the report
run() {
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local status=ok
  [ $rc -eq 124 ] && status="timed out after ${limit}s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && status="failed (exit $rc)"
  [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
  echo "| $name | $status | $((SECONDS - start)) |" >>"$STEPS"
  echo "   $status in $((SECONDS - start)) s"
  tail -n 3 "$OUT/$name.log"
  return 0
}

if ! "$PY" -c "import detectron2, fvcore, pycocotools" 2>/dev/null; then
  SITE=${GPU_CHECK_SITE:-/tmp/megdet_gpu_site}
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no ./.whl: run scripts/gpu_wheels.sh first" >&2; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    $(ls .whl/*.whl | grep -v detectron2) || exit 1
  # detectron2's wheel is tagged cp310 (pure Python; its _C is not used)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" \
    --python-version 3.10 --only-binary=:all: .whl/sal_detectron2-*.whl || exit 1
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" - >"$OUT/env.txt" 2>&1 <<'PY'
import platform, torch, detectron2, megdet_d2
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, detectron2 {detectron2.__version__}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, "
          f"NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}")
else:
    print("GPU: none (CUDA steps skip)")
PY
cat "$OUT/env.txt"
HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# GPU_CHECK_TESTS: another pytest selection (the CI test of this script uses a small one)
read -r -a TESTS <<<"${GPU_CHECK_TESTS:-tests/test_cgbn_gpu.py tests/test_cgbn_cuda_path.py \
tests/test_cuda_emulation.py tests/test_cgbn.py}"
run pytest 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" "${TESTS[@]}"
run bench_cgbn_cuda 120 "$PY" benchmarks/bench_cgbn_cuda.py --out "$OUT/bench_cgbn_cuda.md"
if [ "$HAS_GPU" = 1 ]; then
  run quickstart 180 "$PY" train_net.py --num-gpus 1 \
    --config-file configs/quickstart/shapes_R18_FPN.yaml MODEL.DEVICE cuda \
    OUTPUT_DIR "$OUT/quickstart_run" MEGDET.QUICKSTART.ROOT /tmp/megdet_shapes
else
  echo "| quickstart | skipped: no GPU | 0 |" >>"$STEPS"
fi
run bench_sublinear 90 "$PY" benchmarks/bench_sublinear.py --device cuda --images 2 \
  --size 800 --iters 5 --warmup 2
rm -rf "$OUT/quickstart_run"

{
  echo "# GPU check ($(date -u +%Y-%m-%d))"
  echo
  sed 's/^/    /' "$OUT/env.txt"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---|"
  cat "$STEPS"
  echo
  echo "## Tests (pytest)"
  echo
  grep -E "^(FAILED|ERROR)|passed|failed|skipped" "$OUT/pytest.log" | tail -n 40 | sed 's/^/    /'
  echo
  echo "## Per layer: CGBN vs SyncBatchNorm vs BatchNorm2d"
  echo
  cat "$OUT/bench_cgbn_cuda.md" 2>/dev/null || tail -n 20 "$OUT/bench_cgbn_cuda.log"
  echo
  echo "## Quickstart on one GPU"
  echo
  grep -E "mmAP|Overall training speed|Total training time|Copy-paste" "$OUT/quickstart.log" \
    2>/dev/null | tail -n 6 | sed 's/^/    /'
  echo
  echo "## Sub-linear memory (CUDA)"
  echo
  sed -n '/^CUDA/,$p' "$OUT/bench_sublinear.log" 2>/dev/null
} >"$OUT/report.md"
rm -f "$STEPS"
cat "$OUT/report.md"
exit "$FAILED"
