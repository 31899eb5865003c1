"""Chunked vocab-parallel log-prob + entropy vs the naive `log_softmax(...).gather`, both measured in this run.

For each case (tokens x vocab, dtype) and mode (forward-only under no_grad, the teacher/old-log-prob use; and
forward + backward, the training use), each method runs in a FRESH subprocess, so that one measurement cannot
inherit another's heap. Peak memory is the resident-set high-water mark (Linux VmHWM) during the op minus the
resident set just before it, after the high-water mark was reset through /proc/self/clear_refs: RSS sees every
allocation (torch's CPU allocator and glibc alike), which tracemalloc does not, and the reset keeps the transients
of imports and input building out of the number. Time is the median of 3 repetitions (1 with --quick).
Temperature is 1.0 (the paper's), which spares the naive method a scaled copy of the logits.

Targets: chunked peak <= 0.5 x naive peak, chunked time <= 1.2 x naive time.

    python bench/bench_logprobs.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK_CASES = [(8192, 32768, "float32")]
# 152k at 2k tokens: 8k x 152k (5 GB of fp32 logits) would take the naive method past this machine's RAM.
FULL_CASES = QUICK_CASES + [(8192, 32768, "bfloat16"), (2048, 152064, "float32"), (2048, 152064, "bfloat16")]
MODES = ("fwd", "fwd+bwd")
METHODS = ("naive", "chunked")
MEMORY_TARGET, TIME_TARGET = 0.5, 1.2


def _worker(tokens: int, vocab: int, dtype_name: str, mode: str, method: str, reps: int) -> dict:
    import torch

    from megatron_gopd.algo import token_logprobs_and_entropy

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(0)
    logits = torch.empty(tokens, vocab, dtype=dtype)
    for lo in range(0, tokens, 256):
        logits[lo : lo + 256] = torch.randn(min(256, tokens - lo), vocab, generator=gen) * 2
    logits = logits.view(1, tokens, vocab)
    targets = torch.randint(0, vocab, (1, tokens), generator=gen)
    g_lp, g_h = torch.randn(1, tokens, generator=gen), torch.randn(1, tokens, generator=gen)
    backward = mode == "fwd+bwd"
    logits.requires_grad_(backward)

    def naive():
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
        return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    def chunked():
        return token_logprobs_and_entropy(logits, targets, vocab_size=vocab)

    fn = naive if method == "naive" else chunked
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    baseline = _proc_status_kib("VmRSS")
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        with torch.set_grad_enabled(backward):
            lp, ent = fn()
            if backward:
                ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
        times.append(time.perf_counter() - start)
        del lp, ent
        logits.grad = None
    peak = _proc_status_kib("VmHWM")
    return {"peak_extra_mib": (peak - baseline) / 1024, "seconds": statistics.median(times),
            "logits_mib": logits.numel() * logits.element_size() / 2**20}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _measure(tokens: int, vocab: int, dtype: str, mode: str, method: str, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(tokens), str(vocab), dtype, mode, method, str(reps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(quick: bool) -> list[dict]:
    """One row per (case, mode): both methods' peak extra memory and time, their ratios and whether targets hold."""
    rows = []
    for tokens, vocab, dtype in QUICK_CASES if quick else FULL_CASES:
        for mode in MODES:
            m = {method: _measure(tokens, vocab, dtype, mode, method, reps=1 if quick else 3) for method in METHODS}
            mem_ratio = m["chunked"]["peak_extra_mib"] / m["naive"]["peak_extra_mib"]
            time_ratio = m["chunked"]["seconds"] / m["naive"]["seconds"]
            rows.append({
                "tokens": tokens, "vocab": vocab, "dtype": dtype, "mode": mode,
                "logits_mib": m["naive"]["logits_mib"],
                "naive_peak_mib": m["naive"]["peak_extra_mib"], "chunked_peak_mib": m["chunked"]["peak_extra_mib"],
                "naive_s": m["naive"]["seconds"], "chunked_s": m["chunked"]["seconds"],
                "mem_ratio": mem_ratio, "time_ratio": time_ratio,
                "meets_targets": mem_ratio <= MEMORY_TARGET and time_ratio <= TIME_TARGET,
            })
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| tokens x vocab | dtype | mode | logits MiB | naive peak MiB | chunked peak MiB | mem ratio | naive s "
        "| chunked s | time ratio | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']} x {r['vocab']} | {r['dtype']} | {r['mode']} | {r['logits_mib']:.0f} "
            f"| {r['naive_peak_mib']:.0f} | {r['chunked_peak_mib']:.0f} | {r['mem_ratio']:.2f} | {r['naive_s']:.2f} "
            f"| {r['chunked_s']:.2f} | {r['time_ratio']:.2f} | {'ok' if r['meets_targets'] else 'MISSED'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8k x 32k fp32 only (about a minute on 2 cores)")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        tokens, vocab, dtype, mode, method, reps = args.worker
        print(json.dumps(_worker(int(tokens), int(vocab), dtype, mode, method, int(reps))))
        return
    print(f"peak = RSS high-water above the RSS before the op, fresh process per measurement; targets: memory <= "
          f"{MEMORY_TARGET} x naive, time <= {TIME_TARGET} x naive")
    print(to_markdown(run(args.quick)))


if __name__ == "__main__":
    main()
