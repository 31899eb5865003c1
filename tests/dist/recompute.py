"""Activation recompute of the student (train.recompute: none | selective | full) in a real GPTModel (the tiny Qwen3,
HF weights, SDPAttention) at TP = the world size. Rank 0 writes the JSON.

- parity: one TrainableModel.train_step (DDP, the distributed optimizer) over two micro-batches per mode: the loss
  and megatron's gradient buffer against recompute 'none';
- saved: the bytes autograd keeps from a forward in training mode (each storage once, parameters excluded, through
  saved-tensor hooks), per layer (the difference between a 4-layer and a 2-layer model, per token) and in all,
  per mode and dtype, beside the memory planner's count of the same (megatron_gopd.memory_plan).
"""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

from megatron_gopd import memory_plan
from megatron_gopd.metrics import Stat
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import DTYPES, HFWeights, build_model, load_hf_weights
from megatron_gopd.models.parallel_model import ParallelModel, TrainableModel, adam
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_config, tiny_hf_model

MODES = ("none", "selective", "full")
parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()

tp = dist.get_world_size()
layout = build_layout(ParallelShape(tp=tp))
pgc, world = layout.student.pgc, layout.student.world
hf = tiny_hf_model("qwen3", seed=3)
dims = ModelDims.from_hf(hf.config)
weights = HFWeights(hf.state_dict())
results = {"parity": {}, "saved": {}}


def max_over_ranks(value: float) -> float:
    t = torch.tensor(float(value))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


g = torch.Generator().manual_seed(5)
micro_batches = [{"tokens": torch.randint(0, dims.vocab_size, (2, 40), generator=g),
                  "weight": torch.rand(2, 40, generator=g) / 160} for _ in range(2)]


def loss_fn(mb, lp, entropy, logits):
    loss = (lp * mb["weight"]).sum()
    return loss, {"loss": Stat.total_of(loss)}


parity = {}
for mode in MODES:
    gpt = build_model(dims, pgc, seed=11, recompute=mode)
    load_hf_weights(gpt, dims, weights)
    student = TrainableModel(gpt, dims, adam(1e-3), world)
    metrics, info = student.train_step(micro_batches, loss_fn, temperature=1.0)
    parity[mode] = (metrics["loss"],
                    torch.cat([b.grad_data.clone() for b in student.module.buffers]), info["grad_norm"])
for mode in MODES:
    loss, grads, norm = parity[mode]
    results["parity"][mode] = {
        "loss": loss, "grad_norm": norm,
        "loss_diff": max_over_ranks(abs(loss - parity["none"][0])),
        "grad_max_diff": max_over_ranks((grads - parity["none"][1]).abs().max().item()),
        "grad_max_abs": max_over_ranks(grads.abs().max().item()),
    }


def saved_bytes(layers: int, mode: str, dtype: str, tokens: int) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in a training forward over [1, tokens]."""
    config = dict(tiny_hf_config("qwen3").to_dict(), num_hidden_layers=layers)
    gpt = build_model(ModelDims.from_hf(config), pgc, dtype=DTYPES[dtype], recompute=mode)
    params = {p.untyped_storage().data_ptr() for p in gpt.parameters()}
    seen, forward = {}, [True]

    def pack(t):
        if forward[0] and t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def loss(mb, lp, entropy, logits):
        forward[0] = False  # the backward's recomputation saves too, and frees it layer by layer
        return lp.sum(), {}

    gpt.train()
    batch = {"tokens": torch.randint(0, dims.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ParallelModel(gpt, dims).forward_backward([batch], loss, temperature=1.0, forward_only=False,
                                                 with_entropy=False)
    return sum(seen.values())


TOKENS = 64
for dtype in ("fp32", "bf16"):
    for mode in MODES:
        two, four = saved_bytes(2, mode, dtype, TOKENS), saved_bytes(4, mode, dtype, TOKENS)
        planned = memory_plan.layer_activations(dims, tp=tp, dtype=dtype, attention="sdpa", recompute=mode,
                                                seq=TOKENS)
        results["saved"][f"{dtype}/{mode}"] = {
            "layer_bytes_per_token": (four - two) / 2 / TOKENS, "planned_layer_bytes_per_token": planned.kept,
            "four_layers_bytes": four,
        }

if dist.get_rank() == 0:
    with open(args.out, "w") as f:
        json.dump(results, f)
dist.destroy_process_group()
