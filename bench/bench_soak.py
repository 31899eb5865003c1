"""Soak: a long G-OPD run of a tiny configuration, watched for leaks.

`torchrun -m megatron_gopd.train` at world 2: the student on rank 0 with a colocated teacher ("code"), a dedicated
teacher ("math") on rank 1, the transformers rollout engine, tensorboard, evaluation and checkpoints on intervals
with `checkpoint.keep_last`. A thread of this process samples, every SAMPLE_S seconds, each worker's resident
memory (VmRSS), threads and open file descriptors (/proc/<pid>/status and /proc/<pid>/fd of torchrun's children),
the checkpoint directory's size and its number of checkpoints, and the step the run is at (metrics.jsonl's lines).
The trainer is not changed to be measured.

Growth is measured after a warm-up (the first WARMUP of the steps: allocator pools, lazily built caches): the median
over the last TAIL of the steps against the median over the TAIL of the steps just after the warm-up, per rank; the
worst rank is reported. Targets: RSS growth <= RSS_TARGET, descriptors and threads flat (no growth), at most
`keep_last` checkpoints once a save is committed (keep_last + 1 while the newest is renamed into place and before
the oldest is removed).

    python bench/bench_soak.py [--size smoke|quick|full]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    ROOT,
    THREADS,
    by_size,
    checkpoints,
    cli,
    describe,
    linear_fit,
    md_table,
    verdict,
    worker_env,
)

RSS_TARGET = 0.05
WARMUP, TAIL = 0.2, 0.1
SAMPLE_S = 0.25
PROMPTS_PER_STEP, NEW_TOKENS = 4, 16


def _settings(size: str) -> dict:
    # a tiny step takes ~0.1-0.3 s on 2 shared cores: quick ~1-2 minutes, full ~3-5
    return by_size(size, smoke={"steps": 6, "interval": 2, "keep_last": 2, "eval": 3},
                   quick={"steps": 400, "interval": 10, "keep_last": 2, "eval": 100},
                   full={"steps": 1000, "interval": 10, "keep_last": 2, "eval": 100})


def _config(tmp: Path, settings: dict) -> Path:
    import yaml

    root = checkpoints()
    rows = [{"prompt": " ".join(f"t{(i * 7 + j * 13) % 240 + 5}" for j in range(3 + i % 5)),
             "domain": "math" if i % 2 else "code", "answer": "t5"} for i in range(48)]
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "student": {"path": str(root / "student")},
        "teachers": [{"name": "math", "path": str(root / "teacher"), "domains": ["math"], "placement": "dedicated"},
                     {"name": "code", "path": str(root / "teacher"), "domains": ["code"]}],
        "algo": {"lam": 1.25},
        "rollout": {"max_new_tokens": NEW_TOKENS},
        "data": {"train": [str(data)], "eval": [str(data)], "prompts_per_step": PROMPTS_PER_STEP,
                 "max_prompt_len": 32},
        "train": {"steps": settings["steps"], "micro_batch_size": 2, "output_dir": str(tmp / "run")},
        "optim": {"lr": 1e-4},
        "checkpoint": {"interval": settings["interval"], "keep_last": settings["keep_last"]},
        "eval": {"interval": settings["eval"], "at_start": False, "n": 1, "max_prompts": 8},
        "log": {"progress": False},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---- the sampler ------------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def _rank(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(v[5:]) for v in env if v.startswith(b"RANK=")), None)


def _process(pid: int) -> dict:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "threads": int(status["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _checkpoints(root: Path) -> dict:
    """Committed checkpoints (step_N; a save in flight is .tmp-step_N) and the bytes of everything under root."""
    size, count = 0, 0
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            count = sum(name.startswith("step_") for name in dirnames)
        for name in filenames:
            try:
                size += os.stat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:  # removed by a save's clean-up meanwhile
                pass
    return {"checkpoints": count, "checkpoint_mib": size / 2**20}


class Sampler(threading.Thread):
    """Samples torchrun's worker processes and the run's directory until stopped."""

    def __init__(self, torchrun_pid: int, run_dir: Path):
        super().__init__(daemon=True)
        self.pid, self.run_dir, self.samples, self.ranks = torchrun_pid, run_dir, [], {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE_S):
            try:
                for pid in _children(self.pid):
                    if pid not in self.ranks.values():
                        rank = _rank(pid)
                        if rank is not None:
                            self.ranks[rank] = pid
                metrics = self.run_dir / "metrics.jsonl"
                step = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
                sample = {"t": time.monotonic(), "step": step,
                          "ranks": {rank: _process(pid) for rank, pid in self.ranks.items()},
                          **_checkpoints(self.run_dir / "checkpoints")}
            except (FileNotFoundError, ProcessLookupError, KeyError):  # a process that just ended (a zombie has no VmRSS)
                continue
            self.samples.append(sample)


# ---- the run ----------------------------------------------------------------------------------------------------
def run(size: str) -> dict:
    settings = _settings(size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = _config(tmp, settings)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "megatron_gopd.train", "--config", str(config)]
        start = time.monotonic()
        proc = subprocess.Popen(cmd, env=worker_env(THREADS), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        sampler = Sampler(proc.pid, tmp / "run")
        sampler.start()
        output = proc.communicate(timeout=3600)[0]
        sampler.done.set()
        sampler.join()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-6000:]}")
        wall = time.monotonic() - start
        steps = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        final = _checkpoints(tmp / "run" / "checkpoints")
    return summarise(sampler.samples, settings, steps, final, wall)


KEYS = ("rss_mib", "threads", "fds")


def _rank_summary(samples: list[dict], rank: int, warm: int, tail: int, steps: int) -> dict:
    """One worker after the warm-up and before the last step's save and the shutdown: medians over the first and
    the last `tail` steps (the nearest sample where a window caught none: a smoke run's steps are fast), maxima,
    growth and the RSS slope."""
    measured = [s["ranks"][rank] | {"step": s["step"]} for s in samples
                if rank in s["ranks"] and warm <= s["step"] < steps]
    after = [m for m in measured if m["step"] < warm + tail] or measured[:1]
    last = [m for m in measured if m["step"] >= steps - tail] or measured[-1:]
    fit = linear_fit([m["step"] for m in measured], [m["rss_mib"] for m in measured])
    out = {"rss_mib_per_100_steps": fit["slope"] * 100}
    for key in KEYS:
        out[f"{key}_after_warmup"] = statistics.median(m[key] for m in after)
        out[f"{key}_end"] = statistics.median(m[key] for m in last)
        out[f"{key}_max"] = max(m[key] for m in measured)
        out[f"{key.removesuffix('_mib')}_growth"] = out[f"{key}_end"] / out[f"{key}_after_warmup"] - 1
    return out


def summarise(samples: list[dict], settings: dict, steps: list[dict], final: dict, wall: float) -> dict:
    n = settings["steps"]
    warm, tail = max(1, round(n * WARMUP)), max(1, round(n * TAIL))
    ranks = sorted({rank for s in samples for rank in s["ranks"]})
    per_rank = {rank: _rank_summary(samples, rank, warm, tail, n) for rank in ranks}
    growth = {key: max(r[f"{key}_growth"] for r in per_rank.values()) for key in ("rss", "threads", "fds")}
    checkpoint_max = max(s["checkpoints"] for s in samples)
    result = {
        "settings": settings, "steps_run": len(steps), "wall_s": wall, "samples": len(samples),
        "warmup_steps": warm, "window_steps": tail, "ranks": per_rank,
        "rss_growth": growth["rss"], "fd_growth": growth["fds"], "threads_growth": growth["threads"],
        "checkpoints_max": checkpoint_max, "checkpoints_end": final["checkpoints"],
        "checkpoint_mib_max": max(s["checkpoint_mib"] for s in samples), "checkpoint_mib_end": final["checkpoint_mib"],
        "series": [{"step": s["step"], "checkpoints": s["checkpoints"], "checkpoint_mib": round(s["checkpoint_mib"], 3),
                    **{f"{k}_{rank}": v for rank, p in s["ranks"].items() for k, v in p.items()}}
                   for s in samples[:: max(1, len(samples) // 400)]],  # thinned for results.json
    }
    keep = settings["keep_last"]
    result["meets_target"] = (result["steps_run"] == n and growth["rss"] <= RSS_TARGET and growth["fds"] <= 0
                              and growth["threads"] <= 0 and checkpoint_max <= keep + 1
                              and final["checkpoints"] == keep)
    return result


def headline_rows(result: dict) -> list[list]:
    keep = result["settings"]["keep_last"]
    return [[(f"12. soak, {result['steps_run']} G-OPD steps (world 2, dedicated + colocated teacher), after "
              f"{WARMUP:.0%} warm-up"),
             (f"RSS {result['rss_growth']:+.1%}, fds {result['fd_growth']:+.0%}, threads "
              f"{result['threads_growth']:+.0%}; checkpoints max {result['checkpoints_max']}, end "
              f"{result['checkpoints_end']} (keep_last {keep})"),
             f"RSS <= +{RSS_TARGET:.0%}, fds and threads flat, checkpoints <= keep_last", verdict(result["meets_target"])]]


def notes(result: dict) -> str:
    return (f"**Soak**: RSS {result['rss_growth']:+.1%} (target <= +{RSS_TARGET:.0%}), descriptors "
            f"{result['fd_growth']:+.0%}, threads {result['threads_growth']:+.0%}, checkpoints at most "
            f"{result['checkpoints_max']} (keep_last {result['settings']['keep_last']}): see section 11's table for "
            "the rank that grew.")


def to_markdown(result: dict) -> str:
    s = result["settings"]
    rows = [[rank, f"{r['rss_mib_after_warmup']:.0f}", f"{r['rss_mib_end']:.0f}", f"{r['rss_growth']:+.2%}",
             f"{r['rss_mib_per_100_steps']:+.2f}", f"{r['rss_mib_max']:.0f}",
             f"{r['fds_after_warmup']:.0f} / {r['fds_end']:.0f} / {r['fds_max']}",
             f"{r['threads_after_warmup']:.0f} / {r['threads_end']:.0f} / {r['threads_max']}"]
            for rank, r in result["ranks"].items()]
    table = md_table(["rank", "RSS MiB after warm-up", "RSS MiB at the end", "RSS growth", "RSS slope MiB / 100 steps",
                      "RSS MiB max", "fds after warm-up / end / max", "threads after warm-up / end / max"], rows)
    return (f"`torchrun -m megatron_gopd.train`, world 2: rank 0 the student ({describe('tiny')}) with a colocated "
            f"teacher, rank 1 a dedicated teacher (the same size); G-OPD (lambda 1.25), {PROMPTS_PER_STEP} prompts x "
            f"{NEW_TOKENS} new tokens per step, {s['steps']} steps in {result['wall_s']:.0f} s, a checkpoint every "
            f"{s['interval']} steps (keep_last {s['keep_last']}), evaluation every {s['eval']}, tensorboard on. "
            f"{result['samples']} samples of each worker (every {SAMPLE_S} s); growth = the median over the last "
            f"{result['window_steps']} steps against the median over the {result['window_steps']} steps after a "
            f"{result['warmup_steps']}-step warm-up; the slope is a least-squares line through every sample after "
            f"the warm-up.\n\n{table}\n\nCheckpoints: at most {result['checkpoints_max']} committed at once "
            f"({s['keep_last']} at the end; one more while a save is committed and before the oldest is removed), "
            f"the directory at most {result['checkpoint_mib_max']:.2f} MiB ({result['checkpoint_mib_end']:.2f} MiB "
            "at the end).")


if __name__ == "__main__":
    cli(__doc__, None, lambda size: to_markdown(run(size)))
