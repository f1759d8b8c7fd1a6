# Build a virtual environment from nothing, run the notebook series, run the tests.
#   make run    executes every notebook on the bundled default model (results in runs/series)
#   make test   pytest unit tests + nbval over every notebook
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on machines without a GPU; on a CUDA machine use `make TORCH_SPEC=torch venv`.
TORCH_SPEC ?= torch==2.13.0
SEEDS ?= 0
OUT ?= runs/series

.PHONY: venv run test test-unit test-notebooks data models corpus clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev,explain]"
	touch $@

run: venv
	$(BIN)/interp-lib run --seeds $(SEEDS) --out $(OUT)

test: venv
	$(BIN)/python -m pytest --nbval-lax tests notebooks

test-unit: venv
	$(BIN)/python -m pytest tests

test-notebooks: venv
	$(BIN)/python -m pytest --nbval-lax notebooks

# Rebuild data/ (not part of CI: the corpus needs Debian's python3.11-doc; models take a while).
corpus: venv
	$(BIN)/python scripts/build_corpus.py
	$(BIN)/python scripts/build_tokenizer.py --vocab-size 4096 --out data/tokenizer
	$(BIN)/python scripts/build_tokenizer.py --vocab-size 512 --out data/tokenizer-512
	$(BIN)/python scripts/build_labelled_sets.py

models: venv
	$(BIN)/python scripts/train_toy_models.py toy-lm
	$(BIN)/python scripts/train_toy_models.py toy-2l
	$(BIN)/python scripts/train_toy_models.py toy-1l

data: corpus models

clean:
	rm -rf $(VENV) runs .pytest_cache
