# okdpose: the two set-up commands of the README, plus a few conveniences.
#   make repro   create .venv, install, run the whole DVC pipeline on the built-in data
#   make test    create .venv, install, run the test suite (what CI runs through .ci/run)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# stage commands in dvc.yaml call `python`: make it the project's interpreter
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test bench clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -e .
	touch $@

# DVC experiments need a commit and, for --temp/--queue runs, a git identity: give the clone a
# local one if the user has none (never overrides an existing identity).
setup: $(STAMP)
	@git rev-parse --git-dir >/dev/null 2>&1 || { echo "okdpose must run inside a git clone (DVC needs git)"; exit 1; }
	@git config user.email >/dev/null || { git config user.email "okdpose@localhost" && echo "set a local git user.email for this clone (DVC experiments need one)"; }
	@git config user.name  >/dev/null || git config user.name "okdpose"

repro: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m okdpose.bench --quick

clean-venv:
	rm -rf $(VENV)
