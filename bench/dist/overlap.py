"""Streaming overlap (torchrun, world 2): rank 0 is the student (rollout engine + pi_old), rank 1 a dedicated
teacher serving log-probs through the real DedicatedScorer / serve_frozen_model exchange.

One step = MICRO_BATCHES rollout micro-batches, then pi_old and the teacher log-probs of all of them:
- streaming (what Trainer.rollout / add_old_logprobs / add_frozen_logprobs do): each micro-batch is submitted to
  the teacher as soon as it is generated; after the rollout the student computes pi_old; then it collects;
- serialised: generate all; submit all and collect (wait for the teacher); then compute pi_old.
Rounds alternate the two orders (AB, BA, ...). Components are timed in the serialised runs.

    torchrun --nproc_per_node 2 bench/dist/overlap.py --out F --ckpts DIR --rounds N --micro-batches M
        --rows R --new-tokens T
"""

import argparse
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron_gopd.runtime.distributed import init_distributed  # noqa: E402

init_distributed()

from megatron_gopd.checkpoint import load_model  # noqa: E402
from megatron_gopd.models.architectures import ModelDims  # noqa: E402
from megatron_gopd.models.builder import build_model  # noqa: E402
from megatron_gopd.models.parallel_model import ParallelModel  # noqa: E402
from megatron_gopd.batching import Batching, assemble  # noqa: E402
from megatron_gopd.rollout.base import SamplingParams  # noqa: E402
from megatron_gopd.rollout.hf_engine import HFRolloutEngine  # noqa: E402
from megatron_gopd.runtime.layout import ParallelShape, build_layout  # noqa: E402
from megatron_gopd.teachers.frozen import FrozenModel  # noqa: E402
from megatron_gopd.teachers.service import DedicatedScorer, serve_frozen_model  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--ckpts", required=True)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--micro-batches", type=int, default=4)
parser.add_argument("--rows", type=int, default=4)
parser.add_argument("--new-tokens", type=int, default=64)
args = parser.parse_args()
ckpts = Path(args.ckpts)

layout = build_layout(ParallelShape(), {"teacher": (ParallelShape(), True)})
if layout.role_of(dist.get_rank()) == "teacher":
    teacher = FrozenModel("teacher", str(ckpts / "teacher_big"), layout.frozen["teacher"])
    serve_frozen_model(teacher, layout, layout.frozen["teacher"], temperature=1.0)
    dist.destroy_process_group()
    sys.exit(0)

engine = HFRolloutEngine.from_pretrained(str(ckpts / "hf" / "student"))
dims = ModelDims.from_hf(ckpts / "student" / "hf")
gpt = build_model(dims, layout.student.pgc)
load_model(ckpts / "student", gpt, group=layout.student.world)
student = ParallelModel(gpt, dims)  # pi_old is TrainableModel.token_logprobs, i.e. this same ParallelModel pass
scorer = DedicatedScorer("teacher", layout, timeout_s=600)
g = torch.Generator().manual_seed(0)
prompts = [[[1] + torch.randint(5, 250, (8,), generator=g).tolist() for _ in range(args.rows)]
           for _ in range(args.micro_batches)]


def generate(j: int, seed: int) -> dict:
    params = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens, stop_token_ids=(), seed=seed * 100 + j)
    return assemble([s.prompt_ids + s.response_ids for s in engine.generate(prompts[j], params)],
                    Batching(args.rows))


row_ids = itertools.count()


def submit(batch: dict) -> None:
    scorer.submit({next(row_ids): row.tolist() for row in batch["tokens"]})


def streaming(seed: int) -> dict:
    start = time.perf_counter()
    batches = []
    for j in range(args.micro_batches):
        batches.append(generate(j, seed))
        submit(batch=batches[-1])
    student.token_logprobs(batches)
    scores = scorer.collect()
    assert len(scores) == args.micro_batches * args.rows
    return {"total": time.perf_counter() - start}


def serialised(seed: int) -> dict:
    t0 = time.perf_counter()
    batches = [generate(j, seed) for j in range(args.micro_batches)]
    t1 = time.perf_counter()
    for batch in batches:
        submit(batch)
    scorer.collect()
    t2 = time.perf_counter()
    student.token_logprobs(batches)
    t3 = time.perf_counter()
    return {"total": t3 - t0, "generate": t1 - t0, "teacher": t2 - t1, "pi_old": t3 - t2}


streaming(0), serialised(0)  # warm-up
runs = {"streaming": [], "serialised": []}
for r in range(args.rounds):
    order = ("streaming", "serialised") if r % 2 == 0 else ("serialised", "streaming")
    for name in order:
        runs[name].append((streaming if name == "streaming" else serialised)(r + 1))
scorer.shutdown()
json.dump({"runs": runs, "threads": torch.get_num_threads()}, open(args.out, "w"))
dist.destroy_process_group()
