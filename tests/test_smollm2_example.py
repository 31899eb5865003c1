"""Issue 25: examples/smollm2 end to end at its smoke size (run.sh --profile smoke): the real SmolLM2-135M-Instruct
as the teacher, its copy without layers 26 and 27 as the student, OPD and ExOPD through torchrun on the same seed
and data, every model evaluated with the same tool, and a report computed from those evaluations alone. The smoke
profile is far too short to learn anything: what distillation gains is the full profile's report (README)."""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open

from tests.conftest import ROOT

MODELS = ("teacher", "student", "opd", "exopd")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2")
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "examples/smollm2/run.sh", "--out", str(out), "--profile", "smoke"], check=False,
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def test_each_stage_produced_its_artefact_and_the_arms_differ_only_in_lambda(smoke_run):
    out = smoke_run
    expected = ["data/train.jsonl", "data/test.jsonl", "report.md", "results.json",
                *(f"models/{name}-hf/config.json" for name in MODELS), *(f"eval/{name}.json" for name in MODELS),
                *(f"runs/{arm}/{f}" for arm in ("opd", "exopd") for f in ("checkpoints/latest", "metrics.jsonl"))]
    missing = [path for path in expected if not (out / path).exists()]
    assert not missing, missing
    layers = {name: json.loads((out / "models" / f"{name}-hf" / "config.json").read_text())["num_hidden_layers"]
              for name in MODELS}
    assert layers == {"teacher": 30, "student": 28, "opd": 28, "exopd": 28}
    # the student is the teacher without layers 26 and 27: its layer 26 is the teacher's 28
    teacher, student = (safe_open(next((out / "models" / f"{name}-hf").glob("*.safetensors")), "pt")
                        for name in ("teacher", "student"))
    for ours, theirs in (("model.layers.25.mlp.up_proj.weight",) * 2,
                         ("model.layers.26.self_attn.q_proj.weight", "model.layers.28.self_attn.q_proj.weight"),
                         ("model.norm.weight",) * 2):
        assert torch.equal(student.get_tensor(ours), teacher.get_tensor(theirs)), ours
    configs = {arm: yaml.safe_load((out / "runs" / arm / "config.yaml").read_text()) for arm in ("opd", "exopd")}
    assert (configs["opd"]["algo"]["lam"], configs["exopd"]["algo"]["lam"]) == (1.0, 1.25)
    configs["exopd"]["algo"]["lam"] = 1.0
    for config in configs.values():
        config["train"].pop("output_dir")
    assert configs["opd"] == configs["exopd"]
    assert configs["opd"]["teachers"][0]["path"] == str(out / "models" / "teacher")
    assert configs["opd"]["student"]["path"] == str(out / "models" / "student")
    held_out = {json.loads(line)["prompt"] for line in (out / "data" / "test.jsonl").read_text().splitlines()}
    train = {json.loads(line)["prompt"] for line in (out / "data" / "train.jsonl").read_text().splitlines()}
    assert len(held_out) + len(train) == 121 and not held_out & train  # every product of 2..12 once


def test_the_report_is_computed_from_the_raw_evaluations(smoke_run):
    """Accuracy is the mean over prompts of each prompt's fraction of correct samples, the reverse KL the total of
    the samples' summed KL over their total response tokens; the teacher has none. The markdown shows these."""
    out = smoke_run
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    for name in MODELS:
        evaluation = json.loads((out / "eval" / f"{name}.json").read_text())
        records, row = evaluation["samples"], results["models"][name]
        per_prompt = {}
        for record in records:
            per_prompt.setdefault(record["uid"], []).append(record["correct"])
        fractions = [sum(c) / len(c) for c in per_prompt.values()]
        assert row["accuracy"] == 100 * evaluation["metrics"][f"math/avg@{evaluation['n']}"]
        assert row["accuracy"] == pytest.approx(100 * statistics.fmean(fractions), abs=1e-12)
        assert row["prompts"] == len(fractions) == results["profile"]["test_prompts"]
        if name == "teacher":
            assert row["reverse_kl"] is None and all("reverse_kl" not in r for r in records)
        else:
            total = sum(r["reverse_kl"] for r in records) / sum(r["length"] for r in records)
            assert row["reverse_kl"] == pytest.approx(total, rel=1e-12) and math.isfinite(total) and total > 0
            assert f"| {row['reverse_kl']:.4f} |" in report
        assert f"| {row['accuracy']:.1f} ± " in report
    for arm in ("opd", "exopd"):
        steps = [json.loads(line) for line in (out / "runs" / arm / "metrics.jsonl").read_text().splitlines()]
        assert results["training_kl"][arm] == [steps[0]["actor/full_vocab_kl"], steps[-1]["actor/full_vocab_kl"]]
