"""Megatron student at TP x PP x DP (x EP) against Hugging Face and against itself at world size 1.

For each architecture: the logits of the converted model against the HF model's, and two optimizer steps
(DDP + distributed optimizer) whose losses, grad norms and resulting log-probs the test compares across layouts.
For a mixture of experts also: the expert-load metrics of each step, the tokens per expert that HF's routers
give the first step's micro-batches (and megatron's switch aux loss recomputed from them), and with
--save-weights the updated weights, as HF tensors in <out>.<arch>.pt.
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

from megatron_gopd.metrics import Stat
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import HFWeights, build_model, load_hf_weights
from megatron_gopd.models.export import export_hf_weights
from megatron_gopd.models.hf_io import hub_state_dict
from megatron_gopd.models.parallel_model import ParallelModel, TrainableModel, adam
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--tp", type=int, default=1)
parser.add_argument("--pp", type=int, default=1)
parser.add_argument("--ep", type=int, default=1)
parser.add_argument("--etp", type=int, default=None)
parser.add_argument("--archs", default="llama,qwen2,qwen3,qwen3_tied")
parser.add_argument("--train", action="store_true")
parser.add_argument("--moe-aux-loss-coef", type=float, default=0.0)
parser.add_argument("--save-weights", action="store_true")
parser.add_argument("--adam-eps", type=float, default=1e-8)
args = parser.parse_args()

dp = dist.get_world_size() // (args.tp * args.pp)
layout = build_layout(ParallelShape(args.tp, args.pp, dp, args.ep, args.etp))
pgc = layout.student.pgc
SEQ, GLOBAL_BATCH = 24, 4
tokens = torch.randint(0, 250, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(7))
results = {}


def hf_routing(hf, dims) -> dict:
    """Tokens per expert (sparse layers x experts) that HF routes the micro-batches (one sequence each) to, and
    megatron's switch loss per layer, E / (k T^2) * sum_e (sum_t p_te) * count_e, summed over layers and
    averaged over the micro-batches."""
    counts, aux = torch.zeros(len(dims.moe_layers), dims.num_experts), 0.0
    with torch.no_grad():
        for row in tokens:
            for layer, logits in enumerate(hf(row[None], output_router_logits=True).router_logits):
                probs = logits.float().softmax(-1)
                chosen = torch.zeros_like(probs).scatter(-1, probs.topk(dims.moe_topk, -1).indices, 1.0)
                counts[layer] += chosen.sum(0)
                aux += (dims.num_experts / (dims.moe_topk * SEQ**2) * (probs.sum(0) * chosen.sum(0)).sum()).item()
    return {"hf_expert_counts": counts.tolist(), "hf_aux_loss": aux / len(tokens)}


for arch in args.archs.split(","):
    hf = tiny_hf_model(arch, seed=3)
    dims = ModelDims.from_hf(hf.config)
    gpt = build_model(dims, pgc, seed=11, moe_aux_loss_coef=args.moe_aux_loss_coef)
    load_hf_weights(gpt, dims, HFWeights(hub_state_dict(hf)))
    with torch.no_grad():
        hf_logits = hf(tokens).logits

    # 1. logits against HF, on the last pipeline stage (gathered over TP for the comparison only)
    def compare_logits(mb, lp, ent, logits):
        full = gather_from_tensor_model_parallel_region(logits, group=pgc.tp)[..., : dims.vocab_size]
        return lp.new_zeros(()), {"diff": (full - hf_logits).abs().max()}

    model = ParallelModel(gpt, dims)
    gpt.eval()  # megatron refuses MoE training passes at TP > 1 without sequence parallelism
    out = model.forward_backward([{"tokens": tokens}], compare_logits, temperature=1.0, forward_only=True)
    diff = torch.tensor(out[0]["diff"].item() if out else 0.0)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    entry = {"logits_max_diff": diff.item()}

    # 2. two optimizer steps on the global batch; each DP rank takes its slice, one sequence per micro-batch
    if args.train:
        trainable = TrainableModel(gpt, dims, adam(1e-3, clip_grad=1.0, adam_eps=args.adam_eps), layout.student.world)
        load = trainable.expert_load  # a mixture of experts' routing counts (training forwards only)
        dp_rank, per_rank = pgc.dp.rank(), GLOBAL_BATCH // dp
        mine = tokens[dp_rank * per_rank:(dp_rank + 1) * per_rank]
        global_tokens = GLOBAL_BATCH * (SEQ - 1)

        def nll(mb, lp, ent, logits):
            loss = -lp[:, 1:].sum() / global_tokens
            return loss, {"loss": Stat.total_of(loss)}  # summed over micro-batches and DP: the global loss

        steps = []
        if load:
            entry.update(hf_routing(hf, dims))
        for _ in range(2):
            metrics, info = trainable.train_step([{"tokens": mine[i:i + 1]} for i in range(per_rank)], nll,
                                                 temperature=1.0)
            steps.append({"loss": metrics["loss"], "grad_norm": info["grad_norm"],
                          **(load.metrics() if load else {})})
            if load and len(steps) == 1:
                entry["expert_counts"] = load.last_counts.tolist()
        after = trainable.token_logprobs([{"tokens": tokens}])[0]
        entry.update(steps=steps, logprobs_after=after.tolist())
        if args.save_weights:
            weights = {name: t.clone() for name, t in export_hf_weights(gpt, dims)}
            if dist.get_rank() == 0:
                torch.save(weights, f"{args.out}.{arch}.pt")
    results[arch] = entry

if dist.get_rank() == 0:
    with open(args.out, "w") as f:
        json.dump(results, f)
dist.destroy_process_group()
