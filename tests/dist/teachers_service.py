"""The streaming log-prob service. A student scores micro-batches of mixed math/code rows with a math teacher, a code
teacher and two references (the student's init and a teacher base), each colocated or dedicated with its own
TP x PP x DP as --layout says. Results are compared with a direct HF computation on rank 0."""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import init_distributed

init_distributed()

from transformers import AutoModelForCausalLM

from megatron_gopd.runtime.layout import ParallelShape, build_layout
from megatron_gopd.teachers.frozen import FrozenModel
from megatron_gopd.teachers.service import ColocatedScorer, DedicatedScorer, Scoring, serve_frozen_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--ckpts", required=True)
parser.add_argument("--layout", required=True,
                    help='JSON: {"student": [tp, pp, dp], "dedicated": {model: [tp, pp, dp]}}')
args = parser.parse_args()

spec = json.loads(args.layout)
STUDENT = ParallelShape(*spec["student"])
PATHS = {"math": "math", "code": "code", "ref_init": "student", "ref_base": "base"}
dedicated = {name: ParallelShape(*shape) for name, shape in spec["dedicated"].items()}
layout = build_layout(STUDENT, {name: (dedicated.get(name, STUDENT), name in dedicated) for name in PATHS})
role = layout.role_of(dist.get_rank())
TEMPERATURE = 0.7

models = {}
for name in PATHS:
    groups = layout.frozen[name]
    if groups.is_member:
        models[name] = FrozenModel(name, f"{args.ckpts}/{PATHS[name]}", groups)

report = {}
if role != "student":
    serve_frozen_model(models[role], layout, layout.frozen[role], temperature=TEMPERATURE)
else:
    scoring = Scoring({n: DedicatedScorer(n, layout, timeout_s=120) if n in dedicated
                       else ColocatedScorer(models[n], temperature=TEMPERATURE) for n in PATHS})
    g = torch.Generator().manual_seed(0)
    domains = ["math", "code", "math", "code", "code", "math", "math", "code"]
    rows = [torch.randint(3, 250, (12 + 2 * i,), generator=g).tolist() for i in range(len(domains))]
    for _step in range(2):  # two submissions per step, as two finished rollout chunks
        for chunk in (range(0, 3), range(3, 8)):
            scoring.submit({i: (rows[i], [domains[i], "ref_init", "ref_base"]) for i in chunk})
        got = scoring.collect()
    scoring.shutdown()
    if dist.get_rank() == 0:
        worst = 0.0
        hf = {n: AutoModelForCausalLM.from_pretrained(f"{args.ckpts}/hf/{p}").eval() for n, p in PATHS.items()}
        for i, (tokens, domain) in enumerate(zip(rows, domains)):
            ids = torch.tensor([tokens])
            for name in (domain, "ref_init", "ref_base"):
                with torch.no_grad():
                    lp = torch.log_softmax(hf[name](ids).logits[0, :-1] / TEMPERATURE, -1)
                direct = lp.gather(-1, ids[0, 1:, None]).squeeze(-1)
                assert got[name][i][0] == 0 and len(got[name][i]) == len(tokens)
                worst = max(worst, (got[name][i][1:] - direct).abs().max().item())
            other = "code" if domain == "math" else "math"
            assert i not in got[other], "a row reached the other domain's teacher"
        report.update(max_diff=worst)

counts = {name: [m.forward_calls, m.samples_scored] for name, m in models.items()}
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"rank": dist.get_rank(), "role": role, "counts": counts})
if dist.get_rank() == 0:
    report["ranks"] = gathered
    json.dump(report, open(args.out, "w"))
dist.destroy_process_group()
