#!/usr/bin/env bash
# First, once, on one node (8 processes; the checkpoints then load at any TP/PP/EP):  bash launch.sh convert
# Then on each of 3 nodes with 8 GPUs: NODE_RANK=0|1|2 MASTER_ADDR=<node0> bash launch.sh [key=value ...]
# (nodes 0-1: the student's 16 ranks; node 2: the two dedicated teachers, 4 GPUs each)
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = convert ]; then
  for m in qwen3-30b-a3b qwen3-30b-a3b-math-grpo qwen3-30b-a3b-code-grpo; do
    [ -d "ckpt/$m" ] || torchrun --nproc_per_node 8 tools/convert_hf_to_megatron.py --hf-dir "hf/$m" \
      --save-dir "ckpt/$m" --ep 8 --dtype bf16
  done
  exit 0
fi
torchrun --nnodes 3 --nproc_per_node 8 --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" -m megatron_gopd.train --config examples/qwen3_30b_a3b_moe/config.yaml "$@"
