"""Issue 7: the trainer under torchrun. A run writes its logs and checkpoints, resumes exactly, survives a SIGKILL
in the middle of a checkpoint save, and rejects bad configs before training."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import ROOT

VOLATILE = ("time/", "throughput/", "memory/", "data/")  # per process, not per step


def write_run(tmp_path: Path, ckpts: Path, **overrides) -> Path:
    """A 2-domain prompt set over the tiny tokenizer, and a config with two colocated teachers."""
    rows = []
    for i in range(48):
        words = " ".join(f"t{(i * 7 + j * 13) % 240 + 5}" for j in range(3 + i % 5))
        rows.append({"prompt": words, "domain": "math" if i % 2 else "code", "answer": "t5"})
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "student": {"path": str(ckpts / "student")},
        "teachers": [{"name": "math", "path": str(ckpts / "math"), "domains": ["math"]},
                     {"name": "code", "path": str(ckpts / "code"), "domains": ["code"]}],
        "algo": {"lam": 1.25},
        "rollout": {"max_new_tokens": 12},
        "data": {"train": [str(data)], "eval": [str(data)], "prompts_per_step": 4, "max_prompt_len": 32},
        "train": {"steps": 3, "micro_batch_size": 2, "output_dir": str(tmp_path / "run")},
        "optim": {"lr": 1e-3},
        "checkpoint": {"interval": 1, "keep_last": 2},
        "eval": {"interval": 2, "n": 2, "max_prompts": 6},
        "log": {"progress": False},
    }
    for key, value in overrides.items():
        if "__" in key:
            section, name = key.split("__")
            config[section][name] = value
        else:
            config[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(config: Path, *args: str, nproc: int = 2, wait: bool = True, timeout: float = 600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_gopd.train", "--config", str(config), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def metrics(run_dir: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: {k: v for k, v in m.items() if not k.startswith(VOLATILE)} for m in lines}


def test_run_writes_logs_and_checkpoints_then_resumes_exactly(tiny_checkpoints, tmp_path):
    full = write_run(tmp_path / "full", tiny_checkpoints, train__steps=4)
    done = launch(full)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "full" / "run"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000004"]
    straight = metrics(run)
    assert sorted(straight) == [0, 1, 2, 3, 4]  # step 0: the evaluation before training
    for step in (1, 2, 3, 4):
        m = straight[step]
        assert m["teacher/math/samples"] + m["teacher/code/samples"] == 4
        assert m["loss"] is not None and abs(m["mismatch/abs_mean"]) < 1e-4 and m["grad_norm"] > 0
        # responses cut at max_new_tokens=12 are counted (a random tiny model rarely stops on its own)
        assert 0 < m["rollout/truncated_frac"] <= 1 and 0 < m["rollout/response_length"] <= 12
    assert "eval/math/avg@2" in straight[2]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for m in logged[1:]:  # tokens/s per phase, next to the phase times
        assert m["throughput/rollout_tokens_per_s"] > 0 and m["throughput/update_tokens_per_s"] > 0
        assert m["time/rollout_s"] > 0 and m["time/update_s"] > 0

    # the same run in two halves: 2 steps, stop, resume, 2 more
    halves = write_run(tmp_path / "halves", tiny_checkpoints, train__steps=2)
    assert launch(halves).returncode == 0
    resumed = launch(halves, "--resume", "auto", "train.steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    second = metrics(tmp_path / "halves" / "run")
    for step in (3, 4):
        assert second[step] == straight[step], step  # same samples, same losses, bit for bit


def test_sigkill_during_a_checkpoint_save_keeps_the_previous_one(tiny_checkpoints, tmp_path):
    config = write_run(tmp_path, tiny_checkpoints, train__steps=40)
    checkpoints = tmp_path / "run" / "checkpoints"
    proc = launch(config, wait=False)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            saving = [p for p in checkpoints.glob(".tmp-step_*")] if checkpoints.exists() else []
            if saving and int(saving[0].name.split("_")[-1]) >= 3:
                # torchrun and every worker, at once (the workers sit in process groups of their own)
                family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
                for p in family:
                    p.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        proc.wait(timeout=60)
    partial = list(checkpoints.glob(".tmp-step_*"))
    assert partial, "the kill did not land during a save"
    killed_at = int(partial[0].name.split("_")[-1])
    assert (checkpoints / "latest").read_text().strip() == f"step_{killed_at - 1:08d}"

    resumed = launch(config, "--resume", "auto", f"train.steps={killed_at + 1}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {killed_at - 1}" in resumed.stdout + resumed.stderr
    assert (checkpoints / "latest").read_text().strip() == f"step_{killed_at + 1:08d}"


@pytest.mark.parametrize("override, key", [
    ("algo.lam=0", "algo.lam"),
    ("algo.lamda=1.25", "algo.lamda"),
    ("student.path=/nonexistent", "student.path"),
    ("student.parallel.tp=3", "student.parallel"),
    ("data.train=[/nonexistent.jsonl]", "data.train"),
    ("optim.warmup_steps=1000", "optim.warmup_steps"),
])
def test_bad_config_is_rejected_naming_the_key(override, key, tiny_checkpoints, tmp_path):
    from megatron_gopd.config import ConfigError, load_config

    with pytest.raises(ConfigError) as error:
        load_config(write_run(tmp_path, tiny_checkpoints), [override], world_size=2)
    assert str(error.value).startswith(f"{key}: ") and "\n" not in str(error.value)


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


def test_full_vocab_loss_trains_at_tp2(tiny_checkpoints, tmp_path):
    config = write_run(tmp_path, tiny_checkpoints, train__steps=2, eval__interval=0,
                       student={"path": str(tiny_checkpoints / "student"), "parallel": {"tp": 2}})
    result = launch(config, "algo.loss=full_vocab")
    assert result.returncode == 0, result.stderr[-3000:]
    m = metrics(tmp_path / "run")
    # the exact KL to softmax(lam z_T + (1 - lam) z_ref) is positive and falls as the student moves toward it
    assert 0 < m[2]["actor/full_vocab_kl"] < m[1]["actor/full_vocab_kl"]
    assert m[1]["grad_norm"] > 0


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
