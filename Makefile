.PHONY: install test lint example gpu-check

install:
	python -m pip install torch==2.13.0
	python -m pip install -e '.[test]'

test:
	python -m pytest -q

lint:
	ruff check .
	ruff format --check .

example:
	python examples/fake_quant_weight.py

gpu-check:
	bash bench/gpu_check.sh
