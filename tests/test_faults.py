"""Issue 11: the fault suite. Each case kills, hangs, corrupts or poisons something in a real torchrun job and
asserts what was lost: nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import ROOT, run_torchrun
from tests.runs import launch, metrics, minimal_config, write_run

DEDICATED = [  # world 3: the student on rank 0, a dedicated math teacher on rank 1, code on rank 2
    {"name": "math", "domains": ["math"], "placement": "dedicated"},
    {"name": "code", "domains": ["code"], "placement": "dedicated"},
]


def dedicated_run(tmp_path, ckpts, **overrides):
    teachers = [dict(t, path=str(ckpts / t["name"])) for t in DEDICATED]
    return write_run(tmp_path, ckpts, teachers=teachers, faults={"exchange_timeout_s": 20}, **overrides)


def worker(proc: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "megatron_gopd.train" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            pass
    raise LookupError(rank)


def wait_for_step(run_dir: Path, step: int, proc, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len((run_dir / "metrics.jsonl").read_text().splitlines()) > step:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run never reached step {step}")


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    done = launch(dedicated_run(root, tiny_checkpoints, train__steps=4), nproc=3)
    assert done.returncode == 0, done.stderr[-3000:]
    return metrics(root / "run")


@pytest.mark.parametrize("fault", ["sigkill", "hang"])
def test_dead_or_hung_teacher_stops_the_job_and_resume_loses_nothing(fault, uninterrupted, tiny_checkpoints, tmp_path):
    config = dedicated_run(tmp_path / "faulty", tiny_checkpoints, train__steps=4)
    run_dir = tmp_path / "faulty" / "run"
    proc = launch(config, nproc=3, wait=False)
    wait_for_step(run_dir, 2, proc)  # steps 0 (eval) .. 2 logged; checkpoints every step
    teacher, student = worker(proc, 1), worker(proc, 0)
    teacher.send_signal(signal.SIGKILL if fault == "sigkill" else signal.SIGSTOP)
    started = time.time()
    student.wait(timeout=20 + 30)  # the student stops within the exchange timeout plus 30 s...
    student_exit = time.time() - started
    if fault == "hang":  # a stopped process sits out torchrun's 30 s SIGTERM grace until its SIGKILL: end it now
        teacher.kill()
    output, _ = proc.communicate(timeout=60)  # ...and torchrun then tears the job down
    assert proc.returncode != 0
    if fault == "sigkill":  # a dead peer's closed connection is seen at once, long before the 20 s timeout
        assert student_exit < 20, student_exit
    else:  # a hung one is caught by the timeout
        assert student_exit < 20 + 30, student_exit
    # either way, one error names the role, its ranks and the step
    assert "frozen model 'math' (ranks 1-1) did not answer student replica 0 within 20s at step" in output
    for p in psutil.Process().children(recursive=True):  # nothing of the job is left behind
        assert "megatron_gopd.train" not in " ".join(p.cmdline())

    latest = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    assert latest >= 1  # the kill may land while step 2 is being saved
    resumed = launch(config, "--resume", "auto", nproc=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = metrics(run_dir), uninterrupted
    for step in range(latest + 1, 5):
        assert got[step] == want[step], step  # the remaining steps are exactly those of the uninterrupted run


def poisoned_math_teacher(tiny_checkpoints, tmp_path) -> list[dict]:
    """The teachers' config with a math teacher whose embedding of token t249 is NaN: any sequence holding t249
    gets NaN teacher log-probs."""
    poisoned = tmp_path / "poisoned-hf"
    subprocess.run(["cp", "-r", str(tiny_checkpoints / "hf" / "math"), str(poisoned)], check=True)
    weights = load_file(poisoned / "model.safetensors")
    weights["model.embed_tokens.weight"][249] = float("nan")  # any sequence holding token t249 scores NaN
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(poisoned), "--save-dir",
                    str(tmp_path / "poisoned")], check=True, cwd=ROOT, capture_output=True)
    return [{"name": "math", "path": str(tmp_path / "poisoned"), "domains": ["math"]},
            {"name": "code", "path": str(tiny_checkpoints / "code"), "domains": ["code"]}]


def test_nan_in_one_teacher_response_drops_exactly_that_sample(tiny_checkpoints, tmp_path):
    teachers = poisoned_math_teacher(tiny_checkpoints, tmp_path)
    # top_k=1: the student never samples t249 itself, so the only NaN sample is the poisoned prompt's
    config = write_run(tmp_path, tiny_checkpoints, train__steps=2, data__prompts_per_step=8, rollout__top_k=1,
                       teachers=teachers)
    data = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    rows = rows[:8]  # one step's worth, each prompt once
    rows[1] = {"prompt": "t249 t17 t18", "domain": "math", "answer": "t5"}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = launch(config)
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(tmp_path / "run")
    for step in (1, 2):  # every step holds all 8 prompts, so the poisoned one each time
        assert m[step]["faults/dropped_samples"] == 1
        assert m[step]["loss"] is not None and m[step]["grad_norm"] > 0


def test_too_many_nan_samples_skip_the_step_and_repeated_skips_stop_the_run_across_a_resume(tiny_checkpoints,
                                                                                            tmp_path):
    teachers = poisoned_math_teacher(tiny_checkpoints, tmp_path)
    config = write_run(tmp_path, tiny_checkpoints, train__steps=1, data__prompts_per_step=8, rollout__top_k=1,
                       eval__interval=0, teachers=teachers,
                       faults={"max_bad_sample_fraction": 0.5, "max_consecutive_skips": 1})
    data = tmp_path / "prompts.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()][:8]  # one step's worth, each prompt once
    for i in range(5):  # 5 of 8 samples NaN: 62.5% > max_bad_sample_fraction
        rows[i] = {"prompt": f"t249 t{17 + i} t18", "domain": "math", "answer": "t5"}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = launch(config)  # step 1 is skipped (1 in a row: allowed) and checkpointed
    assert first.returncode == 0, first.stderr[-3000:]
    m = metrics(tmp_path / "run")
    assert m[1]["faults/skipped_step"] == 1.0 and m[1]["faults/dropped_samples"] == 5
    assert m[1].get("grad_norm") is None  # no update was made
    # The count of skips in a row is part of the training state: after the resume, step 2 is the second skip in a
    # row, over max_consecutive_skips=1 (were it reset, step 2 would pass and step 3 would stop the run).
    result = launch(config, "--resume", "auto", "train.steps=4")
    assert result.returncode != 0
    assert "2 consecutive steps were skipped (last: 62% of the samples had NaN/inf log-probs); stopping" in result.stderr
    assert sorted(metrics(tmp_path / "run")) == [1]  # the run stopped at step 2, before logging it


def test_nan_gradients_on_one_rank_skip_the_update_on_every_rank(tmp_path):
    """TrainableModel.train_step at DP=2 with a NaN loss on rank 1 only (tests/dist/nan_gradients.py)."""
    result = run_torchrun("nan_gradients.py", 2, tmp_path=tmp_path)
    for rank in result["ranks"]:
        good, poisoned, again = rank["steps"]
        assert good == again == {"update_ok": True, "changed": True, "scheduler_advanced": 1,
                                 "grad_norm_finite": True}, rank
        assert poisoned == {"update_ok": False, "changed": False, "scheduler_advanced": 0,
                            "grad_norm_finite": False}, rank


def test_non_finite_gradients_are_counted_as_skipped_steps_and_too_many_in_a_row_stop_the_run(tmp_path,
                                                                                                monkeypatch):
    """Trainer.update in-process, over a stand-in student whose optimizer step reports non-finite gradients (that
    every rank agrees to skip: the test above): the step's metrics are exactly {"faults/skipped_step": 1.0}, the
    count of skips in a row grows and a good update resets it, and the skip after faults.max_consecutive_skips (2)
    in a row stops the run."""
    import torch

    from megatron_gopd import trainer
    from megatron_gopd.config import load_config

    monkeypatch.setattr(trainer, "_sum_over", lambda value, group: float(value))  # one DP rank
    finite = iter([False, False, True, False, False, False])

    class Student:
        def train_step(self, micro_batches, loss_fn, temperature):
            ok = next(finite)
            return {"loss": 0.5}, {"update_ok": ok, "grad_norm": 1.0 if ok else float("nan"), "lr": 1e-3}

    log = []
    t = trainer.Trainer.__new__(trainer.Trainer)
    t.cfg = load_config(minimal_config(tmp_path), ["faults.max_consecutive_skips=2"])
    t.s = SimpleNamespace(student=Student(), logger=SimpleNamespace(write=log.append), dp=None)
    t.state, t.old_logprobs = trainer.TrainerState(), "train_forward"
    batch = trainer.StepBatch(items=[], samples=[], plan=None,
                              micro_batches=[{"loss_mask": torch.ones(1, 4), "row_ids": torch.zeros(1, 4).long()}])
    got = [(t.update(batch), t.state.consecutive_skips) for _ in range(5)]
    assert got == [({"faults/skipped_step": 1.0}, 1), ({"faults/skipped_step": 1.0}, 2),
                   ({"loss": 0.5, "grad_norm": 1.0, "lr": 1e-3}, 0),
                   ({"faults/skipped_step": 1.0}, 1), ({"faults/skipped_step": 1.0}, 2)]
    with pytest.raises(RuntimeError, match=r"^3 consecutive steps were skipped \(last: the gradients were not "
                                           r"finite\); stopping"):
        t.update(batch)
    assert log[:2] == ["skipping the update: the gradients were not finite (1 in a row)",
                       "skipping the update: the gradients were not finite (2 in a row)"]


def test_malformed_dataset_rows_are_counted_by_kind(tiny_checkpoints, tmp_path):
    config = write_run(tmp_path, tiny_checkpoints, train__steps=1, eval__interval=0)
    data = tmp_path / "prompts.jsonl"
    good = data.read_text()
    bad = [
        "{not json",
        json.dumps({"domain": "math"}),  # no prompt
        json.dumps({"prompt": "   ", "domain": "math"}),  # empty prompt
        json.dumps({"prompt": 42, "domain": "math"}),  # wrong type
        json.dumps({"prompt": "t5 t6"}),  # no domain
        json.dumps({"prompt": " ".join(["t9"] * 40), "domain": "code"}),  # over max_prompt_len (32)
    ]
    data.write_text(good + "\n".join(bad) + "\n")
    result = launch(config)
    assert result.returncode == 0, result.stderr[-3000:]
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["data/prompts"] == 48 and first["data/dropped"] == 6
    for reason in ("invalid_json", "missing_prompt", "empty_prompt", "bad_prompt_type", "missing_domain", "too_long"):
        assert first[f"data/dropped/{reason}"] == 1, reason
    log = result.stdout + result.stderr
    assert f"{data}:49" in log  # the first bad row, reported with its file and line (tests/test_data.py: the rest)


def test_sigterm_finishes_the_step_checkpoints_and_the_resume_loses_nothing(uninterrupted, tiny_checkpoints,
                                                                            tmp_path):
    config = dedicated_run(tmp_path, tiny_checkpoints, train__steps=4, checkpoint__interval=100)
    run_dir = tmp_path / "run"
    proc = launch(config, nproc=3, wait=False)
    wait_for_step(run_dir, 2, proc)
    for child in psutil.Process(proc.pid).children(recursive=True):  # as a scheduler's preemption would
        if "megatron_gopd.train" in " ".join(child.cmdline()):
            child.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    logged = max(metrics(run_dir))
    assert logged in (2, 3)  # the step under way when the signal came is the last
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{logged:08d}"
    resumed = launch(config, "--resume", "auto", nproc=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = metrics(run_dir)
    for step in range(logged + 1, 5):
        assert got[step] == uninterrupted[step], step


def test_a_hung_student_rank_ends_the_job_within_the_exchange_timeout(tiny_checkpoints, tmp_path):
    """The student at TP=2: rank 0 (its replica's leader, which runs the rollout engine) stops. Rank 1 then waits in
    the replica's rollout broadcast or weight sync, which run under faults.exchange_timeout_s like every exchange,
    and ends the job instead of hanging."""
    config = write_run(tmp_path, tiny_checkpoints, train__steps=40, eval__interval=0, faults={"exchange_timeout_s": 10},
                       student={"path": str(tiny_checkpoints / "student"), "parallel": {"tp": 2}})
    proc = launch(config, nproc=2, wait=False)
    wait_for_step(tmp_path / "run", 1, proc)
    leader, other = worker(proc, 0), worker(proc, 1)
    leader.send_signal(signal.SIGSTOP)
    started = time.time()
    other.wait(timeout=10 + 30)
    waited = time.time() - started
    leader.kill()
    try:  # torchrun's own teardown (SIGTERM, then a grace period) is slow on a loaded machine
        output, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        left = [(p.pid, p.name(), " ".join(p.cmdline())[:120]) for p in psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"torchrun still running 120 s after its ranks ended; its processes: {left}") from None
    assert proc.returncode != 0 and waited < 10 + 30, waited
    assert "Timed out" in output or "timed out" in output, output[-3000:]


def test_a_data_file_changed_since_the_checkpoint_is_named_and_the_run_goes_on(tiny_checkpoints, tmp_path):
    config = write_run(tmp_path, tiny_checkpoints, train__steps=1, eval__interval=0)
    assert launch(config).returncode == 0
    data = tmp_path / "prompts.jsonl"
    data.write_text(data.read_text() + json.dumps({"prompt": "t5 t6 t7", "domain": "math"}) + "\n")
    resumed = launch(config, "--resume", "auto", "train.steps=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"data file {data} changed (" in resumed.stderr and "since the checkpoint; each step draws its batch from "
            "the 49 prompts as they are now (48 then)" in resumed.stderr), resumed.stderr[-3000:]
    assert sorted(metrics(tmp_path / "run")) == [1, 2]
