"""Megatron student at TP x PP x DP against Hugging Face and against itself at world size 1.

For each architecture: the logits of the converted model against the HF model's, and two optimizer steps
(DDP + distributed optimizer) whose losses, grad norms and resulting log-probs the test compares across layouts.
"""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import HFWeights, build_model, load_hf_weights
from megatron_gopd.models.parallel_model import ParallelModel, TrainableModel, adam
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--pp", type=int, default=1)
parser.add_argument("--archs", default="llama,qwen2,qwen3,qwen3_tied")
parser.add_argument("--train", action="store_true")
args = parser.parse_args()

dp = dist.get_world_size() // (args.tp * args.pp)
layout = build_layout(ParallelShape(args.tp, args.pp, dp))
pgc = layout.student.pgc
SEQ, GLOBAL_BATCH = 24, 4
tokens = torch.randint(0, 250, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(7))
results = {}

for arch in args.archs.split(","):
    hf = tiny_hf_model(arch, seed=3)
    dims = ModelDims.from_hf(hf.config)
    gpt = build_model(dims, pgc, seed=11)
    load_hf_weights(gpt, dims, HFWeights(hf.state_dict()))
    with torch.no_grad():
        hf_logits = hf(tokens).logits

    # 1. logits against HF, on the last pipeline stage (gathered over TP for the comparison only)
    def compare_logits(mb, lp, ent, logits):
        full = gather_from_tensor_model_parallel_region(logits, group=pgc.tp)[..., : dims.vocab_size]
        return lp.new_zeros(()), {"diff": (full - hf_logits).abs().max()}

    model = ParallelModel(gpt, dims)
    out = model.forward_backward([{"tokens": tokens}], compare_logits, temperature=1.0, forward_only=True)
    diff = torch.tensor(out[0]["diff"].item() if out else 0.0)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    entry = {"logits_max_diff": diff.item()}

    # 2. two optimizer steps on the global batch; each DP rank takes its slice, one sequence per micro-batch
    if args.train:
        trainable = TrainableModel(gpt, dims, adam(1e-3, clip_grad=1.0), layout.student.world)
        dp_rank, per_rank = pgc.dp.rank(), GLOBAL_BATCH // dp
        mine = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        global_tokens = GLOBAL_BATCH * (SEQ - 1)

        def nll(mb, lp, ent, logits):
            total = -lp[:, 1:].sum()
            return total / global_tokens, {"nll_sum": total.detach()}

        steps = []
        for _ in range(2):
            outputs, info = trainable.train_step([{"tokens": mine[i:i + 1]} for i in range(per_rank)], nll,
                                                 temperature=1.0)
            loss = torch.tensor(sum(o["nll_sum"].item() for o in outputs) / global_tokens)
            last = dist.get_global_rank(pgc.pp, pgc.pp.size() - 1)
            dist.broadcast(loss, src=last, group=pgc.pp)
            dist.all_reduce(loss, group=pgc.dp)
            steps.append({"loss": loss.item(), "grad_norm": info["grad_norm"]})
        after = trainable.token_logprobs([{"tokens": tokens}])[0]
        entry.update(steps=steps, logprobs_after=after.tolist())
    results[arch] = entry

if dist.get_rank() == 0:
    with open(args.out, "w") as f:
        json.dump(results, f)
dist.destroy_process_group()
