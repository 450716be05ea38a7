#!/usr/bin/env bash
# Create .venv with the CPU build of torch pinned, then install tracin with the given extras.
# Usage: bash scripts/setup.sh [EXTRAS]   (default EXTRAS: demo; CI uses dev)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-demo}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned: an unpinned resolve pulls a multi-gigabyte CUDA build
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -c constraints.txt -e ".[${extras}]"
