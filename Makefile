# Each target sets up what it needs on a fresh Debian machine: uv, the locked
# environment and Debian's Fashion-MNIST package.
SHELL := /bin/bash
# re-evaluated at each use, so it finds uv once `setup` has installed it
UV = $(shell command -v uv 2>/dev/null || echo python3 -m uv)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
CONFIG ?= pipeline_config/fashion_mnist.yaml

.PHONY: setup compose-cli demo smoke test lint bench-accuracy bench-labelling bench bench-quick

# uv where none is installed: the version docker/Dockerfile installs (one figure: a test
# checks), so that a new uv cannot change how a fresh clone reads uv.lock
UV_VERSION := 0.13.9

# where `test` is a goal, the one sync also compiles the environment's bytecode (below)
SYNC_FLAGS := $(if $(filter test,$(MAKECMDGOALS)),--compile-bytecode)

setup: $(FASHION_MNIST)
	@command -v uv >/dev/null || python3 -m uv --version >/dev/null 2>&1 || \
		python3 -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --locked $(SYNC_FLAGS)

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist

demo: setup  ## the default pipeline on Fashion-MNIST (6-16 min on 2 CPU cores, by CPU model)
	$(UV) run noisy-student run -c $(CONFIG)

smoke: setup  ## the same pipeline on a slice of the data with tiny models (about a minute)
	$(UV) run noisy-student run -c pipeline_config/smoke.yaml

bench-accuracy: setup  ## the accuracy table in benchmarks/results/ (about 11 hours on 2 CPU cores, over several sittings: a killed run resumes)
	$(UV) run python -m benchmarks.accuracy

bench-labelling: setup  ## does the label queue beat random labels? the table in benchmarks/results/labelling.md (hours on 2 CPU cores, over several sittings: a killed run resumes; QUICK=1 checks the harness in minutes)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(UV) run python -m benchmarks.labelling $(if $(QUICK),--quick)

# every tier (this -m replaces the quick default of pyproject.toml's addopts, which leaves
# out the slow and integration ones), after the lint and the layer contract, so that CI
# checks both. Two pytest-xdist workers, one per core of the CI machine, one torch thread
# each (tests/conftest.py); each takes whole files, the integration and slow ones first:
# 15 min on 2 cores with AVX512 (23 before the bytecode below); 32 with AVX2 only, before
# it (README, "Development")
# The suite starts many Python processes (flow runs, workers, servers, CLI calls), each
# importing torch, Prefect and MLflow; where PYTHONDONTWRITEBYTECODE is set (as on the CI
# machine) each compiles their source anew. So where `test` is a goal, setup's sync has
# `--compile-bytecode` (SYNC_FLAGS, above): about a minute the first time, seconds after.
TEST_WORKERS ?= 2
test: setup compose-cli lint
	$(UV) run pytest -q -m "slow or not slow" -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20

# for the test that validates docker/compose.yaml (`docker compose config`); no engine needed
compose-cli:
	@docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || \
		($(SUDO) apt-get install -y -qq --no-install-recommends docker-compose >/dev/null || \
		 ($(SUDO) apt-get update -qq && \
		  $(SUDO) apt-get install -y -qq --no-install-recommends docker-compose >/dev/null)) || \
		echo "no docker compose: tests/test_operations.py::test_compose_config_validates will skip"

lint: setup
	$(UV) run ruff check . && $(UV) run ruff format --check . && $(UV) run lint-imports

bench: setup  ## performance ratios side by side -> benchmarks/results/perf-cpu.md (about 10 min on 2 CPU cores)
	$(UV) run python -m benchmarks.perf $(if $(SUMMARY),--summary $(SUMMARY))

bench-quick: setup  ## the same measurements on a slice, to check the harness (under 3 min)
	$(UV) run python -m benchmarks.perf --quick $(if $(SUMMARY),--summary $(SUMMARY))
