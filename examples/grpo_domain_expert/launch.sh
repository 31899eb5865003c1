#!/usr/bin/env bash
# 1 node, 8 GPUs: bash launch.sh [key=value ...], then export the expert:
#   python tools/convert_megatron_to_hf.py --load-dir runs/qwen3_4b_math_grpo/checkpoints/latest --save-dir hf/qwen3-4b-math-grpo
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/cluster.sh
convert_once hf/Qwen3-4B ckpt/qwen3-4b "$(node_rank 1)"
torchrun --nproc_per_node 8 -m megatron_gopd.train --config examples/grpo_domain_expert/config.yaml "$@"
