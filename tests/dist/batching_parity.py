"""One training step of the same rows under three micro-batch layouts: every micro-batch padded to the step's
longest row (the layout before token budgets), grouped by length under a token budget (each padded to its own
longest), and packed end to end. The loss and the gradients must not depend on the layout. Rows of long-tailed
lengths, unevenly many per DP rank; at DP=2 or PP=2 (--pp)."""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

from megatron_gopd.algo.losses import aggregate_loss, loss_denominator
from megatron_gopd.batching import Batching, assemble, plan
from megatron_gopd.metrics import Stat
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import HFWeights, build_model, load_hf_weights
from megatron_gopd.models.parallel_model import TrainableModel, adam, pad_tokens
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--pp", type=int, default=1)
args = parser.parse_args()

layout = build_layout(ParallelShape(1, args.pp, dist.get_world_size() // args.pp))
pgc = layout.student.pgc
hf = tiny_hf_model("qwen3", seed=3)
dims = ModelDims.from_hf(hf.config)
gpt = build_model(dims, pgc, seed=11)
load_hf_weights(gpt, dims, HFWeights(hf.state_dict()))
# plain DDP (no distributed optimizer): every rank then holds the whole reduced gradient
student = TrainableModel(gpt, dims, adam(0.0, use_distributed_optimizer=False), layout.student.world)

# long-tailed lengths, 5 rows on replica 0 and 3 on replica 1
lengths = [[7, 120, 15, 3, 44], [200, 9, 31]][pgc.dp.rank()] if pgc.dp.size() > 1 else [7, 120, 15, 3, 44, 200, 9]
g = torch.Generator().manual_seed(1 + pgc.dp.rank())
rows = [torch.randint(0, 250, (n,), generator=g).tolist() for n in lengths]
weights = [torch.randn(n, generator=g) for n in lengths]  # a per-token weight of the loss
masks = [(torch.arange(n) >= n // 3).float() for n in lengths]  # "responses": the last two thirds

# a budget of 128 tokens: the row of 200 is over it (a micro-batch of its own, counted)
LAYOUTS = {"pad_to_max": Batching(2), "token_budget": Batching(4, max_tokens=128),
           "packed": Batching(4, max_tokens=128, packed=True)}


def step(batching: Batching) -> dict:
    micro_plan = plan(lengths, batching)
    mbs = [assemble([rows[i] for i in mb], batching, per_token={"w": [weights[i] for i in mb],
                                                                "loss_mask": [masks[i] for i in mb]})
           for mb in micro_plan.micro_batches]
    if batching is LAYOUTS["pad_to_max"]:
        mbs = [pad_tokens(mb, max(lengths)) for mb in mbs]
        for mb in mbs:  # the padding belongs to no row
            mb["row_ids"] = torch.arange(mb["tokens"].shape[0]).unsqueeze(1).expand_as(mb["tokens"])
    total = torch.tensor([sum(loss_denominator(mb["loss_mask"], "seq-mean-token-mean", mb["row_ids"])
                              for mb in mbs)], dtype=torch.float64)
    dist.all_reduce(total, group=pgc.dp)

    def loss_fn(mb, lp, entropy, logits):
        loss = aggregate_loss(-mb["w"] * lp, mb["loss_mask"], "seq-mean-token-mean", float(total), mb["row_ids"])
        return loss, {"loss": Stat.total_of(loss)}

    metrics, info = student.train_step(mbs, loss_fn, temperature=1.0)
    grads = torch.cat([p.main_grad.reshape(-1).double() for p in gpt.parameters()])
    return {"loss": metrics["loss"], "grad_norm": info["grad_norm"], "grads": grads,
            "micro_batches": len(mbs), "over_budget": micro_plan.over_budget}


results = {name: step(b) for name, b in LAYOUTS.items()}
base = results["pad_to_max"]
report = {name: {"loss_diff": abs(r["loss"] - base["loss"]), "grad_diff": (r["grads"] - base["grads"]).abs().max().item(),
                 "grad_scale": base["grads"].abs().max().item(), "micro_batches": r["micro_batches"],
                 "over_budget": r["over_budget"], "loss": r["loss"]} for name, r in results.items()}
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, report)
if dist.get_rank() == 0:
    json.dump({"ranks": gathered}, open(args.out, "w"))
dist.destroy_process_group()
