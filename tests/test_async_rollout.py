"""Issue 23: rollout engines on ranks of their own, and one-step-off-policy training that overlaps generation with
the update."""

import signal
import time

from tests.runs import launch, metrics, write_run
from tests.test_faults import wait_for_step, worker

DEDICATED = {"placement": "dedicated", "engines": 1, "max_new_tokens": 12}


def test_a_dedicated_engine_at_staleness_0_is_the_colocated_rollout_exactly(tiny_checkpoints, tmp_path):
    """The same two steps and evaluation from the student's own engine (world 2: DP=2) and from one engine on a
    rank of its own serving both replicas (world 3): the weights reach it bit-exact and it samples with the same
    seeds, so every metric is equal, bit for bit."""
    runs = {}
    for name, nproc, rollout in (("colocated", 2, {"max_new_tokens": 12}), ("dedicated", 3, DEDICATED)):
        done = launch(write_run(tmp_path / name, tiny_checkpoints, train__steps=2, rollout=rollout), nproc=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = metrics(tmp_path / name / "run")
    assert sorted(runs["dedicated"]) == [0, 1, 2] and "eval/math/avg@2" in runs["dedicated"][2]
    for step in (0, 1, 2):
        assert runs["dedicated"][step] == runs["colocated"][step], step
    assert runs["dedicated"][2]["rollout/staleness"] == 0


def test_one_step_off_policy_runs_ahead_resumes_exactly_and_tags_each_sample(tiny_checkpoints, tmp_path):
    """rollout.max_staleness=1: step k+1's samples are drawn while step k trains, with the weights before its
    update (staleness 1), except after a step that writes a checkpoint, when nothing is in flight: so the samples of
    steps 1-4 are 0, 1, 0, 1 updates old (checkpoints every 2 steps), and 2 + 2 steps equal 4, bit for bit."""
    rollout = dict(DEDICATED, max_staleness=1)
    straight = write_run(tmp_path / "straight", tiny_checkpoints, train__steps=4, rollout=rollout,
                         checkpoint={"interval": 2, "keep_last": 2}, eval__interval=0)
    done = launch(straight, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    want = metrics(tmp_path / "straight" / "run")
    assert [want[step]["rollout/staleness"] for step in (1, 2, 3, 4)] == [0, 1, 0, 1]
    halves = write_run(tmp_path / "halves", tiny_checkpoints, train__steps=2, rollout=rollout,
                       checkpoint={"interval": 2, "keep_last": 2}, eval__interval=0)
    assert launch(halves, nproc=2).returncode == 0
    resumed = launch(halves, "--resume", "auto", "train.steps=4", nproc=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = metrics(tmp_path / "halves" / "run")
    for step in (3, 4):
        assert got[step] == want[step], step


def test_a_dead_rollout_engine_ends_the_job_naming_it_and_the_resume_loses_nothing(tiny_checkpoints, tmp_path):
    config = write_run(tmp_path, tiny_checkpoints, train__steps=6, eval__interval=0, rollout=DEDICATED,
                       faults={"exchange_timeout_s": 20})
    run_dir = tmp_path / "run"
    proc = launch(config, nproc=3, wait=False)
    wait_for_step(run_dir, 2, proc)
    worker(proc, 2).send_signal(signal.SIGKILL)  # the engine's rank
    started = time.time()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - started < 20 + 30
    assert "rollout engine (ranks 2-2) did not answer student replica" in output, output[-3000:]
    latest = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    assert latest >= 1
    resumed = launch(config, "--resume", "auto", nproc=3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the steps after the checkpoint are those of an uninterrupted run (colocated: the same samples, see above)
    straight = write_run(tmp_path / "straight", tiny_checkpoints, train__steps=6, eval__interval=0,
                         rollout={"max_new_tokens": 12})
    assert launch(straight, nproc=2).returncode == 0
    want, got = metrics(tmp_path / "straight" / "run"), metrics(run_dir)
    for step in range(latest + 1, 7):
        assert got[step] == want[step], step
