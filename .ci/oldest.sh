#!/usr/bin/env bash
# The oldest supported pair: torch 2.13 (CPU) with triton 3.6, kernels interpreted.
# Usage: .ci/oldest.sh [pytest args]   (default: the check grid and the whole suite)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${TRITON_QAT_OLDEST_VENV:-.venv-oldest}
python3 -m venv "$VENV"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
# numpy < 2.4: triton 3.6's interpreter calls int() on one-element arrays, which numpy 2.4
# rejects (hundreds of failures). Later triton releases run with any numpy.
python -m pip install -q -e '.[test]' 'triton==3.6.*' 'numpy<2.4'
python -c "import numpy, torch, triton; print('torch', torch.__version__, '| triton', \
triton.__version__, '| numpy', numpy.__version__)"

# Default: the check grid (every kernel against the reference, bit for bit), then the whole
# suite (about 4 minutes on 2 cores); arguments run pytest with them instead. One
# pytest-xdist worker per core, as `make test` (TEST_WORKERS=N picks another count).
if [ $# -eq 0 ]; then
    # The rows that did not pass, and the summary (numpy's inf / NaN warnings left out).
    TRITON_INTERPRET=1 PYTHONWARNINGS=ignore::RuntimeWarning \
        python -m triton_qat check --quick --device cpu 2>&1 | grep -v " PASS$"
fi
python -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-auto}" "$@"
