# arcsim — everything a fresh machine needs goes through these targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: help venv demo test test-fast bench protos clean

help:
	@echo "make demo   - run the default experiment (sets everything up first)"
	@echo "make test   - run the whole test suite (sets everything up first)"
	@echo "make bench  - run the benchmarks (figures go in docs/benchmarks.md)"
	@echo "make protos - regenerate the gRPC stubs from protos/"

$(PY):
	$(PYTHON) -m venv $(VENV)

# The pinned CPU torch goes in first, so that the project's open range cannot pull a CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m arcsim.demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/robust.py

protos: $(STAMP)
	$(PY) -m arcsim.protos_build

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
