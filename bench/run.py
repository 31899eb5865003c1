"""The performance suite: every speed claim is a ratio measured side by side in this one run.

    python bench/run.py [--quick | --size smoke|quick|full] [--only logprobs rollout ...]

Writes bench/results.json (every number, with the machine and the date) and bench/RESULTS.md (the tables), and
prints the same markdown. Sections:
  logprobs   1. chunked vocab-parallel log-prob/entropy kernel against log_softmax().gather (bench_logprobs.py)
  rollout    2. our rollout engine against transformers.generate, and the weight-sync cost (bench_rollout.py)
  opd        3. end-to-end OPD step against TRL's DistillationTrainer (bench_opd_vs_trl.py)
  teachers   4. teacher compute with 1, 2, 4 domain teachers, routed against all-score (bench_teachers.py)
  overlap    5. streaming teacher service against the same work serialised (bench_teachers.py, world 2)
  growth     6. step time and peak memory against the response length (bench_growth.py)
  gpu        7. train-step MFU at ~1.3B, TE/FP8 when installed, rollout tok/s, sync GB/s (bench/dist/gpu_suite.py);
             without CUDA, its --smoke form (a tiny model on the CPU: the code runs, no figures).
  batching   9. one update step of long-tailed rows: padded to the step's longest, a token budget, packed
             (bench_batching.py)
  moe        8. a mixture-of-experts student step against a dense one of the same active parameters, world 1
             and EP=2 (bench_moe.py; reported, no target)
  plan      10. the memory planner's estimates against measured peak memory of training steps (bench_memory_plan.py)
  async     11. one-step-off-policy training (rollout.max_staleness=1) against on-policy (0), a dedicated rollout
             engine rank beside the student: step time and the per-phase timeline (bench_async.py, world 2)
  soak      12. a long G-OPD run under torchrun (a dedicated and a colocated teacher, checkpoints): each worker's
             resident memory, descriptors and threads, and the checkpoints kept (bench_soak.py)
--quick keeps the suite well under 10 minutes on 2 cores; the full size repeats more and adds sizes; --size smoke
runs every section in seconds (the test suite runs it, so that a change that breaks the bench breaks a test).
The TRL comparison needs the `bench` extra (`pip install -e ".[bench]"`).
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

from bench import (
    bench_async,
    bench_batching,
    bench_growth,
    bench_logprobs,
    bench_memory_plan,
    bench_moe,
    bench_opd_vs_trl,
    bench_rollout,
    bench_soak,
    bench_teachers,
)
from bench.common import (
    BENCH,
    SIZES,
    THREADS,
    MissingExtra,
    checkpoints,
    machine,
    md_table,
    torchrun,
    verdict,
)

SECTIONS = ("logprobs", "rollout", "opd", "teachers", "overlap", "growth", "batching", "gpu", "moe", "plan",
            "async", "soak")


def _gpu(size: str) -> dict:
    """The GPU suite; without CUDA (or at the smoke size) its --smoke form, which shows only that the code runs."""
    import torch

    if not torch.cuda.is_available() or size == "smoke":
        return torchrun(BENCH / "dist" / "gpu_suite.py", 1, "--smoke")
    return torchrun(BENCH / "dist" / "gpu_suite.py", 1, *(["--quick"] if size == "quick" else []), threads=None)


def _gpu_errors(result: dict) -> int:
    return sum("error" in t for t in result["train"]) + ("rollout_error" in result)


RUNNERS = {
    "logprobs": bench_logprobs.run,
    "rollout": bench_rollout.run,
    "opd": bench_opd_vs_trl.run,
    "teachers": bench_teachers.run,
    "overlap": bench_teachers.run_overlap,
    "growth": bench_growth.run,
    "batching": bench_batching.run,
    "moe": bench_moe.run,
    "gpu": _gpu,
    "plan": bench_memory_plan.run,
    "async": bench_async.run,
    "soak": bench_soak.run,
}


def _gpu_markdown(result: dict) -> str:
    rows = []
    for t in result["train"]:
        if "step_s" in t:
            mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "n/a"
            peak = f"{t['peak_gpu_gb']:.1f}" if t["peak_gpu_gb"] is not None else "n/a"
            rows.append([t["spec"], t["fp8"] or "bf16", f"{t['params'] / 1e6:.4g}", t["tokens_per_step"],
                         f"{t['step_s']:.3f}", f"{t['tflops']:.3g}", mfu, peak])
        else:
            rows.append([t["spec"], t.get("fp8") or "bf16", "", "", "", "", t.get("skipped") or "error (see json)", ""])
    if result["smoke"]:
        text = ("No CUDA device on this machine, so the GPU suite (bench/dist/gpu_suite.py) did not run and is "
                "unverified on a GPU: none of its figures exist yet. Its --smoke form ran instead, a tiny model on "
                f"the CPU, which checks only that every part runs end to end ({_gpu_errors(result)} errors); its "
                "timings mean nothing:\n\n")
    else:
        text = f"GPU suite on {result['device']} (torch {result['torch']}, CUDA {result['cuda']}):\n\n"
    text += md_table(["layer spec", "precision", "params (M)", "tokens/step", "step s", "TFLOP/s",
                      "MFU (bf16 dense peak)", "peak GiB"], rows)
    if "rollout" in result:
        r, s = result["rollout"], result["sync"]
        ratio = sorted(r["ratio"])[len(r["ratio"]) // 2]
        text += (f"\n\nRollout (batch {r['batch']} x {r['new_tokens']} tokens, bf16): engine "
                 f"{r['tokens_per_s']['engine']:.0f} tok/s, generate+logprobs "
                 f"{r['tokens_per_s']['generate+logprobs']:.0f} tok/s, ratio {ratio:.2f}x. Weight sync: "
                 f"{s['bytes'] / 1e9:.3g} GB in {s['seconds']:.3g} s = {s['gb_per_s']:.3g} GB/s.")
    elif "rollout_error" in result:
        text += "\n\nRollout and sync: error (see results.json)."
    return text


NOTES = {
    "rollout": bench_rollout.notes,
    "opd": bench_opd_vs_trl.notes,
    "teachers": bench_teachers.notes,
    "overlap": bench_teachers.overlap_notes,
    "growth": bench_growth.notes,
    "plan": bench_memory_plan.notes,
    "async": bench_async.notes,
    "soak": bench_soak.notes,
}
MARKDOWN = {
    "logprobs": bench_logprobs.to_markdown,
    "rollout": bench_rollout.to_markdown,
    "opd": bench_opd_vs_trl.to_markdown,
    "teachers": bench_teachers.to_markdown,
    "overlap": bench_teachers.overlap_markdown,
    "growth": bench_growth.to_markdown,
    "batching": bench_batching.to_markdown,
    "moe": bench_moe.to_markdown,
    "gpu": _gpu_markdown,
    "plan": bench_memory_plan.to_markdown,
    "async": bench_async.to_markdown,
    "soak": bench_soak.to_markdown,
}
TITLES = {"logprobs": "1. Log-prob and entropy kernel", "rollout": "2. Rollout engine and weight sync",
          "opd": "3. End-to-end OPD step against TRL", "teachers": "4. Teacher scaling",
          "overlap": "5. Streaming overlap", "growth": "6. Growth with the response length", "gpu": "7. GPU suite",
          "batching": "9. Batching long-tailed rows",
          "moe": "8. Mixture of experts",
          "plan": "10. Memory planner against measured peaks",
          "async": "11. One-step-off-policy training", "soak": "12. Soak"}


def headline(results: dict) -> list[list]:
    """One row per target of the issue: what was measured, the target, and whether it holds."""
    rows = []
    if "logprobs" in results:
        target = f"<= {bench_logprobs.MEMORY_TARGET}x, <= {bench_logprobs.TIME_TARGET}x"
        for r in results["logprobs"]:
            rows.append([f"1. kernel {r['tokens']}x{r['vocab']} {r['dtype']} {r['mode']}",
                         f"peak {r['mem_ratio']:.2f}x, time {r['time_ratio']:.2f}x naive", target,
                         verdict(r["meets_targets"])])
    if "rollout" in results:
        r = results["rollout"]
        c, e = bench_rollout.headline_ratio(r), r["clean"]["cpu"]["ratios"]["engine"]["generate+logprobs"]
        rows.append(["2. compiled engine tok/s vs transformers.generate (+logprobs)",
                     (f"{c['median']:.2f}x ({c['min']:.2f}-{c['max']:.2f}; eager engine {e['median']:.2f}x; "
                      f"compile {r['compile']['compile_s']['cold']:.0f} s cold, pays after "
                      f"{r['compile']['break_even_decode_steps']['cold']:.0f} decode steps)"),
                     f">= {bench_rollout.TARGET}x", verdict(r["meets_target"])])
        for s in r["sync"]:
            rows.append([f"2. weight sync, {s['model']} student",
                         f"{s['seconds']['median'] * 1e3:.1f} ms/step, {s['gb_per_s']:.2f} GB/s", "reported", "-"])
    if "opd" in results:
        o = results["opd"]
        cpu = o["cpu_seconds_per_step"]
        for side, speed in o["cpu_speedup_vs_trl"].items():
            rows.append([f"3. OPD step vs TRL, {side}",
                         (f"{speed:.2f}x ({cpu[side]['median']:.2f} vs {cpu['trl']['median']:.2f} CPU s/step; "
                          f"wall {o['wall_speedup_vs_trl'][side]:.2f}x)"),
                         f">= {bench_opd_vs_trl.TARGET}x" if side in o["target_sides"] else "reported",
                         verdict(speed >= bench_opd_vs_trl.TARGET) if side in o["target_sides"] else "-"])
    if "teachers" in results:
        t = results["teachers"]
        counts = bench_teachers.TEACHER_COUNTS
        scored = {m: "/".join(map(str, t["samples_scored"][m])) for m in ("routed", "all")}
        rows.append([f"4. samples scored per step, {'/'.join(map(str, counts))} teachers",
                     f"routed {scored['routed']}, all-score {scored['all']}", "routed flat",
                     verdict(t["samples_flat"])])
        rows.append([f"4. teacher CPU time per step, {max(counts)} teachers / {min(counts)}",
                     f"routed {t['routed_growth']:.2f}x, all-score {t['all_growth']:.2f}x",
                     f"routed flat (<= {bench_teachers.FLAT_TOLERANCE}x)", verdict(t["meets_target"])])
    if "overlap" in results:
        v = results["overlap"]["ratio"]
        rows.append(["5. streaming / serialised step", f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})",
                     f"< {bench_teachers.OVERLAP_TARGET}", verdict(results["overlap"]["meets_target"])])
    if "growth" in results:
        g = results["growth"]
        first, last = g["points"][0], g["points"][-1]
        rows.append([f"6. growth {first['length']}->{last['length']} tokens, {g['model']}, per token at the longest",
                     (f"x{last['memory_per_token_vs_first']:.2f} memory, x{last['time_per_token_vs_first']:.2f} "
                      f"time (linear fit R^2 memory {g['memory_fit']['r2']:.3f}, time {g['time_fit']['r2']:.3f})"),
                     f"<= {bench_growth.MEMORY_TARGET}x memory, <= {bench_growth.TIME_TARGET}x time",
                     verdict(g["meets_target"])])
    if "batching" in results:
        b = results["batching"]
        for layout, speedup in b["speedup_vs_pad_to_max"].items():
            mix = b["padded_fraction"]
            rows.append([f"9. batching, {layout} vs padding to the step's longest row",
                         (f"padded {mix[layout]:.1%} on the issue's mix (pad_to_max {mix['pad_to_max']:.1%}; "
                          f"{b['padded_fraction_this_size'][layout]:.1%} on this size's), update {speedup:.2f}x faster"),
                         f"<= {bench_batching.PADDED_TARGET:.0%}, >= {bench_batching.SPEEDUP_TARGET}x",
                         verdict(mix[layout] <= bench_batching.PADDED_TARGET
                                 and speedup >= bench_batching.SPEEDUP_TARGET)])
    if "gpu" in results:
        gpu = results["gpu"]
        ran = (f"not run: no CUDA device (unverified); --smoke on CPU: {_gpu_errors(gpu)} errors" if gpu["smoke"]
               else f"{gpu['device']}, {_gpu_errors(gpu)} errors (section 7)")
        rows.append(["7. GPU suite", ran, "run on a GPU", "-"])
    if "moe" in results:
        rows += bench_moe.headline_rows(results["moe"])
    if "plan" in results:
        p = results["plan"]
        ratios = [x["total_ratio"] for x in p["points"]]
        rows.append([f"10. memory planner / measured peak, {len(ratios)} settings of {p['model']}",
                     f"{min(ratios):.2f}-{max(ratios):.2f}", f"within +-{bench_memory_plan.TOLERANCE:.0%}",
                     verdict(p["meets_target"])])
    if "async" in results:
        a = results["async"]
        steps = {side: a["step_s"][side]["median"] for side in bench_async.SIDES}
        rows.append(["11. step time, one step off / on-policy (dedicated rollout engine rank)",
                     (f"{a['step_time_ratio']:.2f}x ({a['ratio']['min']:.2f}-{a['ratio']['max']:.2f}; "
                      f"{steps['staleness_1']:.2f} vs {steps['staleness_0']:.2f} s/step)"),
                     f"<= {bench_async.TARGET}x", verdict(a["meets_target"])])
    if "soak" in results:
        rows += bench_soak.headline_rows(results["soak"])
    return rows


def to_markdown(report: dict) -> str:
    m = report["machine"]
    v = m["versions"]
    size = report["size"]
    head = (f"# megatron-gopd performance ({size} size)\n\n"
            f"Measured {m['date']} on {m['cpu']}, {m['cores']} cores"
            f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}; {report['threads_per_worker']} intra-op thread(s) "
            f"per worker process; load average {m.get('load_avg_at_start', float('nan')):.1f} at the start (a shared "
            f"machine: only ratios measured side by side count; where a table says so, times are the worker process's "
            f"CPU seconds, which leave out its waits for a core). Python {m['python']}, torch {v['torch']}, "
            f"megatron-core {v['megatron-core']}, transformers {v['transformers']}, trl {v['trl']}, accelerate "
            f"{v['accelerate']}. `python bench/run.py --size {size}` took "
            f"{report['total_s'] / 60:.1f} min.")
    earlier = sorted({d for d in report.get("measured", {}).values() if d != m["date"]})
    if earlier:  # sections kept from earlier runs (--only)
        head += f" Some sections were measured earlier ({', '.join(earlier)}): each section's heading gives its date."
    head += "\n\n"
    targets = md_table(["measurement", "result", "target", "status"], headline(report["results"]))
    notes = [NOTES[name](result) for name, result in report["results"].items()
             if name in NOTES and not result["meets_target"]]
    parts = [head, "## Targets\n\n", targets, "\n"]
    if notes:
        parts.append("\n## Missed targets: why, and what would close them\n\n"
                     + "\n".join(f"- {n}" for n in notes) + "\n")
    for name, result in report["results"].items():
        parts.append(f"\n## {TITLES[name]} ({report.get('measured', {}).get(name, m['date'])}, "
                     f"{report['seconds'][name]:.0f} s; load average "
                     f"{report['load_avg'][name]:.1f} at its start)\n\n{MARKDOWN[name](result)}\n")
    for name, error in report["errors"].items():
        parts.append(f"\n## {TITLES[name]}: FAILED\n\n```\n{error}\n```\n")
    return "".join(parts)


def _keep_other_sections(report: dict, previous: dict) -> None:
    """Sections of an earlier report at the same size that this run did not measure, in the suite's order."""
    if previous.get("size") != report["size"]:
        return
    for key in ("results", "seconds", "load_avg", "measured"):
        merged = {**previous.get(key, {}), **report[key]}
        report[key] = {name: merged[name] for name in SECTIONS if name in merged}
    for name in report["results"]:
        report["measured"].setdefault(name, previous["machine"]["date"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="full", help="smoke: seconds, quick: < 10 min, full")
    parser.add_argument("--quick", action="store_const", const="quick", dest="size", help="= --size quick")
    parser.add_argument("--only", nargs="+", choices=SECTIONS,
                        help="run only these sections; the other sections of --out (same size) are kept, each with "
                             "the date it was measured")
    parser.add_argument("--out", default=str(BENCH / "results.json"))
    args = parser.parse_args()
    sections = args.only or SECTIONS

    start = time.perf_counter()
    report = {"size": args.size, "machine": machine(), "threads_per_worker": THREADS or "default",
              "results": {}, "seconds": {}, "load_avg": {}, "measured": {}, "errors": {}}
    if set(sections) & {"opd", "teachers", "overlap", "rollout", "async", "soak"}:
        checkpoints()  # the tiny models, once (cached between runs)
    for name in sections:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        report["load_avg"][name] = os.getloadavg()[0]  # how busy the shared machine was as the section began
        report["measured"][name] = report["machine"]["date"]
        try:
            report["results"][name] = RUNNERS[name](args.size)
        except MissingExtra as e:  # one line, no traceback: what to install
            report["errors"][name] = str(e)
            print(f"[bench] {name}: {e}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001  a failed section is reported, and the others still run
            report["errors"][name] = traceback.format_exc()[-4000:]
        report["seconds"][name] = time.perf_counter() - t0
        print(f"[bench] {name} done in {report['seconds'][name]:.0f} s", file=sys.stderr, flush=True)
    report["total_s"] = time.perf_counter() - start

    out = Path(args.out)
    if args.only and out.is_file():
        _keep_other_sections(report, json.loads(out.read_text()))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, out)
    markdown = to_markdown(report)
    out.with_name("RESULTS.md").write_text(markdown)
    print(markdown)
    sys.exit(1 if report["errors"] else 0)


if __name__ == "__main__":
    main()
