#!/usr/bin/env bash
# Distillation on a real model, on CPU (see examples/smollm2/pipeline.py): bash examples/smollm2/run.sh [--fresh] [...]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" examples/smollm2/pipeline.py "$@"
