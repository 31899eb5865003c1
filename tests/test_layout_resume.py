"""Resuming a training checkpoint at another layout (issue 24 part 3): written at TP=1 PP=1 DP=2 with
`checkpoint.fully_reshardable`, resumed at DP=1, TP=2 and PP=2; a checkpoint whose optimizer format cannot follow
the change is refused before the first step, naming what changed.

The rollout seeds are per (step, DP replica), so with another DP size the samples are fresh draws from the same
policy. These runs sample with top_k = 1, so that the samples are the same at every layout and the losses must
continue exactly: what carries over is then the weights, the Adam state, the LR schedule and the data position.
"""

from pathlib import Path

import pytest

from megatron_gopd import checkpoint
from tests.runs import close, launch, metrics, write_run

SETTINGS = {"rollout": {"max_new_tokens": 12, "top_k": 1}, "eval": {"interval": 0},
            "checkpoint": {"interval": 2, "keep_last": 2, "fully_reshardable": True}}
# name -> (ranks, overrides, what the resumed run's warning says changed). The TP=2 run writes its own checkpoint in
# the default format (each rank's flat optimizer shard, which reshards over DP only), for the refusal below.
RESUMES = {"dp2->dp1": (1, [], "dp changed (dp=2 -> dp=1)"),
           "tp1->tp2": (2, ["student.parallel.tp=2", "checkpoint.fully_reshardable=false"],
                        "tp and dp changed (tp=1 dp=2 -> tp=2 dp=1)"),
           "pp1->pp2": (2, ["student.parallel.pp=2"], "pp and dp changed (pp=1 dp=2 -> pp=2 dp=1)")}


def run_config(tmp: Path, ckpts: Path, steps: int = 4) -> Path:
    return write_run(tmp, ckpts, **SETTINGS, train={"steps": steps, "micro_batch_size": 2,
                                                    "output_dir": str(tmp / "run")})


@pytest.fixture(scope="module")
def runs(tiny_checkpoints, tmp_path_factory) -> dict:
    """name -> (run directory, output): 4 steps at TP=1 PP=1 DP=2 (world 2), checkpointed after steps 2 and 4
    ("uninterrupted"), and each of RESUMES from its step 2."""
    tmp = tmp_path_factory.mktemp("layout")
    proc = launch(run_config(tmp / "uninterrupted", tiny_checkpoints))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {"uninterrupted": (tmp / "uninterrupted" / "run", "")}
    step2 = tmp / "uninterrupted" / "run" / "checkpoints" / "step_00000002"
    for name, (nproc, overrides, _) in RESUMES.items():
        proc = launch(run_config(tmp / name, tiny_checkpoints), "--resume", str(step2), *overrides, nproc=nproc)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        out[name] = (tmp / name / "run", proc.stdout + proc.stderr)
    return out


@pytest.mark.parametrize("change", RESUMES)
def test_resume_at_another_layout_continues_the_losses(change, runs):
    run, output = runs[change]
    assert "resumed from step 2" in output
    assert f"step_00000002 with {RESUMES[change][2]}: the weights and the optimizer" in output
    expected, got = metrics(runs["uninterrupted"][0]), metrics(run)
    assert sorted(got) == [3, 4]
    for step in (3, 4):  # every metric: loss, grad norm, lr, the G-OPD terms, the teachers' rewards, ...
        assert close(expected[step], got[step], rel=1e-5) == [], (change, step)
    assert expected[4]["loss"] != expected[3]["loss"]


def test_a_checkpoint_that_cannot_reshard_fails_before_the_first_step(runs, tiny_checkpoints, tmp_path):
    """Back to TP=1 from the TP=2 run's step 4, written in the default format: refused before any step."""
    refused = launch(run_config(tmp_path, tiny_checkpoints, steps=5), "--resume",
                     str(runs["tp1->tp2"][0] / "checkpoints"))
    assert refused.returncode != 0
    assert ("step_00000004: it was written at tp=2 pp=1 dp=1, this run is tp=1 pp=1 dp=2; tp changed, and its "
            "optimizer state (dp_reshardable) reshards over dp only. Resume at tp=2; write the checkpoints with "
            "checkpoint.fully_reshardable=true to change tp or pp") in refused.stdout + refused.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or metrics(tmp_path / "run") == {}


def _meta(fmt: str | None = None, moe: bool = False, **parallel) -> dict:
    meta = {"parallel": {"tp": 1, "pp": 1, "dp": 2, "ep": 1, "etp": 1, **parallel},
            "architecture": {"num_moe_experts": 4 if moe else None}}
    return meta | ({"optimizer_format": fmt} if fmt else {})


def _now(**parallel) -> dict:
    return {"tp": 1, "pp": 1, "dp": 2, "ep": 1, "etp": 1, **parallel}


def test_the_layout_rules():
    where = Path("run/checkpoints/step_00000002")
    assert checkpoint.check_layout(_meta(), _now(), where) == []
    # a checkpoint from before the field existed holds dp_reshardable optimizer state: DP may change, TP and PP not
    assert checkpoint.check_layout(_meta(), _now(dp=1), where) == ["dp"]
    with pytest.raises(ValueError, match=r"tp=1 pp=1 dp=2, this run is tp=1 pp=2 dp=1; pp changed"):
        checkpoint.check_layout(_meta(), _now(pp=2, dp=1), where)
    assert checkpoint.check_layout(_meta("fully_reshardable"), _now(tp=2, etp=2, dp=1), where) == ["tp", "dp"]
    # a dense model's etp follows its tp and is not compared; a mixture of experts keeps ep and etp
    with pytest.raises(ValueError, match=r"ep changed, and its optimizer state \(fully_reshardable\) reshards over "
                                         r"tp and pp and dp only. Resume at ep=2, or start a new run"):
        checkpoint.check_layout(_meta("fully_reshardable", moe=True, ep=2), _now(), where)
