# make run   -- set up .venv and run the whole pipeline on the embedded default
# make test  -- set up .venv and run the test suite
PY := .venv/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test bench-prepare bench-train bench-inference bench-quality bench-serve
setup:
	@bash scripts/setup_env.sh

run: setup
	$(PY) -m pipelines.full_run $(ARGS)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench-prepare: setup
	$(PY) bench/prepare.py $(ARGS)

bench-train: setup
	$(PY) bench/train.py $(ARGS)

bench-inference: setup
	$(PY) bench/inference.py $(ARGS)

bench-quality: setup
	$(PY) bench/quality.py $(ARGS)

bench-serve: setup
	$(PY) bench/serve.py $(ARGS)
