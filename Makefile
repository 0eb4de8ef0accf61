# A new user (and CI) needs two commands: `make quickstart` (train + evaluate the built-in
# detector) and `make test`. Each runs the idempotent set-up first: it builds ./.venv when it is
# missing or its requirements changed, and only checks imports otherwise.
.PHONY: setup test quickstart lint format

PY := .venv/bin/python

setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest

quickstart: setup
	$(PY) train_net.py --num-gpus 2 --config-file configs/quickstart/shapes_R18_FPN.yaml

lint:
	$(PY) -m black --check .
	$(PY) -m isort --check-only .
	$(PY) -m flake8

format:
	$(PY) -m isort .
	$(PY) -m black .
