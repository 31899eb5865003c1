"""Issue 9: the toy pipeline end to end, shortened (--profile quick), through torchrun, dedicated teacher ranks,
the checkpoints and the evaluation: each teacher beats the base on its own domain; then a rerun that finds every
stage cached."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    cmd = [sys.executable, "examples/toy/pipeline.py", "--out", str(out), "--profile", "quick", "--ranks-per-run", "3"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, cmd


def test_each_stage_produced_its_artefact(toy_run):
    out, _ = toy_run
    profile = json.loads((out / "profile.json").read_text())
    expected = ["data/manifest.json", "data/math/test.jsonl", "tokenizer/tokenizer.json", "models/init/hf/config.json",
                "models/base/config.json", "models/teacher-math/config.json", "models/teacher-code/config.json",
                "data/samples/math.jsonl", "data/samples/code.jsonl", "models/expo/config.json",
                "report.md", "results.json", "lambda_sweep.png"]
    for run in ["pretrain", "teacher-math", "teacher-code"] + [
            f"{kind}-s{seed}" for seed in profile["seeds"]
            for kind in ["sft"] + [f"gopd-lam{lam:g}" for lam in profile["lambdas"]]]:
        expected += [f"runs/{run}/checkpoints/latest", f"runs/{run}/metrics.jsonl"]
    for name in ["base", "teacher-math", "teacher-code", "expo"]:
        expected += [f"eval/{name}-s{seed}.json" for seed in profile["seeds"]]
    missing = [path for path in expected if not (out / path).exists()]
    assert not missing, missing
    # the G-OPD runs used dedicated teacher ranks: 1 student + 2 teachers
    config = (out / "runs" / f"gopd-lam1-s{profile['seeds'][0]}" / "config.yaml").read_text()
    assert config.count("placement: dedicated") == 2


def test_the_report_is_computed_from_the_runs(toy_run):
    out, _ = toy_run
    profile = json.loads((out / "profile.json").read_text())
    seed = profile["seeds"][0]
    table = json.loads((out / "results.json").read_text())["table"]
    n = profile["eval_n"]
    base = json.loads((out / "eval" / f"base-s{seed}.json").read_text())["metrics"]
    assert table["base"][f"math avg@{n}"] == [100 * base[f"math/avg@{n}"]]
    last = json.loads((out / "runs" / f"gopd-lam1.25-s{seed}" / "metrics.jsonl").read_text().splitlines()[-1])
    assert table["ExOPD (lambda=1.25)"][f"code avg@{n}"] == [100 * last[f"eval/code/avg@{n}"]]
    assert table["ExOPD (lambda=1.25)"]["code length"] == [last["eval/code/response_length"]]
    assert "| ExOPD (lambda=1.25) |" in (out / "report.md").read_text()


def test_each_teacher_beats_the_base_on_its_own_domain(toy_run):
    """GRPO removed some of the base's careless-answer habit (measured: math 15.6 -> 20.3, code 13.7 -> 23.0 on 64
    held-out prompts x 4 samples; the runs are deterministic)."""
    out, _ = toy_run
    n = json.loads((out / "profile.json").read_text())["eval_n"]
    table = json.loads((out / "results.json").read_text())["table"]
    for domain in ("math", "code"):
        teacher, base = table[f"teacher ({domain})"][f"{domain} avg@{n}"], table["base"][f"{domain} avg@{n}"]
        assert teacher[0] > base[0] + 2, (domain, teacher, base)


def test_a_rerun_finds_every_stage_cached(toy_run):
    _, cmd = toy_run
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("cached") == 6, proc.stdout
