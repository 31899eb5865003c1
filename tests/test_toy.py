"""Issue 9: the toy pipeline end to end, shortened (--profile quick), through torchrun, dedicated teacher ranks and
a dedicated rollout engine rank (issue 23), the checkpoints and the evaluation: every stage's artefact, each teacher trained on its own domain's prompts only,
each G-OPD sample scored by its domain's teacher, the report computed from the runs; then a rerun that finds every
stage cached. The quick profile is far too short to learn anything measurable: that the teachers beat the base and
what distillation gains is the full profile's report (README), reproduced bit for bit on one machine, not across
CPUs."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    cmd = [sys.executable, "examples/toy/pipeline.py", "--out", str(out), "--profile", "quick", "--ranks-per-run", "4"]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, cmd


def test_each_stage_produced_its_artefact(toy_run):
    out, _ = toy_run
    profile = json.loads((out / "profile.json").read_text())
    expected = ["data/manifest.json", "data/math/test.jsonl", "tokenizer/tokenizer.json", "models/init/hf/config.json",
                "models/base/config.json", "models/teacher-math/config.json", "models/teacher-code/config.json",
                "models/init-strong/hf/config.json", "models/teacher-strong/config.json",
                "data/samples/math.jsonl", "data/samples/code.jsonl", "models/expo/config.json",
                "report.md", "results.json", "lambda_sweep.png", "training_curves.png"]
    for run in ["pretrain", "teacher-math", "teacher-code", "pretrain-strong", "teacher-strong"] + [
            f"{kind}-s{seed}" for seed in profile["seeds"] for kind in
            ["sft", "s2w-ref-init", "s2w-ref-teacher-base"] + [f"gopd-lam{lam:g}" for lam in profile["lambdas"]]]:
        expected += [f"runs/{run}/checkpoints/latest", f"runs/{run}/metrics.jsonl"]
    for name in ["base", "teacher-math", "teacher-code", "teacher-strong", "expo"]:
        expected += [f"eval/{name}-s{seed}.json" for seed in profile["seeds"]]
    missing = [path for path in expected if not (out / path).exists()]
    assert not missing, missing
    # the strong teacher: larger than the student, from another init, GRPO on both domains
    shapes = {name: json.loads((out / "models" / name / "config.json").read_text()) for name in ("base", "teacher-strong")}
    assert shapes["teacher-strong"]["hidden_size"] == profile["strong"]["model"]["hidden_size"]
    assert shapes["teacher-strong"]["num_hidden_layers"] > shapes["base"]["num_hidden_layers"]
    steps = [json.loads(line) for line in (out / "runs" / "teacher-strong" / "metrics.jsonl").read_text().splitlines()]
    assert any("grpo/math/reward" in m for m in steps) and any("grpo/code/reward" in m for m in steps)
    # the G-OPD runs used dedicated ranks: 1 student + 2 teachers + 1 rollout engine
    config = yaml.safe_load((out / "runs" / f"gopd-lam1-s{profile['seeds'][0]}" / "config.yaml").read_text())
    assert [t["placement"] for t in config["teachers"]] == ["dedicated", "dedicated"]
    assert (config["rollout"]["placement"], config["rollout"]["engines"]) == ("dedicated", 1)


@pytest.mark.parametrize("ranks, nproc, teachers, rollout", [
    (1, 1, "colocated", "colocated"), (2, 1, "colocated", "colocated"), (3, 3, "dedicated", "colocated"),
    (4, 4, "dedicated", "dedicated"), (6, 4, "dedicated", "dedicated")])
def test_ranks_per_run_places_the_teachers_then_the_rollout_engine_on_ranks_of_their_own(
        ranks, nproc, teachers, rollout, tmp_path):
    from examples.toy.pipeline import PROFILES, Pipeline

    for run in ("pretrain", "teacher-math", "teacher-code", "pretrain-strong", "teacher-strong"):
        (tmp_path / "runs" / run / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / run / "checkpoints" / "latest").write_text("iter_2")
    gopd, sft = Pipeline(tmp_path, PROFILES["quick"], jobs=2, ranks_per_run=ranks).distill_jobs()
    sweep = [job for job in gopd if job.name.startswith("gopd-")]
    assert {job.nproc for job in sweep} == {nproc} and {job.nproc for job in sft} == {1}
    config = yaml.safe_load((tmp_path / "runs" / sweep[0].name / "pipeline.yaml").read_text())
    assert [t["placement"] for t in config["teachers"]] == [teachers, teachers]
    assert config["rollout"]["placement"] == rollout and config["rollout"]["engines"] == 1
    assert sweep[0].cmd[sweep[0].cmd.index("--standalone") + 1] == f"--nproc_per_node={nproc}"
    # the strong-to-weak arm: one teacher for both domains, so it takes a dedicated rank from 2 ranks per run
    strong = [job for job in gopd if job.name.startswith("s2w-")]
    assert len(strong) == 2 * len(PROFILES["quick"].seeds)
    config = yaml.safe_load((tmp_path / "runs" / strong[0].name / "pipeline.yaml").read_text())
    assert [(t["name"], t["domains"]) for t in config["teachers"]] == [("strong", ["math", "code"])]
    assert config["teachers"][0]["placement"] == ("dedicated" if ranks >= 2 else "colocated")
    assert {job.nproc for job in strong} == {min(ranks, 3) if ranks >= 2 else 1}


def test_the_strong_to_weak_arm_differs_in_its_reference_only(tmp_path):
    """Reward correction: the same strong teacher and lambda, the reference is the student's init or the strong
    teacher's own base; both runs start from the student's base."""
    from examples.toy.pipeline import PROFILES, Pipeline

    for run in ("pretrain", "teacher-math", "teacher-code", "pretrain-strong", "teacher-strong"):
        (tmp_path / "runs" / run / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / run / "checkpoints" / "latest").write_text("iter_2")
    Pipeline(tmp_path, PROFILES["quick"], jobs=2, ranks_per_run=1).distill_jobs()
    init, corrected = (yaml.safe_load((tmp_path / "runs" / f"{name}-s1" / "pipeline.yaml").read_text())
                       for name in ("s2w-ref-init", "s2w-ref-teacher-base"))
    assert init["reference"]["path"] == str(tmp_path / "runs" / "pretrain" / "checkpoints" / "iter_2")
    assert corrected["reference"]["path"] == str(tmp_path / "runs" / "pretrain-strong" / "checkpoints" / "iter_2")
    assert init["student"]["path"] == corrected["student"]["path"] == init["reference"]["path"]
    assert init["algo"]["lam"] == PROFILES["quick"].strong.lam
    init["reference"], corrected["reference"] = {}, {}
    init["train"]["output_dir"] = corrected["train"]["output_dir"] = ""
    assert init == corrected


def test_the_report_is_computed_from_the_runs(toy_run):
    out, _ = toy_run
    profile = json.loads((out / "profile.json").read_text())
    seeds = profile["seeds"]
    table = json.loads((out / "results.json").read_text())["table"]
    n = profile["eval_n"]
    base = [json.loads((out / "eval" / f"base-s{seed}.json").read_text())["metrics"] for seed in seeds]
    assert table["base"][f"math avg@{n}"] == [100 * m[f"math/avg@{n}"] for m in base]
    last = [json.loads((out / "runs" / f"gopd-lam1.25-s{seed}" / "metrics.jsonl").read_text().splitlines()[-1])
            for seed in seeds]
    assert table["ExOPD (lambda=1.25)"][f"code avg@{n}"] == [100 * m[f"eval/code/avg@{n}"] for m in last]
    assert table["ExOPD (lambda=1.25)"]["code length"] == [m["eval/code/response_length"] for m in last]
    assert "| ExOPD (lambda=1.25) |" in (out / "report.md").read_text()


def test_the_reports_claims_are_paired_differences_of_the_raw_evaluations(toy_run):
    """ExOPD - OPD and ExOPD - teacher per domain, seed by seed, from the runs' last evaluation and the teachers'
    evaluation files. The quick profile's one seed gives no interval (tests/test_toy_report.py checks the
    t-intervals over seeds on evaluation files with known numbers)."""
    out, _ = toy_run
    profile = json.loads((out / "profile.json").read_text())
    results = json.loads((out / "results.json").read_text())
    n = profile["eval_n"]

    def final_eval(run: str, seed: int) -> dict:
        return json.loads((out / "runs" / f"{run}-s{seed}" / "metrics.jsonl").read_text().splitlines()[-1])

    exopd_opd, exopd_teacher = results["claims"][0]["numbers"], results["claims"][1]["numbers"]["exopd_minus_teacher"]
    for d in ("math", "code"):
        exopd = [100 * final_eval("gopd-lam1.25", seed)[f"eval/{d}/avg@{n}"] for seed in profile["seeds"]]
        opd = [100 * final_eval("gopd-lam1", seed)[f"eval/{d}/avg@{n}"] for seed in profile["seeds"]]
        teacher = [100 * json.loads((out / "eval" / f"teacher-{d}-s{seed}.json").read_text())["metrics"][f"{d}/avg@{n}"]
                   for seed in profile["seeds"]]
        diffs = [a - b for a, b in zip(exopd, opd)]
        assert exopd_opd[d]["values"] == pytest.approx(diffs, abs=1e-9)
        assert exopd_opd[d]["mean"] == pytest.approx(diffs[0], abs=1e-9) and exopd_opd[d]["low"] is None
        assert exopd_teacher[d]["values"] == pytest.approx([a - b for a, b in zip(exopd, teacher)], abs=1e-9)
    # claim 5: reward correction minus the student's init as the reference, on the strong-to-weak runs
    correction = results["claims"][4]["numbers"]
    for d in ("math", "code"):
        diffs = [100 * (final_eval("s2w-ref-teacher-base", seed)[f"eval/{d}/avg@{n}"]
                        - final_eval("s2w-ref-init", seed)[f"eval/{d}/avg@{n}"]) for seed in profile["seeds"]]
        assert correction[d]["values"] == pytest.approx(diffs, abs=1e-9)
    # OPD's plateau check reads its two evaluations (steps 1 and 2)
    assert results["plateau"]["steps"] == [1, 2]
    text = (out / "report.md").read_text()
    assert all(f"**{claim['verdict']}**: {claim['claim']}" in text for claim in results["claims"])


def test_each_teacher_trained_on_its_own_domain_and_each_sample_reached_its_teacher(toy_run):
    out, _ = toy_run
    from safetensors.torch import load_file

    def weights(model: str) -> dict:
        return {k: v for f in sorted((out / "models" / model).glob("*.safetensors")) for k, v in load_file(f).items()}

    base = weights("base")
    for domain, other in (("math", "code"), ("code", "math")):
        steps = [json.loads(line) for line in (out / "runs" / f"teacher-{domain}" / "metrics.jsonl").read_text()
                 .splitlines()]
        assert all(f"grpo/{domain}/reward" in m and f"grpo/{other}/reward" not in m for m in steps)
        teacher = weights(f"teacher-{domain}")
        assert teacher.keys() == base.keys() and any(not teacher[k].equal(base[k]) for k in base)  # GRPO moved it
    profile = json.loads((out / "profile.json").read_text())
    for lam in profile["lambdas"]:
        run = out / "runs" / f"gopd-lam{lam:g}-s1"
        config = yaml.safe_load((run / "config.yaml").read_text())
        rows = config["data"]["prompts_per_step"] * config["rollout"]["samples_per_prompt"]
        steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(steps) == profile["distill_steps"]
        for m in steps:  # every sample scored by exactly one teacher, and both domains in each step
            assert m["teacher/math/samples"] > 0 and m["teacher/code/samples"] > 0
            assert m["teacher/math/samples"] + m["teacher/code/samples"] == rows


def test_a_rerun_finds_every_stage_cached(toy_run):
    _, cmd = toy_run
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("cached") == 6, proc.stdout
