#!/usr/bin/env bash
# Fetch, into ./.whl, the wheels scripts/gpu_check.sh installs on a GPU machine that has Python
# 3.12 + torch + torchvision but no network: detectron2 (the sal-detectron2 cp310 wheel of its
# Python code) and the dependencies that machine lacks. Versions come from
# requirements/constraints.txt; pure-Python projects published as sdists only are built here.
# Run where pip reaches the package index: `bash scripts/gpu_wheels.sh`.
if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
  echo "usage: bash scripts/gpu_wheels.sh: fetch into ./.whl the wheels gpu_check.sh installs"
  sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"
  exit 0
fi
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
pin() { grep -E "^$1==" requirements/constraints.txt; }
PIP=(python3 -m pip --disable-pip-version-check -q)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for name in pycocotools faster-coco-eval; do  # compiled: cp312 manylinux wheels
  "${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$(pin $name)"
done
for name in iopath yacs omegaconf hydra-core termcolor setuptools; do  # pure Python wheels
  "${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.12 -d "$DEST" "$(pin $name)"
done
for name in fvcore antlr4-python3-runtime; do  # sdists only: build the (pure Python) wheel
  "${PIP[@]}" wheel --no-deps -w "$DEST" "$(pin $name)"
done
"${PIP[@]}" download --no-deps --only-binary=:all: --python-version 3.10 -d "$DEST" \
  "$(pin sal-detectron2)"
ls -1 "$DEST"
du -sh "$DEST"
