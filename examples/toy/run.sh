#!/usr/bin/env bash
# The toy experiment end to end on CPU (see examples/toy/pipeline.py): bash examples/toy/run.sh [--fresh] [...]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" examples/toy/pipeline.py "$@"
