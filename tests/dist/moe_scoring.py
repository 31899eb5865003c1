"""Forward-only scoring of a mixture of experts whose experts span DP replicas (EP=2 over DP=2, world 2): the
replicas score different numbers of micro-batches (rank 0 two, then none; rank 1 none, then one of another
shape), as colocated teachers do with per-domain rows, and each replica's log-probs match Hugging Face's."""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import HFWeights, build_model, load_hf_weights
from megatron_gopd.models.hf_io import hub_state_dict
from megatron_gopd.models.parallel_model import ParallelModel
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()

layout = build_layout(ParallelShape(dp=2, ep=2))
hf = tiny_hf_model("qwen3_moe", seed=4)
dims = ModelDims.from_hf(hf.config)
gpt = build_model(dims, layout.student.pgc)
load_hf_weights(gpt, dims, HFWeights(hub_state_dict(hf)))
model = ParallelModel(gpt, dims)
rank = dist.get_rank()
generator = torch.Generator().manual_seed(rank)
calls = [[torch.randint(0, 250, (2, 10), generator=generator) for _ in range(2)], []] if rank == 0 else \
    [[], [torch.randint(0, 250, (1, 7), generator=generator)]]
worst = 0.0
for batches in calls:
    for tokens, lp in zip(batches, model.token_logprobs([{"tokens": t} for t in batches])):
        with torch.no_grad():
            expected = torch.log_softmax(hf(tokens).logits.float(), -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        worst = max(worst, (lp[:, 1:] - expected).abs().max().item())
gathered = [None, None]
dist.all_gather_object(gathered, {"rank": rank, "scored": sum(map(len, calls)), "max_diff": worst,
                                  "experts_span_replicas": model.experts_span_replicas})
if rank == 0:
    json.dump(gathered, open(args.out, "w"))
dist.destroy_process_group()
