"""The streaming log-prob service. A TP=2 student on ranks 0-1 scores micro-batches of mixed math/code rows with
a math teacher, a code teacher and two references (the student's init and a teacher base), each dedicated or
colocated as --placement says. Results are compared with a direct HF computation on rank 0."""

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
parser.add_argument("--dedicated", default="", help="comma-separated models on ranks of their own")
args = parser.parse_args()

STUDENT = ParallelShape(tp=2)
PATHS = {"math": "math", "code": "code", "ref_init": "student", "ref_base": "base"}
dedicated = set(filter(None, args.dedicated.split(",")))
shapes = {name: (ParallelShape(1, 1, 1) if name in dedicated else STUDENT, name in dedicated) for name in PATHS}
layout = build_layout(STUDENT, shapes)
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
        worst, adv_worst = 0.0, 0.0
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
        # the reference switch: advantages with ref = base minus advantages with ref = student init
        from megatron_gopd.algo.gopd import gopd_advantages

        lam, b = 1.25, 1
        teacher = torch.stack([got[d][b][i] for i, d in enumerate(domains[b])])
        old = got["ref_init"][b]  # stands in for pi_old
        switch = gopd_advantages(teacher, old, got["ref_base"][b], lam) - gopd_advantages(teacher, old, got["ref_init"][b], lam)
        adv_worst = (switch - (1 - lam) * (got["ref_base"][b] - got["ref_init"][b])).abs().max().item()
        report.update(max_diff=worst, reference_switch_error=adv_worst)

counts = {name: [m.forward_calls, m.samples_scored] for name, m in models.items()}
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, {"rank": dist.get_rank(), "role": role, "counts": counts})
if dist.get_rank() == 0:
    report["ranks"] = gathered
    json.dump(report, open(args.out, "w"))
dist.destroy_process_group()
