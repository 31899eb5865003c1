#!/usr/bin/env bash
# 2 nodes x 8 GPUs. On each node: NODE_RANK=0|1 MASTER_ADDR=<node 0> bash launch.sh [key=value ...], or submit
# slurm.sbatch (Slurm gives each node its rank). Node 0 converts the HF checkpoints once; the others wait for it.
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/cluster.sh
nnodes=${NNODES:-${SLURM_NNODES:-2}}
rank=$(node_rank "$nnodes")
for m in qwen3-4b qwen3-4b-math-grpo qwen3-4b-code-grpo; do   # any TP: the checkpoints reshard on load
  convert_once "hf/$m" "ckpt/$m" "$rank"
done
torchrun --nnodes "$nnodes" --nproc_per_node 8 --node_rank "$rank" --master_addr "$(master_addr)" \
  --master_port "${MASTER_PORT:-29500}" -m megatron_gopd.train --config examples/qwen3_4b_multi_teacher/config.yaml "$@"
