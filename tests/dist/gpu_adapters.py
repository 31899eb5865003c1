"""The GPU-only adapters' code paths with real megatron-core over gloo, at TP=2 (2 ranks), against stand-ins:

1. SGLang weight hand-off to an engine spanning both TP ranks: the exporter gives full weights on both ranks, each
   flattens them and hands its own payload over; the leader's stand-in sglang engine receives one payload per
   engine rank, in rank order, and rebuilds them as sglang does. Also the memory stages around the sync.
2. generate_iter through ColocatedRollout: the leader's stand-in engine finishes rows out of order; both ranks of
   the replica see the same (row, sample) stream.
3. FP8 token padding in ParallelModel.run (forced on CPU): log-probs equal the unpadded ones.
4. Model checkpoints across layer specs: a checkpoint without Transformer Engine's `_extra_state` entries loads
   into a model that has them (its norms then ask for keys the checkpoint lacks), and the other way round.
"""

import argparse
import json
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

from megatron.core.tensor_parallel import layers as tp_layers

from megatron_gopd import checkpoint
from megatron_gopd.models import parallel_model
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import build_model, load_hf_weights
from megatron_gopd.models.export import export_hf_weights
from megatron_gopd.models.hf_io import HFWeights
from megatron_gopd.models.parallel_model import ParallelModel
from megatron_gopd.rollout.base import Sample, SamplingParams
from megatron_gopd.rollout.colocated import ColocatedRollout
from megatron_gopd.rollout.sglang_engine import FlatTensorMeta, SGLangRolloutEngine, WeightHandoff
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
args = parser.parse_args()
rank = dist.get_rank()
result = {}

layout = build_layout(ParallelShape(2, 1, 1))
pgc = layout.student.pgc
hf = tiny_hf_model("qwen3", seed=4)
dims = ModelDims.from_hf(hf.config)
gpt = build_model(dims, pgc)
load_hf_weights(gpt, dims, HFWeights(hf.state_dict()))


# ---- 1. weight hand-off ----------------------------------------------------------------------------------
def stand_in_serializer(payload):  # sglang's would send CUDA IPC handles; this says who sent what
    return {"from_rank": rank, "payload": payload}


def rebuild(payload):
    """sglang's reconstruct_tensors, both versions: 0.5.3 slices and reshapes, 0.5.23 views the slice as the
    dtype first. One dtype per flat tensor with element offsets reads the same under both."""
    flat = payload["flattened_tensor"]
    old = {m.name: flat[m.start_idx:m.end_idx].reshape(m.shape) for m in payload["metadata"]}
    new = {m.name: flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape) for m in payload["metadata"]}
    assert all(m.dtype == flat.dtype and m.numel == m.end_idx - m.start_idx for m in payload["metadata"])
    return old, new


class StandInSGLang:
    """Records what SGLangRolloutEngine hands to sglang.Engine."""

    def __init__(self):
        self.calls, self.received, self.origins = [], {}, []

    def begin_weight_update(self):
        self.calls.append("begin_weight_update")
        return True, "ok"

    def update_weights_from_tensor(self, payloads, load_format=None, flush_cache=True):
        self.calls.append(f"update:{load_format}:{flush_cache}")
        self.origins.append([p["from_rank"] for p in payloads])
        per_rank = [rebuild(p["payload"]) for p in payloads]
        for old, new in per_rank:
            for name, tensor in old.items():
                assert torch.equal(tensor, new[name])
        for name in per_rank[0][0]:  # engine rank 1 got the same weights, from its own trainer rank
            assert all(torch.equal(per_rank[0][0][name], other[name]) for other, _ in per_rank[1:])
        self.received.update({name: t.clone() for name, t in per_rank[0][0].items()})
        return True, "Success"

    def end_weight_update(self):
        self.calls.append("end_weight_update")
        return True, "ok"

    def flush_cache(self):
        self.calls.append("flush_cache")

    def release_memory_occupation(self, tags):
        self.calls.append(f"release:{','.join(tags)}")

    def resume_memory_occupation(self, tags):
        self.calls.append(f"resume:{','.join(tags)}")


class StandInTrainer:
    def __init__(self, calls):
        self.calls = calls

    def release_memory(self, offload):
        self.calls.append(f"trainer.release(offload={offload})")

    def reclaim_memory(self):
        self.calls.append("trainer.reclaim")


handoff = WeightHandoff(bucket_bytes=64 << 10, group=pgc.tp, serializer=(stand_in_serializer, FlatTensorMeta))
if rank == 0:
    engine = object.__new__(SGLangRolloutEngine)  # its __init__ starts a real sglang.Engine on GPUs
    engine.engine, engine.handoff, engine.released = StandInSGLang(), handoff, set()
    engine.weight_tags, engine.cache_tags = ["weights"], ["kv_cache", "cuda_graph"]
    calls = engine.engine.calls
else:
    engine, calls = None, []
rollout = ColocatedRollout(engine, gpt, dims, bucket_bytes=64 << 10, engine_ranks=2,
                           weight_peer=None if rank == 0 else handoff, trainer=StandInTrainer(calls),
                           offload_optimizer=True)
rollout.sync_weights()  # the first sync: the engine has never slept
rollout.sleep()
rollout.sync_weights()
if rank == 0:
    expected = dict(export_hf_weights(gpt, dims))  # the tp=0 rank's full weights, as the HF engine gets them
else:
    for _ in export_hf_weights(gpt, dims):
        pass
if rank == 0:
    result["handoff"] = {
        "calls": calls,
        "origins": engine.engine.origins,
        "same_names": sorted(engine.engine.received) == sorted(expected) == sorted(hf.state_dict()),
        "bit_exact": all(torch.equal(engine.engine.received[n], t) for n, t in expected.items()),
    }
else:
    result["peer_calls"] = calls

# ---- 2. generate_iter over the replica --------------------------------------------------------------------
prompts = [[5 + i, 6, 7 + i] for i in range(6)]
order = [3, 0, 5, 1, 4, 2]


class OutOfOrderEngine:
    def generate_iter(self, prompts, params):
        for row in order:
            yield row, Sample(prompts[row], [row + 10, row + 11], [-0.5, -0.25], "length")


rollout.engine = OutOfOrderEngine() if rank == 0 else None
stream = list(rollout.generate_iter(prompts, SamplingParams(max_new_tokens=2)))
result[f"stream_{rank}"] = [(row, s.prompt_ids, s.response_ids) for row, s in stream]

# ---- 3. FP8 padding --------------------------------------------------------------------------------------
model = ParallelModel(gpt, dims)
tokens = torch.randint(0, 250, (2, 13), generator=torch.Generator().manual_seed(1))
plain = model.token_logprobs([{"tokens": tokens}])[0]
unpadded = parallel_model.fp8_padded_length
parallel_model.fp8_padded_length = lambda seq, config: -(-seq // 16) * 16  # as TE's FP8 needs it
seen = []
padded_out = model.forward_backward([{"tokens": tokens, "response_mask": torch.ones(2, 13)}],
                       lambda mb, lp, ent, logits: (lp.new_zeros(()), seen.append(mb["response_mask"].shape) or {}),
                       temperature=1.0, forward_only=True)
padded = model.token_logprobs([{"tokens": tokens}])[0]
parallel_model.fp8_padded_length = unpadded
result["fp8_padding"] = {"shape": list(padded.shape), "max_diff": (padded - plain).abs().max().item(),
                         "mask_shapes": [list(s) for s in seen]}

# ---- 4. checkpoints across layer specs ----------------------------------------------------------------------
work = Path(tempfile.mkdtemp()) if rank == 0 else None
work = [work]
dist.broadcast_object_list(work, src=0)
work = work[0]
hf_dir = work / "hf"
if rank == 0:
    hf.config.save_pretrained(hf_dir)
dist.barrier()


class TELikeState:
    """What Transformer Engine's modules add to a state dict: `_extra_state`, opaque bytes (FP8 scales, amax
    history). megatron's local linear layers already write an empty one under the same key, for compatibility;
    its local norms write none, where TE's norms (q/k layernorm, the final layernorm) do."""

    def get_extra_state(self):
        return torch.tensor([7, 7, 7], dtype=torch.uint8)

    def set_extra_state(self, state):
        self.extra_state_loaded = state


def te_like(model):
    """The model's decoder modules carrying extra state as the TE spec's do (the output layer stays a plain
    ColumnParallelLinear in both specs)."""
    for name, module in model.decoder.named_modules():
        if isinstance(module, (tp_layers.ColumnParallelLinear, tp_layers.RowParallelLinear)) or name.endswith(
                ("q_layernorm", "k_layernorm", "final_layernorm")):
            module.__class__ = type(f"TELike{type(module).__name__}", (TELikeState, type(module)), {})
    return model


def logits(model_gpt):
    return ParallelModel(model_gpt, dims).token_logprobs([{"tokens": tokens}])[0]


reference = logits(gpt)
checkpoint.save_model(work / "local", gpt, hf_dir=hf_dir, group=layout.student.world)
te_model = te_like(build_model(dims, pgc, seed=99))
has_extra = sorted({k.split(".")[-2] for k in te_model.state_dict()
                    if k.startswith("decoder.") and k.endswith("_extra_state")})
checkpoint.load_model(work / "local", te_model, group=layout.student.world)
local_into_te = (logits(te_model) - reference).abs().max().item()
checkpoint.save_model(work / "te", te_model, hf_dir=hf_dir, group=layout.student.world)
local = build_model(dims, pgc, seed=98)
checkpoint.load_model(work / "te", local, group=layout.student.world)
te_into_local = (logits(local) - reference).abs().max().item()
result["specs"] = {"te_like_has_extra_state": has_extra, "local_into_te": local_into_te,
                   "te_into_local": te_into_local}

gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, result)
if rank == 0:
    merged = {k: v for r in gathered for k, v in r.items()}
    json.dump(merged, open(args.out, "w"))
dist.destroy_process_group()
