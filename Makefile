# The two commands a new user (and CI) runs: `make setup`, then `make test`.
.PHONY: setup test lint format

PY := .venv/bin/python

setup:
	bash scripts/setup.sh

test:
	$(PY) -m pytest

lint:
	$(PY) -m black --check .
	$(PY) -m isort --check-only .
	$(PY) -m flake8

format:
	$(PY) -m isort .
	$(PY) -m black .
