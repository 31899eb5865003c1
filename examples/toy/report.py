"""The toy's report, built only from what the runs wrote: a results table (held-out avg@n per domain, mean and
spread over seeds), response lengths, and accuracy against lambda with the teachers as reference lines.

    python examples/toy/report.py --out runs/toy

Writes <out>/report.md, <out>/results.json and <out>/lambda_sweep.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

DOMAINS = ("math", "code")


def methods(lambdas) -> dict[str, str]:
    """Row label -> where its numbers live: eval/<name>-s<seed>.json or runs/<name>-s<seed>/metrics.jsonl."""
    named = {1.0: "OPD (lambda=1)", 1.25: "ExOPD (lambda=1.25)"}
    rows = {"base": "eval:base", **{f"teacher ({d})": f"eval:teacher-{d}" for d in DOMAINS},
            "ExPO (alpha=0.5)": "eval:expo", "SFT on teacher samples": "run:sft"}
    for lam in sorted(lambdas, key=lambda x: (x not in named, x)):
        rows[named.get(lam, f"G-OPD (lambda={lam:g})")] = f"run:gopd-lam{lam:g}"
    return rows


def seed_metrics(out: Path, source: str, seed: int) -> dict[str, float]:
    """The final held-out metrics of one model and seed, keyed like `math/avg@4`."""
    kind, name = source.split(":")
    if kind == "eval":
        return json.loads((out / "eval" / f"{name}-s{seed}.json").read_text())["metrics"]
    lines = (out / "runs" / f"{name}-s{seed}" / "metrics.jsonl").read_text().splitlines()
    last_eval = [m for m in map(json.loads, lines) if any(k.startswith("eval/") for k in m)][-1]
    return {k.removeprefix("eval/"): v for k, v in last_eval.items() if k.startswith("eval/")}


def collect(out: Path, seeds, lambdas) -> dict[str, dict[str, list[float]]]:
    """Row label -> metric -> one value per seed (accuracy in %, response length in tokens)."""
    table = {}
    for label, source in methods(lambdas).items():
        per_seed = [seed_metrics(out, source, seed) for seed in seeds]
        avg = next(k.split("/")[1] for k in per_seed[0] if k.startswith("math/avg@"))
        table[label] = {}
        for d in DOMAINS:
            table[label][f"{d} {avg}"] = [100 * m[f"{d}/{avg}"] for m in per_seed]
            table[label][f"{d} length"] = [m[f"{d}/response_length"] for m in per_seed]
        table[label]["mean " + avg] = [(a + b) / 2 for a, b in zip(*(table[label][f"{d} {avg}"] for d in DOMAINS))]
    return table


def cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def findings(table) -> list[str]:
    """What the numbers say, computed here so that nothing in the report is typed by hand."""
    acc = {label: {k: statistics.fmean(v) for k, v in cols.items() if "@" in k} for label, cols in table.items()}
    mean_key = next(k for k in next(iter(acc.values())) if k.startswith("mean"))
    order = sorted(acc, key=lambda label: -acc[label][mean_key])
    lines = ["Ranking by mean held-out accuracy: " + " > ".join(f"{label} ({acc[label][mean_key]:.1f})"
                                                               for label in order) + "."]
    opd, exopd = acc.get("OPD (lambda=1)"), acc.get("ExOPD (lambda=1.25)")
    if opd and exopd:
        for d in DOMAINS:
            key = next(k for k in exopd if k.startswith(d))
            teacher = acc[f"teacher ({d})"][key]
            lines.append(f"{d}: ExOPD {exopd[key]:.1f} vs OPD {opd[key]:.1f} ({exopd[key] - opd[key]:+.1f}) and vs "
                         f"its teacher {teacher:.1f} ({exopd[key] - teacher:+.1f}).")
    return lines


def markdown(table, seeds, stage_seconds=None) -> str:
    columns = list(next(iter(table.values())))
    lines = [f"Held-out accuracy (%) and response length (tokens), mean ± std over seeds {list(seeds)}:", "",
             "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, cols in table.items():
        lines.append(f"| {label} | " + " | ".join(cell(cols[c]) for c in columns) + " |")
    lines += [""] + findings(table)
    if stage_seconds:
        lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(table, lambdas, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training box
    import matplotlib.pyplot as plt

    rows = methods(lambdas)
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(5 * len(DOMAINS), 3.6))
    for ax, d in zip(axes, DOMAINS):
        key = next(k for k in table["base"] if k.startswith(d) and "@" in k)
        sweep = sorted((lam, label) for label in rows for lam in lambdas if rows[label] == f"run:gopd-lam{lam:g}")
        means = [statistics.fmean(table[label][key]) for _, label in sweep]
        spread = [statistics.stdev(table[label][key]) if len(table[label][key]) > 1 else 0 for _, label in sweep]
        ax.errorbar([lam for lam, _ in sweep], means, yerr=spread, marker="o", capsize=3, label="G-OPD (student)")
        for label, style in ((f"teacher ({d})", "-"), ("base", ":"), ("ExPO (alpha=0.5)", "-."),
                             ("SFT on teacher samples", "--")):
            ax.axhline(statistics.fmean(table[label][key]), linestyle=style, color="gray", label=label)
        ax.set(title=d, xlabel="lambda", ylabel=f"held-out {key.split()[1]} (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, *, seeds, lambdas, stage_seconds=None) -> dict:
    table = collect(out, seeds, lambdas)
    text = markdown(table, seeds, stage_seconds)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"seeds": list(seeds), "table": table,
                                                  "stage_seconds": stage_seconds or {}}, indent=1))
    plot(table, lambdas, out / "lambda_sweep.png")
    return {"markdown": text, "table": table}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the pipeline's --out directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    profile = json.loads((out / "profile.json").read_text())
    print(write_report(out, seeds=profile["seeds"], lambdas=profile["lambdas"])["markdown"])


if __name__ == "__main__":
    main()
