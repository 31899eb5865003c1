"""The transformers engine synced from a Megatron student (TP from the command line): its log-probs of its own
samples against the student's recomputation, before and after an optimizer step."""

import argparse
import json
import tempfile
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import build_model, load_hf_weights
from megatron_gopd.models.hf_io import HFWeights
from megatron_gopd.models.parallel_model import TrainableModel, adam
from megatron_gopd.batching import Batching, assemble
from megatron_gopd.rollout.base import SamplingParams
from megatron_gopd.rollout.colocated import ColocatedRollout
from megatron_gopd.rollout.hf_engine import HFRolloutEngine
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--tp", type=int, default=1)
args = parser.parse_args()

layout = build_layout(ParallelShape(args.tp, 1, dist.get_world_size() // args.tp))
pgc = layout.student.pgc
hf = tiny_hf_model("qwen3", seed=2)
dims = ModelDims.from_hf(hf.config)
gpt = build_model(dims, pgc)
load_hf_weights(gpt, dims, HFWeights(hf.state_dict()))
student = TrainableModel(gpt, dims, adam(1e-2), layout.student.world)
config_dir = tempfile.mkdtemp()
hf.config.save_pretrained(config_dir)
engine = HFRolloutEngine(config_dir) if pgc.mp.rank() == 0 else None
rollout = ColocatedRollout(engine, gpt, dims, bucket_bytes=32 << 10)

g = torch.Generator().manual_seed(0)
prompts = [torch.randint(0, 250, (n,), generator=g).tolist() for n in (4, 9, 6, 11)]
params = SamplingParams(temperature=0.8, max_new_tokens=24, seed=3)


def as_batch(samples):
    """The samples as one padded micro-batch, with the engine's log-probs on the response tokens."""
    per_token = {"response_mask": [torch.tensor([0.0] * len(s.prompt_ids) + [1.0] * len(s.response_ids))
                                   for s in samples],
                 "rollout_lp": [torch.tensor([0.0] * len(s.prompt_ids) + s.logprobs) for s in samples]}
    return assemble([s.prompt_ids + s.response_ids for s in samples], Batching(len(samples)), per_token=per_token)


def compare():
    rollout.sync_weights()
    samples = rollout.generate(prompts, params)
    batch = as_batch(samples)
    old = student.token_logprobs([batch], temperature=params.temperature)[0]
    mask = batch["response_mask"].bool()
    return samples, (old - batch["rollout_lp"])[mask].abs().max().item()


def greedy_matches_student_argmax():
    samples = rollout.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=12))
    batch = as_batch(samples)

    def argmax(mb, lp, ent, logits):
        full = gather_from_tensor_model_parallel_region(logits, group=pgc.tp)[..., : dims.vocab_size]
        return lp.new_zeros(()), {"argmax": full.argmax(-1)}

    predicted = student.forward_backward([batch], argmax, temperature=1.0, forward_only=True)[0]["argmax"]
    mask = batch["response_mask"].bool()[:, 1:]
    return bool((predicted[:, :-1][mask] == batch["tokens"][:, 1:][mask]).all()) and int(mask.sum()) == 48


before, diff_before = compare()
greedy_ok = greedy_matches_student_argmax()
student.train_step([as_batch(before)],
                   lambda mb, lp, ent, logits: (-lp.sum() / 100, {}), temperature=1.0)
after, diff_after = compare()
if dist.get_rank() == 0:
    json.dump({
        "diff_before": diff_before, "greedy_matches_student_argmax": greedy_ok, "diff_after": diff_after,
        "responses_changed": sum(a.response_ids != b.response_ids for a, b in zip(before, after)),
        "response_tokens": sum(len(s.response_ids) for s in before),
    }, open(args.out, "w"))
dist.destroy_process_group()
