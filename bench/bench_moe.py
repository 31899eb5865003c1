"""Mixture of experts: a Qwen3-MoE student's training step against a dense Qwen3 one of the same active
parameters (the same MLP FLOPs per token), in one process and at world 2 with the experts spread over the two
data-parallel replicas (EP=2). Reported; no target.

    python bench/bench_moe.py [--size smoke|quick|full]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import BENCH, by_size, cli, md_table, ratio_summary, spread, summary, torchrun

WORLDS = (1, 2)


def run(size: str) -> dict:
    result = {"runs": []}
    for world in WORLDS:
        r = torchrun(BENCH / "dist" / "moe_step.py", world, "--rounds", str(by_size(size, smoke=1, quick=3, full=8)))
        dense, moe = r["models"]["dense"], r["models"]["moe"]
        # rank 0's CPU seconds per step; the ratio pairs the steps of one round
        r["ratio"] = ratio_summary(moe["cpu"], dense["cpu"])
        for m in (dense, moe):
            m["cpu_summary"], m["wall_summary"] = summary(m["cpu"]), summary(m["wall"])
        result["runs"].append(r)
    result["meets_target"] = True  # reported only
    return result


def headline_rows(result: dict) -> list[list]:
    parts = [f"{'EP=2, world 2' if r['world'] > 1 else 'world 1'} {r['ratio']['median']:.2f}x" for r in result["runs"]]
    return [["8. MoE step / dense step, same active params", ", ".join(parts), "reported", "-"]]


def to_markdown(result: dict) -> str:
    rows = []
    for r in result["runs"]:
        for name in ("dense", "moe"):
            m = r["models"][name]
            rows.append([r["world"], "EP=2 over DP=2" if r["world"] > 1 and name == "moe" else f"DP={r['world']}",
                         name, f"{m['params'] / 1e6:.2f}", f"{m['active_params'] / 1e6:.2f}", spread(m["cpu_summary"]),
                         f"{m['wall_summary']['median']:.3g}",
                         f"{r['tokens_per_step'] / m['cpu_summary']['median']:.0f}",
                         spread(r["ratio"], "{:.2f}") if name == "moe" else "1 (baseline)"])
    load = result["runs"][0]["models"]["moe"].get("load", {})
    table = md_table(["world", "layout", "model", "params (M)", "active params (M)", "step CPU s (rank 0)",
                      "wall s", "tokens/CPU s", "MoE / dense"], rows)
    return ("Qwen3 decoders, 4 layers, hidden 256, heads 4/2, vocab 250, fp32, local layer spec (per-expert MLPs, "
            "megatron's all-to-all token dispatcher); dense MLP 1024 units, MoE 8 experts of 512 units, top-2 "
            "renormalised: the same MLP FLOPs per token, 4x the MLP parameters. One training step = 2 micro-batches "
            "of 4 x 256 random tokens per replica, NLL, megatron DDP + distributed optimizer (Adam). Rounds "
            "alternate the models after a warm-up step each; CPU seconds of rank 0 per step, median (min-max, n); "
            "the ratio pairs the steps of one round. Expert load over the measured steps (world 1, random "
            f"routers): max/mean {load.get('moe/imbalance_mean', float('nan')):.2f} averaged over layers, worst "
            f"{load.get('moe/imbalance_max', float('nan')):.2f}.\n\n{table}")


if __name__ == "__main__":
    cli(__doc__, None, lambda size: to_markdown(run(size)))
