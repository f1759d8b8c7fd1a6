# Build a virtual environment from nothing, run the notebook series, run the tests.
#   make run          executes every notebook on the bundled default model (results in runs/series)
#   make test         pytest unit tests + nbval over every notebook, in the locked environment
#   make lock         re-resolve requirements.lock (and colab/constraints.txt) from pyproject's ranges
#   make test-latest  the oracle tests in a second environment with the newest versions the ranges allow
#   make test-lowest  the same with the lowest versions the ranges allow (transitive ones newest)
#   make colab        rewrite every notebook's Colab badge and install cell from pyproject's Repository URL
#   make colab-bundle the wheel (bundled data included) + colab/constraints.txt in dist/colab, for Drive
#   make colab-sim    a simulated Colab runtime (Colab's published versions, CPU torch): the install
#                     cell must change none of Colab's own packages; then nbval + oracle tests there
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
# torch comes first and from the lock's version: here that finds the CPU wheel; on a CUDA machine
# pip takes the CUDA build of the same version.
TORCH_SPEC ?= $(or $(shell sed -n 's/^torch==\([^ +;]*\).*/torch==\1/p' $(LOCK) 2>/dev/null),torch==2.13.0)
PIP := python -m pip install --quiet --disable-pip-version-check
PIP_SPEC ?= pip==26.3
SEEDS ?= 0
OUT ?= runs/series
# the environment with the newest versions pyproject's ranges allow (torch stays at the lock's)
LATEST_VENV ?= .venv-latest
# `make lock` resolves with uv, in its own small environment; PIP_FIND_LINKS (if set) lets it see
# a local torch wheel such as the CPU build.
TOOLS_VENV ?= .venv-tools
UV_SPEC ?= uv==0.13.8
LOCK_PYTHON ?= 3.11
LOCK_PLATFORM ?= x86_64-manylinux_2_28

.PHONY: venv run test test-unit test-notebooks test-oracle lock tools lock-313 venv-latest test-latest venv-lowest \
	test-lowest data models corpus clean colab colab-bundle colab-sim

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/$(PIP) "$(PIP_SPEC)"
	$(BIN)/$(PIP) "$(TORCH_SPEC)"
	$(BIN)/$(PIP) -r $(LOCK)
	$(BIN)/$(PIP) --no-deps -e .
	$(BIN)/python -m interp_lib.versions --check-lock
	touch $@

run: venv
	$(BIN)/interp-lib run --seeds $(SEEDS) --out $(OUT)

test: venv
	$(BIN)/python -m pytest --nbval-lax tests notebooks

test-unit: venv
	$(BIN)/python -m pytest tests

test-notebooks: venv
	$(BIN)/python -m pytest --nbval-lax notebooks

# Every test that compares with TransformerLens, Hugging Face or torchmetrics, and notebook 04.
ORACLE_ARGS := -m oracle tests
ORACLE_NOTEBOOKS := notebooks/04_activation_patching.ipynb
test-oracle: venv
	$(BIN)/python -m pytest $(ORACLE_ARGS)
	$(BIN)/python -m pytest --nbval-lax $(ORACLE_NOTEBOOKS)

# $(call UV_COMPILE_FOR,PYTHON): resolve pyproject's ranges for that Python
UV_COMPILE_FOR = $(TOOLS_VENV)/bin/uv pip compile pyproject.toml --extra dev --extra cluster --quiet \
	    --python-version $(1) --python-platform $(LOCK_PLATFORM) \
	    $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS)) -c $(TOOLS_VENV)/torch.txt
UV_COMPILE = $(call UV_COMPILE_FOR,$(LOCK_PYTHON)) --upgrade

tools:
	test -x $(TOOLS_VENV)/bin/uv || ($(PYTHON) -m venv $(TOOLS_VENV) && $(TOOLS_VENV)/bin/$(PIP) "$(UV_SPEC)")
	echo "$(TORCH_SPEC)" > $(TOOLS_VENV)/torch.txt

# Colab runs Python 3.13: the lock is resolved for it too, preferring the 3.11 lock's versions (a
# difference shows in tests/test_colab.py). Both resolutions accept only wheels for their Python,
# so a package without one fails `make lock`; the exception: transformers-stream-generator, a
# pure-Python sdist (no wheel for any Python) that TransformerLens requires.
LOCK_313 := requirements-py313.lock
SDIST_ONLY := transformers-stream-generator
WHEELS_ONLY := --only-binary :all: $(addprefix --no-binary ,$(SDIST_ONLY))
lock: tools
	$(UV_COMPILE) $(WHEELS_ONLY) --custom-compile-command "make lock" -o $(LOCK)
	sed -i 's/^torch==\([^ +;]*\)+[a-z0-9.]*/torch==\1/' $(LOCK)   # the release, not one build of it
	$(MAKE) lock-313
	$(PYTHON) -m interp_lib.versions --colab-constraints $(LOCK) colab/constraints.txt

lock-313: tools
	cp $(LOCK) $(LOCK_313)
	$(call UV_COMPILE_FOR,3.13) $(WHEELS_ONLY) \
	    --custom-compile-command "make lock (Python 3.13, wheels only, the 3.11 lock's versions preferred)" -o $(LOCK_313)
	sed -i 's/^torch==\([^ +;]*\)+[a-z0-9.]*/torch==\1/' $(LOCK_313)

venv-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	echo "$(TORCH_SPEC)" > $(LATEST_VENV)/torch.txt
	$(LATEST_VENV)/bin/$(PIP) --upgrade pip
	$(LATEST_VENV)/bin/$(PIP) "$(TORCH_SPEC)"
	$(LATEST_VENV)/bin/$(PIP) --upgrade --upgrade-strategy eager -c $(LATEST_VENV)/torch.txt -e ".[dev]"
	$(LATEST_VENV)/bin/python -m interp_lib.versions

test-latest: venv-latest
	$(LATEST_VENV)/bin/python -m pytest $(ORACLE_ARGS)
	$(LATEST_VENV)/bin/python -m pytest --nbval-lax $(ORACLE_NOTEBOOKS)

LOWEST_VENV ?= .venv-lowest
venv-lowest: tools
	rm -rf $(LOWEST_VENV)
	$(PYTHON) -m venv $(LOWEST_VENV)
	$(UV_COMPILE) --resolution lowest-direct -o $(LOWEST_VENV)/lowest.lock
	$(LOWEST_VENV)/bin/$(PIP) "$(PIP_SPEC)"
	$(LOWEST_VENV)/bin/$(PIP) "$(TORCH_SPEC)"
	$(LOWEST_VENV)/bin/$(PIP) -r $(LOWEST_VENV)/lowest.lock
	$(LOWEST_VENV)/bin/$(PIP) --no-deps -e .
	$(LOWEST_VENV)/bin/python -m interp_lib.versions

test-lowest: venv-lowest
	$(LOWEST_VENV)/bin/python -m pytest $(ORACLE_ARGS)
	$(LOWEST_VENV)/bin/python -m pytest --nbval-lax $(ORACLE_NOTEBOOKS)

# Colab. colab/constraints.txt (written by `make lock`) follows Colab's published freeze,
# interp_lib.versions.COLAB_RUNTIME; the repository URL is pyproject's [project.urls] Repository.
COLAB_VENV ?= .venv-colab
# notebooks run under nbval in the simulated runtime: "all" (9.6 min here), or a comma-separated list.
# CI's pick covers every dependency: 00 (plotly, circuitsvis, the model loaders), 04 (patching,
# TransformerLens), 08 (sentence-transformers, umap-learn, scikit-learn, pandas, the ipywidgets
# rating widget, the explainer through 07's pipeline); the oracle tests cover torchmetrics, scipy, HF.
COLAB_SIM_NOTEBOOKS ?= 00_tour.ipynb,04_activation_patching.ipynb,08_head_taxonomy.ipynb
# `make colab-sim COLAB_SIM_ARGS=--oracle` also runs the oracle tests there (26 min here on a shared machine: not in CI)
COLAB_SIM_ARGS ?=
colab:
	$(PYTHON) scripts/colab.py

colab-bundle:
	$(PYTHON) scripts/colab.py --bundle dist/colab

colab-sim:
	$(PYTHON) scripts/colab_sim.py --venv $(COLAB_VENV) --notebooks $(COLAB_SIM_NOTEBOOKS) $(COLAB_SIM_ARGS)

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
	rm -rf $(VENV) $(LATEST_VENV) $(LOWEST_VENV) $(TOOLS_VENV) $(COLAB_VENV) runs .pytest_cache
