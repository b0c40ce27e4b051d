# The two commands of the README. Each sets up what it needs first (scripts/setup_env.sh: a
# virtual environment in .venv with torch's CPU build, or the installed CUDA torch kept),
# then runs. VENV=path picks another environment.
VENV ?= .venv
SETUP = $(shell bash scripts/setup_env.sh $(VENV))

.PHONY: example example-hf test test-oldest lint gpu-check

# The main job: float vs PTQ vs QAT of a small LM (about 2 minutes on 2 cores).
example:
	$(SETUP) examples/qat_tiny_lm.py

# A transformers Llama through recipe, QAT, convert, save / reload, export (under 5 minutes).
example-hf:
	$(SETUP) examples/hf_llama_qat.py

# What CI runs: lint, then the whole suite (kernels interpreted on the CPU), one pytest-xdist
# worker per core (TEST_WORKERS=N picks another count; 0 runs in this process).
TEST_WORKERS ?= auto
test:
	$(eval PY := $(SETUP))
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS)

# The oldest supported pair (torch 2.13 CPU + triton 3.6, in .venv-oldest): the check grid
# and the whole suite; `bash .ci/oldest.sh PYTEST_ARGS` runs pytest with those instead.
test-oldest:
	bash .ci/oldest.sh

lint:
	$(eval PY := $(SETUP))
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

gpu-check:
	bash bench/gpu_check.sh
