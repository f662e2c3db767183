#!/usr/bin/env bash
# Create (or reuse) the project environment and install the toolkit into it.
#
#   bash scripts/setup.sh            # runtime deps
#   bash scripts/setup.sh test       # + test deps (pytest, nbclient, torch-tb-profiler)
#
# Environment: STS_VENV (default .venv) picks the environment folder; STS_PYTHON the
# interpreter that creates it. torch: if the environment already has a torch (say your CUDA
# build), it is kept; otherwise torch==2.13.0 is installed (never an unpinned torch, which
# would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${STS_VENV:-.venv}"
PY="${STS_PYTHON:-python3}"
EXTRA="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)

if "$VPY" -c "import torch" 2>/dev/null; then
    echo "[setup] keeping torch $("$VPY" -c 'import torch; print(torch.__version__)')"
else
    echo "[setup] installing torch==2.13.0"
    "${PIP[@]}" install "torch==2.13.0"
fi

SPEC="."
[ "$EXTRA" = "test" ] && SPEC=".[test]"
# constraints.txt pins the versions this project is tested with (torch is not in it).
"${PIP[@]}" install -c constraints.txt -e "$SPEC"
"$VPY" -c "import sts_train, sts_profile, torch, transformers" \
    || { echo "[setup] install failed" >&2; exit 1; }
echo "[setup] ready: torch $("$VPY" -c 'import torch; print(torch.__version__)'), transformers $("$VPY" -c 'import transformers; print(transformers.__version__)')"
