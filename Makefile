# arcsim — everything a fresh machine needs goes through these targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: help venv data demo demo-robust test lint bench protos clean

help:
	@echo "make demo        - run the default experiment, configs/default.yaml (sets everything up first)"
	@echo "make test        - run the whole test suite (sets everything up first)"
	@echo "make lint        - the fast checks: ruff (lint, import order, format) and the layers' import contracts"
	@echo "make demo-robust - the robust aggregation library alone: a table of robustness errors"
	@echo "make bench       - run the benchmarks (figures go in docs/benchmarks.md)"
	@echo "make soak        - soak test of the coordinator with 10, 200 and 1,000 workers (not in make test)"
	@echo "make protos      - regenerate the gRPC stubs from protos/"
	@echo "make image       - the container image (VARIANT=cuda, AIRGAP=1: see docs/deploy.md)"
	@echo "make e2e-docker  - the compose testbed end to end on a private Docker engine (root)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# The pinned CPU torch goes in first, so that the project's open range cannot pull a CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test,ray]"
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST: Debian's package where apt is at hand (offline machines), else the checked download.
FASHION_DIR := /usr/share/datasets/fashion-mnist
data: $(STAMP)
	@if [ -d "$(FASHION_DIR)" ] || [ -n "$$ARCSIM_DATA" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; } || \
		$(PY) -m arcsim data download fashion-mnist; \
	else $(PY) -m arcsim data download fashion-mnist; fi

demo: data
	$(PY) -m arcsim run configs/default.yaml

demo-robust: $(STAMP)
	$(PY) -m arcsim.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

bench: data
	$(PY) benchmarks/robust.py
	$(PY) benchmarks/testbed.py

# The soak test (benchmarks/soak.py): one coordinator and N lightweight workers sending vectors of
# about 100,000 float32 (159,010: the nearest model) for SOAK_ROUNDS rounds; about 5 minutes on 2 cores.
# Checks every submission is counted once and the coordinator's memory stays bounded; prints the table.
SOAK_ROUNDS ?= 30
SOAK_ARGS   ?= --workers 10 200 1000 --numel 100000 --rounds $(SOAK_ROUNDS)
.PHONY: soak
soak: data
	$(PY) benchmarks/soak.py $(SOAK_ARGS)

protos: $(STAMP)
	$(PY) -m arcsim.protos_build

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info

# ---- Containers (docs/deploy.md) ------------------------------------------------------------------
# make wheelhouse  every wheel the image needs (torch CPU, dependencies, arcsim's own) for the image's
#                  python (CPython $(WHEEL_PYTHON), x86_64) in $(WHEELHOUSE)/; where no CPU torch wheel
#                  is at hand, add TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# make base-image  Debian bookworm + python3 from a Debian mirror (debootstrap; root), imported as
#                  $(BASE_IMAGE): no container registry needed
# make image       the arcsim image $(IMAGE) with docker compose (VARIANT=cuda for CUDA torch); AIRGAP=1
#                  builds it on $(BASE_IMAGE) from $(WHEELHOUSE)/ with no network
# make e2e-docker  all of the above on a private Docker engine, then a short compose run checked from
#                  outside (deploy/e2e-docker.sh; root)
WHEELHOUSE      ?= wheelhouse
WHEEL_PYTHON    ?= 3.11
WHEEL_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 \
                   manylinux1_x86_64 any
TORCH_INDEX_URL ?=
BASE_IMAGE      ?= arcsim-base
IMAGE           ?= arcsim:latest
VARIANT         ?= cpu
COMPOSE         ?= $(if $(wildcard $(VENV)/bin/docker-compose),$(VENV)/bin/docker-compose,docker compose)

.PHONY: wheelhouse base-image image e2e-docker

wheelhouse: $(STAMP)
	rm -f $(WHEELHOUSE)/arcsim-*.whl
	$(PIP) wheel --quiet --no-deps --wheel-dir $(WHEELHOUSE) .
	$(PIP) download --quiet --dest $(WHEELHOUSE) --only-binary=:all: --implementation cp \
		--python-version $(WHEEL_PYTHON) --abi cp$(subst .,,$(WHEEL_PYTHON)) --abi abi3 --abi none \
		$(addprefix --platform ,$(WHEEL_PLATFORMS)) $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) \
		"$(TORCH_SPEC)" $(WHEELHOUSE)/arcsim-*.whl

base-image:
	deploy/docker/base-image.sh $(BASE_IMAGE)

image:
	ARCSIM_IMAGE=$(IMAGE) ARCSIM_VARIANT=$(VARIANT) \
	$(if $(AIRGAP),ARCSIM_BASE_IMAGE=$(BASE_IMAGE) ARCSIM_WHEELHOUSE=$(WHEELHOUSE) ARCSIM_BUILD_NETWORK=none) \
	$(COMPOSE) build coordinator

e2e-docker: $(STAMP)
	VENV="$(VENV)" COMPOSE="$(COMPOSE)" deploy/e2e-docker.sh
