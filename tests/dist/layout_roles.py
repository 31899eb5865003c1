"""World of 4: a DP=2 student on ranks 0-1, dedicated teachers "math" (rank 2) and "code" (rank 3), and a
colocated reference. Records every group's members and every collective a student training step issues."""

import argparse
import collections
import functools
import inspect
import json
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

# Trace collectives before megatron binds them.
TRACE = collections.Counter()
for _name in ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
              "barrier", "all_gather_object", "reduce"]:
    _original = getattr(dist, _name)

    @functools.wraps(_original)  # keeps the signature that collectives_scoped_to binds against
    def _traced(*a, _original=_original, _name=_name, **k):
        group = inspect.signature(_original).bind(*a, **k).arguments.get("group")
        ranks = "WORLD" if group is None else tuple(dist.get_process_group_ranks(group))
        TRACE[f"{_name}:{ranks}"] += 1
        return _original(*a, **k)

    setattr(dist, _name, _traced)

from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import HFWeights, build_model, load_hf_weights
from megatron_gopd.models.parallel_model import ParallelModel, TrainableModel, adam
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()

one = ParallelShape(1, 1, 1)
layout = build_layout(
    ParallelShape(1, 1, 2),
    {"math": (one, True), "code": (one, True), "reference": (ParallelShape(1, 1, 2), False)},
)
rank = dist.get_rank()
fields = ["tp", "pp", "dp", "mp", "dp_cp", "tp_cp", "embd", "pos_embd", "expt_dp", "intra_dist_opt"]
role = layout.role_of(rank)
pgc = layout.student.pgc if role == "student" else layout.frozen[role].pgc
members = {f: dist.get_process_group_ranks(getattr(pgc, f)) for f in fields}
members["role_world"] = dist.get_process_group_ranks(
    layout.student.world if role == "student" else layout.frozen[role].world
)

# The group megatron's fp8 context (fp8_utils.get_fp8_context) hands Transformer Engine for the amax reduction,
# asked as it asks (fp8_utils binds parallel_state only when TE is installed); None means the WORLD.
from megatron.core import fp8_utils, parallel_state

from megatron_gopd.models.builder import route_fp8_amax_reduction

route_fp8_amax_reduction(pgc)
state = getattr(fp8_utils, "parallel_state", parallel_state)
amax = state.get_amax_reduction_group(with_context_parallel=True) if state.model_parallel_is_initialized() else None
fp8 = {"amax_group": "WORLD" if amax is None else dist.get_process_group_ranks(amax),
       "tp_only": dist.get_process_group_ranks(state.get_amax_reduction_group(True, tp_only_amax_red=True))
       if amax is not None else "WORLD",
       "megatron_parallel_state_untouched": not parallel_state.model_parallel_is_initialized()}
if amax is not None:
    dist.all_reduce(torch.ones(1), group=amax)  # only the role's own ranks take part

hf = tiny_hf_model("llama")
dims = ModelDims.from_hf(hf.config)
tokens = torch.randint(0, 250, (2, 16), generator=torch.Generator().manual_seed(0))
TRACE.clear()
gpt = build_model(dims, pgc)
load_hf_weights(gpt, dims, HFWeights(hf.state_dict()))
if role == "student":
    student = TrainableModel(gpt, dims, adam(1e-3), layout.student.world)
    mine = tokens[rank:rank + 1]
    student.train_step([{"tokens": mine}], lambda mb, lp, ent, logits: (-lp.sum() / 30, {}), temperature=1.0)
else:
    ParallelModel(gpt, dims).token_logprobs([{"tokens": tokens}])
collectives = sorted(TRACE)

gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"rank": rank, "role": role, "members": members, "collectives": collectives,
                                  "fp8": fp8})
if rank == 0:
    with open(args.out, "w") as f:
        json.dump({"ranks": gathered, "world_size": dist.get_world_size(),
                   "reference_shares_student_groups": layout.frozen["reference"].pgc is layout.student.pgc}, f)
dist.destroy_process_group()
