# Two entry points: `make train` (set up, then the default run) and `make test` (set up, then the suite).
# Set-up is a virtualenv in .venv with the pinned versions of requirements.lock; it is redone only
# when requirements.lock or pyproject.toml change, so a second `make` starts at once.
# The interpreter: the newest of python3.13, python3.12, python3.11 that runs (pyenv keeps shims on PATH for
# versions it cannot start, so each candidate is run, not just looked up), else python3; `make PYTHON=...` wins.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(firstword $(foreach v,3.13 3.12 3.11,$(shell python$(v) -c "" >/dev/null 2>&1 && echo python$(v))) python3)
endif

# glibc malloc tuned for training steps that free and re-allocate the same large buffers (measured in
# docs/performance.md; numerics unchanged): malloc'd memory on transparent huge pages, blocks up to
# glibc's 32 MB ceiling taken from the heap (the chunked loss's buffers fit under it at 128-row chunks;
# the probe times larger chunks under these same settings) and the heap never trimmed below 1 GiB, so
# steady-state steps reuse memory instead of page-faulting it anew.
# The same value as common/launch.py GLIBC_TUNABLES (the one definition; tests/test_launch.py checks
# they agree), which the trainers and benches set for themselves by re-executing when started directly.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train train-jax parity test bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert (3, 11) <= sys.version_info[:2] <= (3, 13), "Python 3.11-3.13 is required, found " + sys.version.split()[0]'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

train: setup
	$(BIN)/python -m torch_impl.train

train-jax: setup
	$(BIN)/python -m jax_impl.train

parity: setup
	$(BIN)/python -m parity.check --steps 50

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m parity.bench

clean:
	rm -rf $(VENV) runs data/stdlib
