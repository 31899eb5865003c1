"""Chunked vocab-parallel log-prob + entropy vs the naive `log_softmax(...).gather`, both measured in this run.

Each case (tokens x vocab, dtype) runs in two modes: forward-only under no_grad (the teacher / old-log-prob use) and
forward + backward (the training use). The naive method is `log_softmax(logits, dtype=float32)`, then gather and
-(p * log p).sum() for the entropy. Temperature is 1.0 (the paper's), which spares the naive method a scaled copy.

Memory: each (case, mode, method) runs once in a FRESH subprocess, so that no measurement inherits another's heap.
Its peak is the resident-set high-water mark (Linux VmHWM) during the op minus the resident set just before it; the
high-water mark is reset through /proc/self/clear_refs right before the op, which keeps the transients of imports
and input building out of the number. RSS sees every allocation (torch's CPU allocator and glibc alike), which
tracemalloc does not.
Time: one subprocess per case alternates the two methods (swapping which goes first) and keeps each method's best
of N repetitions (N = 2 with --quick, else 3), so that a shared, noisy machine slows both alike.

Targets: chunked peak <= 0.5 x naive peak, chunked time <= 1.2 x naive time.

    python bench/bench_logprobs.py [--size smoke|quick|full]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH,
    by_size,
    cli,
    md_table,
    proc_status_kib,
    reset_peak_rss,
    run_script,
    verdict,
)

SMOKE_CASES = [(256, 2048, "float32")]
QUICK_CASES = [(8192, 32768, "float32")]
# 152k at 2k tokens: 8k x 152k (5 GB of fp32 logits) would take the naive method past this machine's RAM.
FULL_CASES = QUICK_CASES + [(8192, 32768, "bfloat16"), (2048, 152064, "float32"), (2048, 152064, "bfloat16")]
MODES = ("fwd", "fwd+bwd")
METHODS = ("naive", "chunked")
MEMORY_TARGET, TIME_TARGET = 0.5, 1.2


def _setup(tokens: int, vocab: int, dtype_name: str):
    """Inputs, filled in slabs so that building them leaves no transient larger than a slab; and the two ops."""
    import torch

    from megatron_gopd.algo.logprobs import token_logprobs_and_entropy

    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(tokens, vocab, dtype=getattr(torch, dtype_name))
    for lo in range(0, tokens, 64):
        logits[lo : lo + 64] = torch.randn(min(64, tokens - lo), vocab, generator=gen) * 2
    logits = logits.view(1, tokens, vocab)
    targets = torch.randint(0, vocab, (1, tokens), generator=gen)
    g_lp, g_h = torch.randn(1, tokens, generator=gen), torch.randn(1, tokens, generator=gen)

    def naive():
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    def chunked():
        return token_logprobs_and_entropy(logits, targets, vocab_size=vocab)

    def run_once(method: str, mode: str) -> float:
        backward = mode == "fwd+bwd"
        logits.requires_grad_(backward)
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            lp, ent = (naive if method == "naive" else chunked)()
            if backward:
                ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
        seconds = time.perf_counter() - start
        logits.grad = None
        return seconds

    return logits, run_once


def _memory_worker(tokens: int, vocab: int, dtype: str, mode: str, method: str) -> dict:
    logits, run_once = _setup(tokens, vocab, dtype)
    baseline = reset_peak_rss()
    run_once(method, mode)
    return {"peak_extra_mib": (proc_status_kib("VmHWM") - baseline) / 1024,
            "logits_mib": logits.numel() * logits.element_size() / 2**20}


def _time_worker(tokens: int, vocab: int, dtype: str, reps: int) -> dict:
    _, run_once = _setup(tokens, vocab, dtype)
    best = {}
    for rep in range(reps):
        for mode in MODES:
            for method in METHODS if rep % 2 == 0 else METHODS[::-1]:
                seconds = run_once(method, mode)
                best[f"{method} {mode}"] = min(best.get(f"{method} {mode}", seconds), seconds)
    return best


def _worker(kind: str, tokens: str, vocab: str, dtype: str, *rest: str) -> dict:
    """kind "memory" (rest: mode, method) or "time" (rest: repetitions)."""
    if kind == "memory":
        return _memory_worker(int(tokens), int(vocab), dtype, *rest)
    return _time_worker(int(tokens), int(vocab), dtype, int(rest[0]))


def _subprocess(*args) -> dict:
    return run_script(BENCH / "bench_logprobs.py", "--worker", *map(str, args))


def run(size: str) -> list[dict]:
    """One row per (case, mode): both methods' peak extra memory and time, their ratios and whether targets hold."""
    rows = []
    for tokens, vocab, dtype in by_size(size, smoke=SMOKE_CASES, quick=QUICK_CASES, full=FULL_CASES):
        times = _subprocess("time", tokens, vocab, dtype, by_size(size, smoke=1, quick=2, full=3))
        for mode in MODES:
            mem = {method: _subprocess("memory", tokens, vocab, dtype, mode, method) for method in METHODS}
            mem_ratio = mem["chunked"]["peak_extra_mib"] / mem["naive"]["peak_extra_mib"]
            time_ratio = times[f"chunked {mode}"] / times[f"naive {mode}"]
            rows.append({
                "tokens": tokens, "vocab": vocab, "dtype": dtype, "mode": mode,
                "logits_mib": mem["naive"]["logits_mib"],
                "naive_peak_mib": mem["naive"]["peak_extra_mib"], "chunked_peak_mib": mem["chunked"]["peak_extra_mib"],
                "naive_s": times[f"naive {mode}"], "chunked_s": times[f"chunked {mode}"],
                "mem_ratio": mem_ratio, "time_ratio": time_ratio,
                "meets_targets": mem_ratio <= MEMORY_TARGET and time_ratio <= TIME_TARGET,
            })
    return rows


def to_markdown(rows: list[dict]) -> str:
    table = md_table(
        ["tokens x vocab", "dtype", "mode", "logits MiB", "naive peak MiB", "chunked peak MiB", "mem ratio", "naive s",
         "chunked s", "time ratio", "targets"],
        [[f"{r['tokens']} x {r['vocab']}", r["dtype"], r["mode"], f"{r['logits_mib']:.0f}",
          f"{r['naive_peak_mib']:.0f}", f"{r['chunked_peak_mib']:.0f}", f"{r['mem_ratio']:.2f}", f"{r['naive_s']:.2f}",
          f"{r['chunked_s']:.2f}", f"{r['time_ratio']:.2f}", verdict(r["meets_targets"])] for r in rows])
    return (f"Log-prob + entropy kernel, chunked vocab-parallel against the naive log_softmax().gather. Peak = the "
            f"RSS high-water mark during the op above the RSS before it, a fresh process per figure; time = the best "
            f"of interleaved runs. Targets: peak <= {MEMORY_TARGET}x naive, time <= {TIME_TARGET}x naive.\n\n{table}")


if __name__ == "__main__":
    cli(__doc__, _worker, lambda size: to_markdown(run(size)))
