# make run   -- set up .venv and run the whole pipeline on the embedded default
# make test  -- set up .venv and run the whole test suite (what CI runs)
# make test-fast -- the fast tier for daily work: no training runs, one shared local Ray, tiny
#                   data, the --smoke of every benchmark that trains nothing (under 3 minutes)
# make gpu-check -- on a machine with NVIDIA GPUs: setup, the gpu tests, short GPU runs of
#                  bench/train and bench/inference (about 8 minutes, a log under .bench/gpu/)
PY := .venv/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test test-fast gpu-check bench-prepare bench-train bench-inference bench-quality bench-serve bench-scale bench-refresh
setup:
	@bash scripts/setup_env.sh

run: setup
	$(PY) -m pipelines.full_run $(ARGS)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest tests -m "not gpu and not slow" $(PYTEST_ARGS)

gpu-check:
	@bash scripts/gpu_check.sh

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

bench-scale: setup
	$(PY) bench/scale.py $(ARGS)

bench-refresh: setup
	$(PY) bench/refresh.py $(ARGS)
