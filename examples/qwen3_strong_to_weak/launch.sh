#!/usr/bin/env bash
# 1 node, 8 GPUs for the student. Start the teacher first, on its own machine(s), with serve_teacher.sh
# (hf/Qwen3-30B-A3B-Instruct-2507; and hf/Qwen3-30B-A3B-Base for reward_correction.yaml), then:
#   bash launch.sh [config.yaml] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
source examples/cluster.sh
config="${1:-examples/qwen3_strong_to_weak/config.yaml}"; shift || true
convert_once hf/Qwen3-1.7B ckpt/qwen3-1.7b "$(node_rank 1)"
torchrun --nproc_per_node 8 -m megatron_gopd.train --config "$config" "$@"
