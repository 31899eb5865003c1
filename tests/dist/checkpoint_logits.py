"""A converted checkpoint loaded at the given TP/PP: its logits against the HF model's."""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region
from transformers import AutoModelForCausalLM

from megatron_gopd.checkpoint import load_model
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import build_model
from megatron_gopd.models.parallel_model import ParallelModel
from megatron_gopd.runtime.layout import ParallelShape, build_layout

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--ckpt", required=True)
parser.add_argument("--hf", required=True)
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--pp", type=int, default=1)
args = parser.parse_args()

layout = build_layout(ParallelShape(args.tp, args.pp, dist.get_world_size() // (args.tp * args.pp)))
pgc = layout.student.pgc
dims = ModelDims.from_hf(f"{args.ckpt}/hf")
gpt = build_model(dims, pgc)
load_model(args.ckpt, gpt, group=layout.student.world)
hf = AutoModelForCausalLM.from_pretrained(args.hf).eval()
tokens = torch.randint(0, dims.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    reference = hf(tokens).logits


def compare(mb, lp, ent, logits):
    full = gather_from_tensor_model_parallel_region(logits, group=pgc.tp)[..., : dims.vocab_size]
    return lp.new_zeros(()), {"diff": (full - reference).abs().max()}


out = ParallelModel(gpt, dims).run([{"tokens": tokens}], compare, temperature=1.0, forward_only=True)
diff = torch.tensor(out[0]["diff"].item() if out else 0.0)
dist.all_reduce(diff, op=dist.ReduceOp.MAX)
if dist.get_rank() == 0:
    json.dump({"max_diff": diff.item()}, open(args.out, "w"))
dist.destroy_process_group()
