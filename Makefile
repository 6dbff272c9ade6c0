# The two commands of the README: `make pipeline` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
# dvc runs each stage's `itm-pipeline ...` command through the shell: the venv must be on PATH
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: pipeline test install clean

install: $(VENV)/.installed

# torch==2.13.0 first: the CPU build on local disk (an unpinned torch pulls a CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[faiss-cpu,dev]'
	touch $@

pipeline: install
	$(BIN)/dvc repro
	@cat artifacts/report/report.md

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf artifacts
