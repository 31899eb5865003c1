"""Run logging on rank 0: a progress bar (step, phase, ETA), tensorboard scalars, metrics.jsonl, optional wandb."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import psutil
import torch
from tqdm import tqdm


class RunLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool, total_steps: int, tensorboard: bool = True,
                 wandb: bool = False, wandb_project: str = "megatron-gopd", progress: bool = True,
                 config: dict | None = None):
        """`config`: the run's resolved config, for Weights & Biases."""
        self.enabled = enabled
        self.phase_seconds: dict[str, float] = {}
        self._clock = (time.perf_counter(), time.process_time())  # where the step being logged began
        self._tb = self._wandb = self._bar = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        if wandb:
            import wandb as wandb_module

            self._wandb = wandb_module.init(project=wandb_project, dir=str(run_dir), config=config, resume="allow")
        if progress:
            self._bar = tqdm(total=total_steps, desc="train", dynamic_ncols=True)

    def start(self, step: int) -> None:
        """The run begins (or resumes) at `step`: the progress bar and the step clock start from there."""
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()
        self._clock = (time.perf_counter(), time.process_time())

    @contextlib.contextmanager
    def phase(self, name: str):
        """Times a phase of the step; the progress bar shows which one is running."""
        if self._bar is not None:
            self._bar.set_description(f"train [{name}]")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] = self.phase_seconds.get(name, 0.0) + time.perf_counter() - start

    def log(self, step: int, metrics: dict[str, float], *, advance: bool = True,
            tokens: dict[str, float] | None = None) -> None:
        """Adds the step's phase times, throughput and memory, then writes everything (rank 0 only); `tokens`
        maps a phase to the tokens it processed (-> throughput/<phase>_tokens_per_s); `advance` moves the
        progress bar (not for the evaluation before the first step)."""
        metrics = dict(metrics)
        metrics.update({f"time/{k}_s": v for k, v in self.phase_seconds.items()})
        wall, cpu = time.perf_counter(), time.process_time()
        if advance:  # the whole step, phases and everything between them; CPU seconds of this process's threads
            metrics["time/step_s"], metrics["time/step_cpu_s"] = wall - self._clock[0], cpu - self._clock[1]
        self._clock = (wall, cpu)
        for phase, count in (tokens or {}).items():
            seconds = self.phase_seconds.get(phase, 0.0)
            if count > 0 and seconds > 0:
                metrics[f"throughput/{phase}_tokens_per_s"] = count / seconds
        metrics["memory/rss_gb"] = psutil.Process(os.getpid()).memory_info().rss / 2**30
        if torch.cuda.is_available():
            metrics["memory/gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.phase_seconds = {}
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(clean, step=step)
        if self._bar is not None:
            shown = {k.split("/")[-1]: f"{clean[k]:.4g}" for k in ("gopd/advantage", "gopd/kl_teacher", "loss", "eval/mean/avg@n") if k in clean}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(int(advance))

    def write(self, message: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(message)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._jsonl.close()
