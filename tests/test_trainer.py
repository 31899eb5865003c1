"""The trainer under torchrun: logs and checkpoints, exact resume (auto, from a directory, never), a half-written
save left by a crash, the reference it is given, the full-vocabulary loss, the student at PP=2, and configs that are
rejected before training."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.runs import close, launch, metrics, swapped_tokenizer_copy, write_run


@pytest.fixture(scope="module")
def straight(tiny_checkpoints, tmp_path_factory):
    """The default run for 4 steps: world 2 (the student at DP=2), both teachers and the reference (the student's
    initial weights) colocated, lam = 1.25. Returns (its directory, its metrics)."""
    root = tmp_path_factory.mktemp("straight")
    done = launch(write_run(root, tiny_checkpoints, train__steps=4))
    assert done.returncode == 0, done.stderr[-3000:]
    return root, metrics(root / "run")


def test_run_writes_logs_and_checkpoints(straight):
    root, m = straight
    run = root / "run"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]
    assert sorted(m) == [0, 1, 2, 3, 4]  # step 0: the evaluation before training
    for step in (1, 2, 3, 4):
        assert m[step]["teacher/math/samples"] + m[step]["teacher/code/samples"] == 4
        assert m[step]["loss"] is not None and abs(m[step]["mismatch/abs_mean"]) < 1e-4 and m[step]["grad_norm"] > 0
        # responses cut at max_new_tokens=12 are counted (a random tiny model rarely stops on its own)
        assert 0 < m[step]["rollout/truncated_frac"] <= 1 and 0 < m[step]["rollout/response_length"] <= 12
    assert "eval/math/avg@2" in m[2]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for line in logged[1:]:  # tokens/s per phase, next to the phase times and the whole step's
        assert line["throughput/rollout_tokens_per_s"] > 0 and line["throughput/update_tokens_per_s"] > 0
        assert line["time/rollout_s"] > 0 and line["time/update_s"] > 0
        assert line["time/step_s"] >= line["time/rollout_s"] + line["time/update_s"]


def test_the_latest_pointer_converts_to_a_clean_hf_checkpoint(straight, tmp_path):
    """README: tools/convert_megatron_to_hf.py takes a training run's `latest` pointer: it converts the checkpoint
    the pointer names (step 4: the same tensors as from that directory, other than step 3's, which is kept too),
    and transformers loads the result with no missing or unexpected keys."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    checkpoints = straight[0] / "run" / "checkpoints"
    converted = {}
    for load in ("latest", "step_00000004", "step_00000003"):
        done = subprocess.run([sys.executable, "tools/convert_megatron_to_hf.py", "--load-dir", str(checkpoints / load),
                               "--save-dir", str(tmp_path / load)], capture_output=True, text=True, cwd=ROOT,
                              timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr[-3000:]
        converted[load] = {k: v for f in (tmp_path / load).glob("*.safetensors") for k, v in load_file(f).items()}
    latest, step4, step3 = converted.values()
    assert sorted(latest) == sorted(step4) and all(latest[k].equal(step4[k]) for k in step4)
    assert not all(latest[k].equal(step3[k]) for k in step3)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "latest", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_resume_is_exact_from_latest_from_a_directory_and_never(straight, tiny_checkpoints, tmp_path):
    _, want = straight
    # the same run in two halves: 2 steps, stop, resume, 2 more
    halves = write_run(tmp_path / "halves", tiny_checkpoints, train__steps=2)
    assert launch(halves).returncode == 0
    resumed = launch(halves, "--resume", "auto", "train.steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = metrics(tmp_path / "halves" / "run")
    for step in (3, 4):
        assert got[step] == want[step], step  # same samples, same losses, bit for bit

    # --resume DIR: a checkpoint of that run, continued in a new output directory
    step3 = tmp_path / "halves" / "run" / "checkpoints" / "step_00000003"
    elsewhere = write_run(tmp_path / "elsewhere", tiny_checkpoints, train__steps=4)
    resumed = launch(elsewhere, "--resume", str(step3))
    assert resumed.returncode == 0 and "resumed from step 3" in resumed.stdout + resumed.stderr
    assert metrics(tmp_path / "elsewhere" / "run")[4] == want[4]

    # --resume never: starts over from the student's initial weights, although checkpoints exist
    fresh = launch(halves, "--resume", "never", "train.steps=1")
    assert fresh.returncode == 0 and "resumed" not in fresh.stdout + fresh.stderr
    assert metrics(tmp_path / "halves" / "run")[1] == want[1]


def test_a_save_cut_short_by_a_crash_is_ignored_and_cleared(tiny_checkpoints, tmp_path):
    """What a SIGKILL in the middle of a save leaves (tests/test_checkpoint.py kills a real save at its commit): a
    .tmp-step_N directory with some files and no manifest, `latest` naming N-1. A resumed run takes N-1 and the
    next save removes the leftover."""
    config = write_run(tmp_path, tiny_checkpoints, train__steps=2, eval__interval=0)
    assert launch(config).returncode == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    partial = checkpoints / ".tmp-step_00000003"
    shutil.copytree(checkpoints / "step_00000002", partial)
    (partial / "MANIFEST.json").unlink()
    resumed = launch(config, "--resume", "auto", "train.steps=3")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000002", "step_00000003"]


def test_the_reference_is_the_model_the_config_names(straight, tiny_checkpoints, tmp_path):
    """At step 1 pi_old is the student's initial model, so with the default reference (that same model)
    kl_ref = E[log pi_old - log pi_ref] is 0 and the reward E[log pi_T - log pi_ref] is -kl_teacher, exactly; with
    the teacher's base as a dedicated reference ("reward correction") the same samples give a reward that differs by
    exactly its kl_ref."""
    _, default = straight
    config = write_run(tmp_path, tiny_checkpoints, train__steps=1, eval__interval=0,
                       reference={"path": str(tiny_checkpoints / "base"), "placement": "dedicated"})
    done = launch(config, nproc=3)  # the student's 2 ranks, then the reference's
    assert done.returncode == 0, done.stderr[-3000:]
    corrected, init = metrics(tmp_path / "run")[1], default[1]
    assert abs(init["gopd/kl_ref"]) < 1e-6
    assert abs(init["gopd/reward"] + init["gopd/kl_teacher"]) < 1e-6
    assert corrected["gopd/kl_teacher"] == pytest.approx(init["gopd/kl_teacher"], abs=1e-6)  # the same samples
    assert abs(corrected["gopd/kl_ref"]) > 1e-3  # another model
    assert corrected["gopd/reward"] - init["gopd/reward"] == pytest.approx(corrected["gopd/kl_ref"], abs=1e-5)


def test_student_at_pp2_trains_like_one_process_and_lam_1_never_runs_the_reference(tiny_checkpoints, tmp_path):
    """The student and its colocated teachers split over 2 pipeline stages (1F1B), with rows of very different
    lengths under a token budget, packed, take the same steps as one process with plain micro-batches: the
    stages exchange each micro-batch's shape, and packing changes no number. At lam = 1 the reference (the
    student's init) cancels, so it is never placed or run: a dedicated reference in the config takes no rank, and
    no reference metric exists."""
    runs = {}
    for name, nproc, pp in (("single", 1, 1), ("pp2", 2, 2)):
        # pp2: the step's 4 rows (at most 32 + 12 tokens each) packed into one sequence under the budget
        layout = {"train__max_tokens_per_micro_batch": 192, "train__micro_batch_size": 4,
                  "train__pack_sequences": True} if pp == 2 else {}
        config = write_run(tmp_path / name, tiny_checkpoints, train__steps=2, eval__interval=0, algo={"lam": 1.0},
                           reference={"placement": "dedicated"},
                           student={"path": str(tiny_checkpoints / "student"), "parallel": {"pp": pp}}, **layout)
        rows = [{"prompt": " ".join(f"t{5 + (i * 11 + j) % 240}" for j in range(1 + (i * 7) % 28)),
                 "domain": "math" if i % 2 else "code"} for i in range(16)]  # prompts of 2 to 31 tokens
        (tmp_path / name / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        done = launch(config, nproc=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = metrics(tmp_path / name / "run")
    for step in (1, 2):
        assert not close(runs["single"][step], runs["pp2"][step], rel=1e-5,
                         ignore=("batching/",)), step  # only the micro-batch count differs
        assert (runs["pp2"][step]["batching/micro_batches"], runs["single"][step]["batching/micro_batches"]) == (1, 2)
        assert "gopd/kl_ref" not in runs["single"][step] and "gopd/reward" not in runs["single"][step]


@pytest.mark.parametrize("teachers", ["student_copies", "real"])
def test_full_vocab_loss_is_the_kl_to_the_gopd_target_at_tp2(teachers, tiny_checkpoints, tmp_path):
    """algo.loss=full_vocab: the exact KL(pi || softmax(lam z_T + (1 - lam) z_ref)) over the whole vocabulary, from
    the colocated teachers' logits on the student's own TP shards. With teachers that are the student itself, the
    target is the student (lam z + (1 - lam) z = z): the KL and its gradient are 0. With real teachers both are not."""
    student = str(tiny_checkpoints / "student")
    crew = [{"name": d, "path": student if teachers == "student_copies" else str(tiny_checkpoints / d),
             "domains": [d]} for d in ("math", "code")]
    config = write_run(tmp_path, tiny_checkpoints, train__steps=1, eval__interval=0, teachers=crew,
                       student={"path": student, "parallel": {"tp": 2}})
    result = launch(config, "algo.loss=full_vocab")
    assert result.returncode == 0, result.stderr[-3000:]
    step = metrics(tmp_path / "run")[1]
    if teachers == "student_copies":
        assert abs(step["actor/full_vocab_kl"]) < 1e-6 and step["grad_norm"] < 1e-6, step
    else:
        assert step["actor/full_vocab_kl"] > 1e-2 and step["grad_norm"] > 1e-3, step


def test_bad_config_fails_before_training_with_one_line(tiny_checkpoints, tmp_path):
    config = write_run(tmp_path, tiny_checkpoints)
    result = subprocess.run([sys.executable, "-m", "megatron_gopd.train", "--config", str(config), "algo.lamda=2"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "config error: algo.lamda: unknown config key; did you mean 'lam'?"
    assert not (tmp_path / "run").exists()  # nothing ran


def test_world_size_is_checked_against_the_roles(tiny_checkpoints, tmp_path):
    config = write_run(tmp_path, tiny_checkpoints, teachers=[
        {"name": "math", "path": str(tiny_checkpoints / "math"), "domains": ["math"], "placement": "dedicated"},
        {"name": "code", "path": str(tiny_checkpoints / "code"), "domains": ["code"], "placement": "dedicated"}])
    result = subprocess.run([sys.executable, "-m", "megatron_gopd.train", "--config", str(config)],
                            capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2"})
    assert result.returncode != 0
    assert "config error: student.parallel: world size 2 minus 2 dedicated" in result.stderr


def test_a_teacher_with_another_tokenizer_stops_the_trainer_before_step_1(tiny_checkpoints, tmp_path):
    other = swapped_tokenizer_copy(tiny_checkpoints / "math", tmp_path / "other-math")
    config = write_run(tmp_path, tiny_checkpoints, teachers=[
        {"name": "math", "path": str(other), "domains": ["math"]},
        {"name": "code", "path": str(tiny_checkpoints / "code"), "domains": ["code"]}])
    result = launch(config, nproc=1)
    assert result.returncode != 0
    assert "tokenizer mismatch: math" in result.stderr and "student" in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tolerance", [("fp32", 1e-3), ("bf16", 5e-2)])
def test_trains_and_resumes_on_one_gpu(dtype, tolerance, request, tmp_path):
    """The whole trainer on one CUDA device (NCCL + gloo): the student, the colocated teachers and the reference
    in `dtype`, the rollout engine on the GPU. The engine's log-probs must match the student's (mismatch) to
    `tolerance` (fp32: the same function; bf16: two implementations' rounding), and a resumed run goes on."""
    ckpts = request.getfixturevalue("tiny_checkpoints" if dtype == "fp32" else "tiny_checkpoints_bf16")
    teachers = [{"name": name, "path": str(ckpts / name), "domains": [name], "dtype": dtype}
                for name in ("math", "code")]
    config = write_run(tmp_path, ckpts, train__steps=2, student__dtype=dtype, reference={"dtype": dtype},
                       teachers=teachers)
    done = launch(config, nproc=1)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    m = metrics(run)
    assert sorted(m) == [0, 1, 2] and "eval/math/avg@2" in m[2]
    for step in (1, 2):
        assert m[step]["loss"] is not None and math.isfinite(m[step]["loss"]), m[step]
        assert m[step]["grad_norm"] > 0, m[step]
        assert abs(m[step]["mismatch/abs_mean"]) < tolerance, m[step]
        assert m[step]["teacher/math/samples"] + m[step]["teacher/code/samples"] == 4

    resumed = launch(config, "--resume", "auto", "train.steps=3", nproc=1)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 2" in resumed.stdout + resumed.stderr
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    last = metrics(run)[3]
    assert math.isfinite(last["loss"]) and last["grad_norm"] > 0 and abs(last["mismatch/abs_mean"]) < tolerance
