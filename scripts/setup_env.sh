#!/usr/bin/env bash
# Set up the environment the Makefile's targets run in, then print its python's path.
#
#   bash scripts/setup_env.sh [VENV]     # VENV: default .venv
#
# - A CUDA build of torch already importable by python3 is kept: the virtual environment
#   then sees the system's packages, and pip finds torch satisfied.
# - Otherwise torch's CPU build is installed into the environment (a plain `torch`
#   requirement would pull the multi-GB CUDA build).
# - The package goes in editable, with its test extras. Done once; redone when
#   pyproject.toml changes (a stamp in VENV records its hash).
# All progress goes to stderr; stdout is the python path alone.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
STAMP=$VENV/.triton_qat-setup
WANT=$(sha256sum pyproject.toml | cut -d' ' -f1)

if [[ -x $VENV/bin/python && -f $STAMP && $(cat "$STAMP") == "$WANT" ]]; then
    echo "$PWD/$VENV/bin/python"
    exit 0
fi

cuda_torch() {
    "$1" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" >/dev/null 2>&1
}

{
    if [[ ! -x $VENV/bin/python ]]; then
        if cuda_torch "$PYTHON"; then
            echo "setup_env: keeping the installed CUDA torch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
            "$PYTHON" -m venv --system-site-packages "$VENV"
        else
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    PY=$VENV/bin/python
    "$PY" -m pip install -q --upgrade pip || true  # offline machines keep the pip they have
    if ! cuda_torch "$PY"; then
        "$PY" -m pip install -q torch==2.13.0
    fi
    "$PY" -m pip install -q -e '.[test]'
    "$PY" -c "import torch, triton; print('setup_env: torch', torch.__version__, '| triton', triton.__version__)"
} >&2

echo "$WANT" > "$STAMP"
echo "$PWD/$VENV/bin/python"
