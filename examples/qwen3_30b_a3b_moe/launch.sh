#!/usr/bin/env bash
# 3 nodes x 8 GPUs. On each node: NODE_RANK=0|1|2 MASTER_ADDR=<node 0> bash launch.sh [key=value ...]
# (nodes 0-1: the student's 16 ranks; node 2: the two dedicated teachers, 4 GPUs each). Node 0 converts the HF
# checkpoints once (one process; they load at any TP/PP/EP); the others wait for it.
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/cluster.sh
nnodes=${NNODES:-${SLURM_NNODES:-3}}
rank=$(node_rank "$nnodes")
for m in qwen3-30b-a3b qwen3-30b-a3b-math-grpo qwen3-30b-a3b-code-grpo; do
  convert_once "hf/$m" "ckpt/$m" "$rank"
done
torchrun --nnodes "$nnodes" --nproc_per_node 8 --node_rank "$rank" --master_addr "$(master_addr)" \
  --master_port "${MASTER_PORT:-29500}" -m megatron_gopd.train --config examples/qwen3_30b_a3b_moe/config.yaml "$@"
