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
from megatron_gopd.teachers.service import FrozenScorer, serve_frozen_model

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
    scorer = FrozenScorer(layout, {n: (None if n in dedicated else models[n]) for n in PATHS},
                          temperature=TEMPERATURE, timeout_s=120)
    g = torch.Generator().manual_seed(0)
    domains = [["math", "code", "math"], ["code", "code", "math", "math", "code"]]
    batches = [torch.randint(3, 250, (len(d), 12 + 4 * i), generator=g) for i, d in enumerate(domains)]
    for _step in range(2):
        for tokens, doms in zip(batches, domains):
            scorer.submit(tokens, [[d, "ref_init", "ref_base"] for d in doms])
        got = scorer.collect()
    scorer.shutdown()
    if dist.get_rank() == 0:
        worst = 0.0
        hf = {n: AutoModelForCausalLM.from_pretrained(f"{args.ckpts}/hf/{p}").eval() for n, p in PATHS.items()}
        for b, (tokens, doms) in enumerate(zip(batches, domains)):
            with torch.no_grad():
                direct = {}
                for name, model in hf.items():
                    lp = torch.log_softmax(model(tokens).logits[:, :-1] / TEMPERATURE, -1)
                    direct[name] = lp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
            for i, d in enumerate(doms):
                for name in (d, "ref_init", "ref_base"):
                    worst = max(worst, (got[name][b][i, 1:] - direct[name][i]).abs().max().item())
                other = "code" if d == "math" else "math"
                assert got[other][b][i].abs().sum() == 0, "a row reached the other domain's teacher"
        report.update(max_diff=worst)

counts = {name: [m.forward_calls, m.samples_scored] for name, m in models.items()}
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"rank": dist.get_rank(), "role": role, "counts": counts})
if dist.get_rank() == 0:
    report["ranks"] = gathered
    json.dump(report, open(args.out, "w"))
dist.destroy_process_group()
