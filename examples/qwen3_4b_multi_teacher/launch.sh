#!/usr/bin/env bash
# Run on each of 2 nodes with 8 GPUs: NODE_RANK=0|1 MASTER_ADDR=<node0> bash launch.sh [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
for m in qwen3-4b qwen3-4b-math-grpo qwen3-4b-code-grpo; do   # once, from HF checkpoints (any TP: they reshard)
  [ -d "ckpt/$m" ] || python tools/convert_hf_to_megatron.py --hf-dir "hf/$m" --save-dir "ckpt/$m" --dtype bf16
done
torchrun --nnodes 2 --nproc_per_node 8 --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
  --master_port "${MASTER_PORT:-29500}" -m megatron_gopd.train --config examples/qwen3_4b_multi_teacher/config.yaml "$@"
