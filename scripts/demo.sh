#!/usr/bin/env bash
# The README main command: set everything up, then run the stage-aware recipe on the built-in
# demo (shapes data, demo-size LLaVA) and write the comparison report.
#   bash scripts/demo.sh [sts-profile recipe options, e.g. --out reports/mine --overwrite]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg HF_HUB_OFFLINE=1
exec "${STS_VENV:-.venv}/bin/sts-profile" recipe "$@"
