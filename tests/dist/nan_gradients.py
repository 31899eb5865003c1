"""A student at DP=2 whose loss is NaN on one rank's micro-batch only: after the gradient all-reduce every rank
holds non-finite gradients, and TrainableModel.train_step must refuse the update on every rank (megatron's
fp32 optimizer would apply them), leaving the weights, the Adam state and the LR schedule as they were; the next
finite step updates again."""

import argparse
import hashlib
import json
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import HFWeights, build_model, load_hf_weights
from megatron_gopd.models.parallel_model import TrainableModel, adam
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()

layout = build_layout(ParallelShape(dp=dist.get_world_size()))
hf = tiny_hf_model("qwen3", seed=3)
dims = ModelDims.from_hf(hf.config)
gpt = build_model(dims, layout.student.pgc, seed=11)
load_hf_weights(gpt, dims, HFWeights(hf.state_dict()))
student = TrainableModel(gpt, dims, adam(1e-3), layout.student.world)
tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))


def state() -> str:
    """One hash of every weight and every optimizer state tensor on this rank."""
    digest = hashlib.sha256()
    tensors = [p for p in gpt.parameters()] + [v for opt in student.optimizer.chained_optimizers
                                               for s in opt.optimizer.state.values() for v in s.values()
                                               if torch.is_tensor(v)]
    for t in tensors:
        digest.update(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def step(poison: bool) -> dict:
    def loss_fn(mb, lp, entropy, logits):
        loss = -lp.sum() / 100
        return (loss * float("nan") if poison else loss), {}

    _, info = student.train_step([{"tokens": tokens}], loss_fn, temperature=1.0)
    return info


report = {"rank": dist.get_rank(), "steps": []}
for poison in (False, dist.get_rank() == 1, False):  # a good step, NaN on rank 1 only, a good step
    before, lr_steps = state(), student.scheduler.num_steps
    info = step(poison)
    report["steps"].append({"update_ok": info["update_ok"], "changed": state() != before,
                            "scheduler_advanced": student.scheduler.num_steps - lr_steps,
                            "grad_norm_finite": bool(torch.isfinite(torch.tensor(info["grad_norm"])))})
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, report)
if dist.get_rank() == 0:
    json.dump({"ranks": gathered}, open(args.out, "w"))
dist.destroy_process_group()
