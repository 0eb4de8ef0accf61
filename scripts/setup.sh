#!/usr/bin/env bash
# One-command development environment: ./.venv with Python 3.11, PyTorch, detectron2 and its
# dependencies, and megdet_d2 in editable mode. Versions come from requirements/constraints.txt.
# Idempotent: a second run with unchanged requirements only checks imports and reports versions.
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  echo "usage: bash scripts/setup.sh   (or make setup): create or check ./.venv"
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
VENV=.venv
CONSTRAINTS=requirements/constraints.txt
STAMP=$VENV/.megdet_d2_setup
PY=$VENV/bin/python

log() { echo "[setup] $*"; }

report() {
  "$PY" - <<'PY'
import importlib
import importlib.metadata as md

for mod, dist in [
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("detectron2", None),
    ("fvcore", "fvcore"),
    ("pycocotools", "pycocotools"),
    ("megdet_d2", "megdet_d2"),
]:
    m = importlib.import_module(mod)
    version = getattr(m, "__version__", None) or md.version(dist)
    print(f"[setup]   {mod:<12} {version:<16} {m.__file__}")
PY
}

want=$(cat "$CONSTRAINTS" requirements/detectron2.txt setup.py | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
  && "$PY" -c "import torch, torchvision, detectron2, megdet_d2" 2>/dev/null; then
  log ".venv is up to date; nothing installed."
  report
  exit 0
fi

if [ ! -x "$PY" ]; then
  log "creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "[setup] error: $VENV must use Python 3.11; remove it or set PYTHON=python3.11" >&2; exit 1; }

PIP=("$PY" -m pip --disable-pip-version-check)

log "installing PyTorch"
"${PIP[@]}" install -q -c "$CONSTRAINTS" torch torchvision

log "installing detectron2's dependencies"
"${PIP[@]}" install -q -c "$CONSTRAINTS" -r requirements/detectron2.txt

if "$PY" -c "import detectron2" 2>/dev/null; then
  log "keeping the detectron2 already importable in $VENV"
else
  d2=$(grep -E '^sal-detectron2==' "$CONSTRAINTS")
  site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  log "installing detectron2 from the PyPI repackage $d2"
  # A cp310 wheel of pure-Python code; its compiled _C is unused on 3.11 (see docs/training.md).
  "${PIP[@]}" install -q --no-deps --only-binary=:all: --python-version 3.10 --target "$site" "$d2"
fi

log "installing megdet_d2 (editable) with its dev tools"
"${PIP[@]}" install -q -c "$CONSTRAINTS" --no-build-isolation -e ".[dev]"

"$PY" -c "import torch, torchvision, detectron2, megdet_d2"
echo "$want" > "$STAMP"
log "done:"
report
