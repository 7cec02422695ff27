# Two entry points: `make train` (set up, then the default run) and `make test` (set up, then the suite).
# Set-up is a virtualenv in .venv with the pinned versions of requirements.lock; it is redone only
# when requirements.lock or pyproject.toml change, so a second `make` starts at once.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup train train-jax parity test bench clean

setup: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version.split()[0]'
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

clean:
	rm -rf $(VENV) runs data/stdlib
