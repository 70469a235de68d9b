# clipserve — `make run` starts the service, `make test` runs the test suite. Both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
CONFIG ?= config/models.json
TEST_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: install run test test-unit test-integration test-gpu lint fmt typecheck check bench clean \
	load-test load-test-light load-test-ci run-ray build-base build-app run-local build-ray-base \
	build-ray run-local-ray

# torch/torchvision are pinned and installed first, with pip, so nothing else can pull another build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(VENV)/bin/clipserve serve --config $(CONFIG) --host $(HOST) --port $(PORT)

# pytest exits 5 when it collected nothing: that is a failure, not a pass.
test: install
	$(TEST_ENV) $(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-unit: install
	$(TEST_ENV) $(PY) -m pytest -q tests/unit

test-integration: install
	$(TEST_ENV) $(PY) -m pytest -q tests/integration

test-gpu: install
	$(TEST_ENV) $(PY) -m pytest -q -m gpu

lint: install
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/ruff format --check src tests

fmt: install
	$(VENV)/bin/ruff check --fix src tests
	$(VENV)/bin/ruff format src tests

typecheck: install
	$(VENV)/bin/mypy

check: lint typecheck test

bench: install
	$(TEST_ENV) $(VENV)/bin/clipserve bench

# Locust (seed 000): the web UI on :8089 against a running service (HOST/PORT), a light headless
# run, and the CI run (its own server with the tiny model, thresholds set the exit code).
load-test: install
	$(VENV)/bin/locust -f load_tests/locustfile.py --host http://$(HOST):$(PORT)

load-test-light: install
	$(VENV)/bin/locust -f load_tests/locustfile.py --host http://$(HOST):$(PORT) \
		--headless -u 5 -r 5 -t 2m --only-summary

load-test-ci: install
	$(TEST_ENV) $(PY) load_tests/run_ci.py --seconds 20

# Ray Serve mode here (a local Ray cluster), and the seed's image targets (Docker).
MODELS ?= fast
run-ray: install
	$(VENV)/bin/clipserve serve --ray --config $(CONFIG) --host $(HOST) --port $(PORT)

build-base:
	docker build -f docker/Dockerfile -t clipserve:base .

build-app:
	docker build -f docker/Dockerfile --build-arg MODELS="$(MODELS)" -t clipserve:app .

run-local:
	docker run --rm -p $(PORT):8000 clipserve:app

build-ray-base:
	docker build -f docker/Dockerfile.ray --target base -t clipserve:ray-base .

build-ray:
	docker build -f docker/Dockerfile.ray -t clipserve:ray .

run-local-ray:
	docker run --rm -p $(PORT):8000 --shm-size=2g clipserve:ray

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
