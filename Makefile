# okdpose: the two set-up commands of the README, plus a few conveniences.
#   make repro   create .venv, install, run the whole DVC pipeline on the built-in data
#   make test    create .venv, install, run the test suite (what CI runs through .ci/run)
#                (as root with apt-get it also installs Chromium for the offline plots test)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# stage commands in dvc.yaml call `python`: make it the project's interpreter
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup repro test bench browser exps clean-venv

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

test: setup browser
	$(BIN)/python -m pytest -q

# tests/test_plots_offline.py opens the plots page in headless Chromium (skipped without it):
# install it when this runs as root with apt-get (a CI container; ~40 s); quiet, time-limited,
# never fatal. OKDPOSE_NO_BROWSER=1 skips the attempt.
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x "$(CHROMIUM)" ] && [ -z "$$OKDPOSE_NO_BROWSER" ] && [ "$$(id -u)" = 0 ] \
	    && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for the offline plots test (OKDPOSE_NO_BROWSER=1 skips this)"; \
	  { export DEBIAN_FRONTEND=noninteractive; timeout 240 apt-get update -qq \
	    && timeout 300 apt-get install -y -qq --no-install-recommends chromium; } >/dev/null 2>&1 \
	  || echo "could not install chromium: the offline plots test will be skipped"; \
	fi

bench: setup
	$(BIN)/okdpose bench --quick

# `dvc exp show` narrowed to what experiments are compared by: their names, the params that differ
# and the test AP per stage (fits a 160-column terminal; the full table has ~60 metric columns)
DVC := $(if $(wildcard $(BIN)/dvc),$(BIN)/dvc,dvc)
exps:
	@$(DVC) exp show --no-pager --hide-queued --only-changed \
	  --drop '^(?!(data|model|loss|train|evaluate|explain|export|tracking)\.)|^energy\.' \
	  --keep 'Experiment|Created|stage\d\.AP$$'

clean-venv:
	rm -rf $(VENV)
