"""Writes the tiny HF models the tests share, and their megatron-gopd model checkpoints, in one process."""

import argparse
import warnings

warnings.filterwarnings("ignore")

from tests.tiny import save_tiny_hf
from tools.convert_hf_to_megatron import main as convert

# name -> (architecture, seed). The teachers differ from the student so that their log-probs differ.
MODELS = {"student": ("qwen3", 0), "math": ("qwen3", 1), "code": ("qwen3", 2), "base": ("qwen3", 3)}
# Mixtures of experts (Qwen3-MoE) over the same tokenizer: a student and a teacher
MOE_MODELS = {"moe_student": ("qwen3_moe", 0), "moe_math": ("qwen3_moe", 1)}

if __name__ == "__main__":  # dist_checkpointing's writer spawns processes that re-import this module
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="of the megatron checkpoints")
    parser.add_argument("--moe", action="store_true", help="the mixture-of-experts models instead")
    args = parser.parse_args()
    for name, (arch, seed) in (MOE_MODELS if args.moe else MODELS).items():
        save_tiny_hf(arch, f"{args.out}/hf/{name}", seed=seed)
        convert(["--hf-dir", f"{args.out}/hf/{name}", "--save-dir", f"{args.out}/{name}", "--dtype", args.dtype])
