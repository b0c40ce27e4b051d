.PHONY: install test test-oldest lint example gpu-check

install:
	python -m pip install torch==2.13.0
	python -m pip install -e '.[test]'

test:
	python -m pytest -q

# torch 2.13 (CPU) + triton 3.6 in .venv-oldest, the kernel tests; `bash .ci/oldest.sh tests` for all.
test-oldest:
	bash .ci/oldest.sh

lint:
	ruff check .
	ruff format --check .

example:
	python examples/fake_quant_weight.py

gpu-check:
	bash bench/gpu_check.sh
