"""The performance suite: every speed claim is a ratio measured side by side in this one run.

    python bench/run.py [--quick] [--gpu] [--only logprobs rollout ...]

Writes bench/results.json (every number, with the machine and the date) and bench/RESULTS.md (the tables), and
prints the same markdown. Sections:
  logprobs   1. chunked vocab-parallel log-prob/entropy kernel against log_softmax().gather (bench_logprobs.py)
  rollout    2. our rollout engine against transformers.generate, and the weight-sync cost (bench_rollout.py)
  opd        3. end-to-end OPD step against TRL's DistillationTrainer (bench_opd_vs_trl.py)
  teachers   4. teacher compute with 1, 2, 4 domain teachers, routed against all-score (bench_teachers.py)
  overlap    5. streaming teacher service against the same work serialised (bench_teachers.py, world 2)
  growth     6. step time and peak memory against the response length (bench_growth.py)
  gpu        7. with --gpu: train-step MFU at ~1.3B, TE/FP8 when installed, rollout tok/s, sync GB/s
             (bench/dist/gpu_suite.py); skipped with a message when CUDA is absent.
--quick keeps the CPU suite well under 10 minutes on 2 cores; the full mode repeats more and adds sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_growth, bench_logprobs, bench_opd_vs_trl, bench_rollout, bench_teachers  # noqa: E402
from bench.common import BENCH, THREADS, checkpoints, machine, md_table, torchrun  # noqa: E402

CPU_SECTIONS = ("logprobs", "rollout", "opd", "teachers", "overlap", "growth")


def _gpu(quick: bool) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device in this process: the GPU suite (bench/dist/gpu_suite.py) did not run"}
    return torchrun(BENCH / "dist" / "gpu_suite.py", 1, *(["--quick"] if quick else []), threads=None)


RUNNERS = {
    "logprobs": lambda quick: bench_logprobs.run(quick),
    "rollout": bench_rollout.run,
    "opd": bench_opd_vs_trl.run,
    "teachers": bench_teachers.run,
    "overlap": bench_teachers.run_overlap,
    "growth": bench_growth.run,
    "gpu": _gpu,
}


def _logprobs_markdown(rows: list[dict]) -> str:
    return ("Log-prob + entropy kernel, chunked vocab-parallel against the naive log_softmax().gather, fresh process "
            "per memory figure; targets: peak <= 0.5x naive, time <= 1.2x naive.\n\n"
            + bench_logprobs.to_markdown(rows))


def _gpu_markdown(result: dict) -> str:
    if "skipped" in result:
        return f"GPU suite skipped: {result['skipped']}."
    rows = []
    for t in result["train"]:
        if "step_s" in t:
            mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "n/a (unknown peak)"
            rows.append([t["spec"], t["fp8"] or "bf16", f"{t['params'] / 1e9:.2f}B", t["tokens_per_step"],
                         f"{t['step_s']:.3f}", f"{t['tflops']:.0f}", mfu, f"{t['peak_gpu_gb']:.1f}"])
        else:
            rows.append([t["spec"], t.get("fp8") or "bf16", "", "", "", "", t.get("skipped") or "error (see json)", ""])
    text = f"GPU suite on {result['device']} (torch {result['torch']}, CUDA {result['cuda']}):\n\n" + md_table(
        ["layer spec", "precision", "params", "tokens/step", "step s", "TFLOP/s", "MFU (bf16 dense peak)",
         "peak GiB"], rows)
    if "rollout" in result:
        r, s = result["rollout"], result["sync"]
        ratio = sorted(r["ratio"])[len(r["ratio"]) // 2]
        text += (f"\n\nRollout (batch {r['batch']} x {r['new_tokens']} tokens, bf16): engine "
                 f"{r['tokens_per_s']['engine']:.0f} tok/s, generate+logprobs "
                 f"{r['tokens_per_s']['generate+logprobs']:.0f} tok/s, ratio {ratio:.2f}x. Weight sync: "
                 f"{s['bytes'] / 1e9:.2f} GB in {s['seconds']:.3f} s = {s['gb_per_s']:.1f} GB/s.")
    elif "rollout_error" in result:
        text += "\n\nRollout and sync: error (see results.json)."
    return text


MARKDOWN = {
    "logprobs": _logprobs_markdown,
    "rollout": bench_rollout.to_markdown,
    "opd": bench_opd_vs_trl.to_markdown,
    "teachers": bench_teachers.to_markdown,
    "overlap": bench_teachers.overlap_markdown,
    "growth": bench_growth.to_markdown,
    "gpu": _gpu_markdown,
}
TITLES = {"logprobs": "1. Log-prob and entropy kernel", "rollout": "2. Rollout engine and weight sync",
          "opd": "3. End-to-end OPD step against TRL", "teachers": "4. Teacher scaling",
          "overlap": "5. Streaming overlap", "growth": "6. Growth with the response length", "gpu": "7. GPU suite"}


def headline(results: dict) -> list[list]:
    """One row per target of the issue: what was measured, the target, and whether it holds."""
    rows = []

    def ok(flag: bool) -> str:
        return "ok" if flag else "MISSED"

    if "logprobs" in results:
        for r in results["logprobs"]:
            rows.append([f"1. kernel {r['tokens']}x{r['vocab']} {r['dtype']} {r['mode']}",
                         f"peak {r['mem_ratio']:.2f}x, time {r['time_ratio']:.2f}x naive", "<= 0.5x, <= 1.2x",
                         ok(r["meets_targets"])])
    if "rollout" in results:
        r = results["rollout"]
        c = r["clean"]["cpu"]["ratio_vs_generate+logprobs"]
        rows.append(["2. engine tok/s vs transformers.generate (+logprobs)",
                     f"{c['median']:.2f}x ({c['min']:.2f}-{c['max']:.2f})", ">= 1.0x", ok(r["meets_target"])])
        for s in r["sync"]:
            rows.append([f"2. weight sync, {s['model']} student", f"{s['seconds']['median'] * 1e3:.1f} ms/step, "
                         f"{s['gb_per_s']:.2f} GB/s", "reported", "-"])
    if "opd" in results:
        o = results["opd"]
        for side, speed in o["cpu_speedup_vs_trl"].items():
            cpu = o["cpu_seconds_per_step"]
            rows.append([f"3. OPD step vs TRL, {side}", f"{speed:.2f}x ({cpu[side]['median']:.2f} vs "
                         f"{cpu['trl']['median']:.2f} CPU s/step; wall {o['wall_speedup_vs_trl'][side]:.2f}x)",
                         ">= 2x", ok(speed >= bench_opd_vs_trl.TARGET)])
    if "teachers" in results:
        t = results["teachers"]
        rows.append(["4. teacher time, 4 teachers / 1 teacher", f"routed {t['routed_growth']:.2f}x, all-score "
                     f"{t['all_growth']:.2f}x", "routed flat", ok(t["meets_target"])])
    if "overlap" in results:
        v = results["overlap"]
        rows.append(["5. streaming / serialised step", f"{v['ratio']['median']:.2f} ({v['ratio']['min']:.2f}-"
                     f"{v['ratio']['max']:.2f})", f"< {bench_teachers.OVERLAP_TARGET}", ok(v["meets_target"])])
    if "growth" in results:
        g = results["growth"]
        last = g["points"][-1]
        rows.append(["6. growth 256->4096 tokens, linear fit R^2", f"time {g['time_fit']['r2']:.3f}, memory "
                     f"{g['memory_fit']['r2']:.3f}; per-token x{last['time_per_token_vs_first']:.1f} time, "
                     f"x{last['memory_per_token_vs_first']:.1f} memory at {last['length']}", "near-linear",
                     ok(g["time_fit"]["r2"] >= 0.98 and g["memory_fit"]["r2"] >= 0.98)])
    if "gpu" in results:
        gpu = results["gpu"]
        rows.append(["7. GPU suite", gpu.get("skipped") or gpu.get("device", ""), "run on a GPU", "-"])
    return rows


def to_markdown(report: dict) -> str:
    m = report["machine"]
    v = m["versions"]
    mode = "quick" if report["quick"] else "full"
    head = (f"# megatron-gopd performance ({mode} mode)\n\n"
            f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores"
            f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}; {report['threads_per_worker']} intra-op thread(s) "
            f"per worker process; load average {m.get('load_avg_at_start', float('nan')):.1f} at the start (a shared "
            f"machine: only ratios measured side by side count). Python {m['python']}, torch {v['torch']}, "
            f"megatron-core {v['megatron-core']}, transformers {v['transformers']}, trl {v['trl']}, accelerate "
            f"{v['accelerate']}. `python bench/run.py{' --quick' if report['quick'] else ''}` took "
            f"{report['total_s'] / 60:.1f} min.\n\n")
    targets = md_table(["measurement", "result", "target", "status"], headline(report["results"]))
    parts = [head, "## Targets\n\n", targets, "\n"]
    for name, result in report["results"].items():
        parts.append(f"\n## {TITLES[name]} ({report['seconds'][name]:.0f} s)\n\n{MARKDOWN[name](result)}\n")
    for name, error in report["errors"].items():
        parts.append(f"\n## {TITLES[name]}: FAILED\n\n```\n{error}\n```\n")
    return "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the short CPU suite (well under 10 minutes on 2 cores)")
    parser.add_argument("--gpu", action="store_true", help="also run the GPU suite (skipped when CUDA is absent)")
    parser.add_argument("--only", nargs="+", choices=CPU_SECTIONS + ("gpu",), help="run only these sections")
    parser.add_argument("--out", default=str(BENCH / "results.json"))
    args = parser.parse_args()
    sections = list(args.only or CPU_SECTIONS) + (["gpu"] if args.gpu and not args.only else [])

    if THREADS is not None:  # bench_logprobs' workers too: every worker process of the suite gets the same setting
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(THREADS)
    start = time.perf_counter()
    report = {"quick": args.quick, "machine": machine(), "threads_per_worker": THREADS or "default",
              "results": {}, "seconds": {}, "errors": {}}
    if set(sections) & {"opd", "teachers", "overlap", "rollout"}:
        checkpoints()  # the tiny models, once (cached between runs)
    for name in sections:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            report["results"][name] = RUNNERS[name](args.quick)
        except Exception:
            report["errors"][name] = traceback.format_exc()[-4000:]
        report["seconds"][name] = time.perf_counter() - t0
        print(f"[bench] {name} done in {report['seconds'][name]:.0f} s", file=sys.stderr, flush=True)
    report["total_s"] = time.perf_counter() - start

    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    markdown = to_markdown(report)
    out.with_name("RESULTS.md").write_text(markdown)
    print(markdown)
    sys.exit(1 if report["errors"] else 0)


if __name__ == "__main__":
    main()
