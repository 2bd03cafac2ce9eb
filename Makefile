# arcsim — everything a fresh machine needs goes through these targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: help venv data demo demo-robust test bench protos clean

help:
	@echo "make demo        - run the default experiment, configs/default.yaml (sets everything up first)"
	@echo "make test        - run the whole test suite (sets everything up first)"
	@echo "make demo-robust - the robust aggregation library alone: a table of robustness errors"
	@echo "make bench       - run the benchmarks (figures go in docs/benchmarks.md)"
	@echo "make protos      - regenerate the gRPC stubs from protos/"

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

bench: data
	$(PY) benchmarks/robust.py
	$(PY) benchmarks/testbed.py

protos: $(STAMP)
	$(PY) -m arcsim.protos_build

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
