#!/usr/bin/env bash
# 1 node, 8 GPUs for the student. Start the teacher first, on its own machine(s), e.g.:
#   python -m sglang.launch_server --model-path Qwen3-30B-A3B-Instruct-2507 --tp 4 --port 30000 --skip-tokenizer-init
# (and the base model likewise for reward_correction.yaml). Then: bash launch.sh [config.yaml] [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
config="${1:-examples/qwen3_strong_to_weak/config.yaml}"; shift || true
[ -d ckpt/qwen3-1.7b ] || python tools/convert_hf_to_megatron.py --hf-dir hf/Qwen3-1.7B --save-dir ckpt/qwen3-1.7b --dtype bf16
torchrun --nproc_per_node 8 -m megatron_gopd.train --config "$config" "$@"
