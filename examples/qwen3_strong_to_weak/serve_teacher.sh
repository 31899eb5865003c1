#!/usr/bin/env bash
# The strong teacher (and, for reward_correction.yaml, its base model) on SGLang servers of their own, on other
# machines: bash serve_teacher.sh MODEL_DIR [PORT] [TP]. --host 0.0.0.0 makes the server reachable from the
# student's nodes (sglang listens on 127.0.0.1 by default); the configs' teacher url is http://<this host>:PORT.
set -euo pipefail
model=${1:?usage: serve_teacher.sh MODEL_DIR [PORT] [TP]}
exec python -m sglang.launch_server --model-path "$model" --host 0.0.0.0 --port "${2:-30000}" --tp "${3:-4}" \
  --skip-tokenizer-init
