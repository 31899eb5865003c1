#!/usr/bin/env bash
# 1 node, 8 GPUs: bash launch.sh [key=value ...], then export the expert:
#   python tools/convert_megatron_to_hf.py --load-dir runs/qwen3_4b_math_grpo/checkpoints/latest --save-dir hf/qwen3-4b-math-grpo
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -d ckpt/qwen3-4b ] || python tools/convert_hf_to_megatron.py --hf-dir hf/Qwen3-4B --save-dir ckpt/qwen3-4b --dtype bf16
torchrun --nproc_per_node 8 -m megatron_gopd.train --config examples/grpo_domain_expert/config.yaml "$@"
