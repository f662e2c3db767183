#!/usr/bin/env bash
# The README test command: set everything up on a fresh machine, then run the whole suite.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
export PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg HF_HUB_OFFLINE=1
exec "${STS_VENV:-.venv}/bin/python" -m pytest "$@"
