"""The toy's report, built only from what the runs wrote: a results table (held-out avg@n per domain, mean and
spread over seeds), response lengths, accuracy against lambda with the teachers as reference lines, the G-OPD runs'
response length and reward per step, and the paper's claims one by one, each from paired-by-seed differences with
95% t-intervals over seeds.

    python examples/toy/report.py --out runs/toy

Writes <out>/report.md, <out>/results.json, <out>/lambda_sweep.png and <out>/training_curves.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

DOMAINS = ("math", "code")
OPD, EXOPD = "OPD (lambda=1)", "ExOPD (lambda=1.25)"
# the strong-to-weak arm's rows: one larger teacher from its own base, each reference
S2W_INIT, S2W_CORRECTED = "strong-to-weak, ref = student's init", "strong-to-weak, ref = teacher's base"
STRONG_TEACHER = "teacher (strong)"
# two-sided 95% quantiles of Student's t by degrees of freedom (seeds - 1): the interval of a mean over few seeds
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}


def gopd_label(lam: float) -> str:
    return {1.0: OPD, 1.25: EXOPD}.get(lam, f"G-OPD (lambda={lam:g})")


def methods(lambdas, strong_to_weak: bool = False) -> dict[str, str]:
    """Row label -> where its numbers live: eval/<name>-s<seed>.json or runs/<name>-s<seed>/metrics.jsonl."""
    rows = {"base": "eval:base", **{f"teacher ({d})": f"eval:teacher-{d}" for d in DOMAINS},
            "ExPO (alpha=0.5)": "eval:expo", "SFT on teacher samples": "run:sft"}
    for lam in sorted(lambdas, key=lambda x: (x not in (1.0, 1.25), x)):
        rows[gopd_label(lam)] = f"run:gopd-lam{lam:g}"
    if strong_to_weak:
        rows |= {STRONG_TEACHER: "eval:teacher-strong", S2W_INIT: "run:s2w-ref-init",
                 S2W_CORRECTED: "run:s2w-ref-teacher-base"}
    return rows


def seed_metrics(out: Path, source: str, seed: int) -> dict[str, float]:
    """The final held-out metrics of one model and seed, keyed like `math/avg@4`."""
    kind, name = source.split(":")
    if kind == "eval":
        return json.loads((out / "eval" / f"{name}-s{seed}.json").read_text())["metrics"]
    lines = (out / "runs" / f"{name}-s{seed}" / "metrics.jsonl").read_text().splitlines()
    last_eval = [m for m in map(json.loads, lines) if any(k.startswith("eval/") for k in m)][-1]
    return {k.removeprefix("eval/"): v for k, v in last_eval.items() if k.startswith("eval/")}


def collect(out: Path, seeds, lambdas, strong_to_weak: bool = False) -> dict[str, dict[str, list[float]]]:
    """Row label -> metric -> one value per seed (accuracy in %, response length in tokens)."""
    table = {}
    for label, source in methods(lambdas, strong_to_weak).items():
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


def accuracy_key(table, domain: str) -> str:
    """The column of a domain's avg@n ("math avg@4"; "mean avg@4" for the mean over domains)."""
    return next(k for k in next(iter(table.values())) if k.startswith(f"{domain} avg@"))


def interval(values: list[float]) -> dict:
    """Mean of per-seed values with its two-sided 95% t-interval (None bounds with one seed: no spread to use)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"values": values, "mean": mean, "low": None, "high": None}
    if len(values) - 1 not in T975:
        raise ValueError(f"{len(values)} seeds: the t-quantile table covers 2 to {max(T975) + 1}")
    half = T975[len(values) - 1] * statistics.stdev(values) / len(values) ** 0.5
    return {"values": values, "mean": mean, "low": mean - half, "high": mean + half}


def paired(table, a: str, b: str, column: str) -> dict:
    """Row a minus row b on one column, seed by seed (same seed: same training data order and evaluation
    sampling seed), as an interval."""
    return interval([x - y for x, y in zip(table[a][column], table[b][column], strict=True)])


def shown(iv: dict, unit: str = "") -> str:
    if iv["low"] is None:
        return f"{iv['mean']:+.2f}{unit} (one seed: no interval)"
    return f"{iv['mean']:+.2f}{unit} [{iv['low']:+.2f}, {iv['high']:+.2f}]"


def sign(iv: dict) -> int:
    """+1 / -1 where the 95% interval lies above / below 0, 0 where it holds 0 (or there is one seed)."""
    if iv["low"] is None:
        return 0
    return 1 if iv["low"] > 0 else -1 if iv["high"] < 0 else 0


def improvement_verdict(signs: list[int]) -> str:
    """A claim that one row beats another on each domain, from the signs of its per-domain intervals."""
    return ("reproduced" if all(x > 0 for x in signs) else "reversed" if all(x < 0 for x in signs)
            else "partly reproduced" if any(x > 0 for x in signs) else "not reproduced")


def findings(table) -> list[str]:
    """What the numbers say, computed here so that nothing in the report is typed by hand."""
    mean_key = accuracy_key(table, "mean")
    order = sorted(table, key=lambda label: -statistics.fmean(table[label][mean_key]))
    return ["Ranking by mean held-out accuracy: " + " > ".join(
        f"{label} ({statistics.fmean(table[label][mean_key]):.1f})" for label in order) + "."]


def run_steps(out: Path, lam: float, seed: int) -> list[dict]:
    return [json.loads(line) for line in (out / "runs" / f"gopd-lam{lam:g}-s{seed}" / "metrics.jsonl").read_text()
            .splitlines()]


def curves(out: Path, seeds, lambdas) -> dict[str, dict[str, list[list[float]]]]:
    """Per lambda, the G-OPD runs' per-step training metrics (one list per seed): the rollout's response length,
    the reward log pi_T - log pi_ref, and the held-out mean avg@n at the steps that were evaluated."""
    metrics = {"response_length": "rollout/response_length", "reward": "gopd/reward"}
    result = {name: {} for name in [*metrics, "eval_steps", "eval_accuracy"]}
    for lam in lambdas:
        runs = [run_steps(out, lam, seed) for seed in seeds]
        for name, key in metrics.items():
            result[name][f"{lam:g}"] = [[m[key] for m in steps if key in m] for steps in runs]
        evaluated = [[m for m in steps if any(k.startswith("eval/") for k in m)] for steps in runs]
        avg = next(k.split("/")[-1] for k in evaluated[0][-1] if k.startswith("eval/math/avg@"))
        result["eval_steps"][f"{lam:g}"] = [[m["step"] for m in evals] for evals in evaluated]
        result["eval_accuracy"][f"{lam:g}"] = [[100 * statistics.fmean(m[f"eval/{d}/{avg}"] for d in DOMAINS)
                                                for m in evals] for evals in evaluated]
    return result


def last_quarter(per_step: list[float]) -> float:
    """The mean over a run's last quarter of steps: where an unstable run has drifted, less noisy than one step."""
    return statistics.fmean(per_step[-max(1, len(per_step) // 4):])


def claims(table, runs, lambdas) -> list[dict]:
    """The paper's claims, each with a verdict from paired-by-seed 95% intervals and the numbers behind it."""
    lengths = {d: f"{d} length" for d in DOMAINS}
    acc = {d: accuracy_key(table, d) for d in [*DOMAINS, "mean"]}
    has = set(table)
    found = []

    def claim(text: str, verdict: str, evidence: list[str], numbers: dict) -> None:
        found.append({"claim": text, "verdict": verdict, "evidence": evidence, "numbers": numbers})

    text = "ExOPD (lambda=1.25) beats OPD (lambda=1) on each domain"
    if {OPD, EXOPD} <= has:
        diffs = {d: paired(table, EXOPD, OPD, acc[d]) for d in [*DOMAINS, "mean"]}
        signs = [sign(diffs[d]) for d in DOMAINS]
        verdict = improvement_verdict(signs)
        claim(text, verdict, [f"ExOPD - OPD, {d} avg@n: {shown(diffs[d], ' points')}" for d in diffs],
              {d: diffs[d] for d in diffs})
    else:
        claim(text, "not tested", ["the profile lacks lambda 1 or 1.25"], {})

    text = "the multi-teacher ExOPD student reaches or passes each teacher on the teacher's own domain"
    if EXOPD in has:
        diffs = {d: paired(table, EXOPD, f"teacher ({d})", acc[d]) for d in DOMAINS}
        opd = {d: paired(table, OPD, f"teacher ({d})", acc[d]) for d in DOMAINS} if OPD in has else {}
        signs = [sign(diffs[d]) for d in DOMAINS]
        verdict = ("reproduced (passes)" if all(x > 0 for x in signs) else "reproduced (reaches: within the interval)"
                   if all(x >= 0 for x in signs) else "not reproduced")
        evidence = [f"ExOPD - {d} teacher on {d}: {shown(diffs[d], ' points')}" for d in DOMAINS]
        evidence += [f"(OPD - {d} teacher on {d}: {shown(opd[d], ' points')})" for d in opd]
        claim(text, verdict, evidence, {"exopd_minus_teacher": diffs, "opd_minus_teacher": opd})
    else:
        claim(text, "not tested", ["the profile lacks lambda 1.25"], {})

    text = "response length grows with lambda"
    sweep = sorted(lambdas)
    if len(sweep) >= 2:
        slopes = {}
        for d in DOMAINS:  # per seed, the least-squares slope of held-out response length against lambda
            per_lambda = [table[gopd_label(lam)][lengths[d]] for lam in sweep]
            slopes[d] = interval([statistics.linear_regression(sweep, seed_lengths).slope
                                  for seed_lengths in zip(*per_lambda)])
        signs = [sign(slopes[d]) for d in DOMAINS]
        verdict = ("reproduced" if all(x > 0 for x in signs) else "partly reproduced" if any(x > 0 for x in signs)
                   else "not reproduced")
        evidence = [f"{d}: held-out length by lambda " + ", ".join(
            f"{lam:g}: {statistics.fmean(table[gopd_label(lam)][lengths[d]]):.1f}" for lam in sweep)
            + f"; slope {shown(slopes[d], ' tokens per unit lambda')}" for d in DOMAINS]
        claim(text, verdict, evidence, {"slope": slopes})
    else:
        claim(text, "not tested", ["the profile has one lambda"], {})

    text = "lambda >= 1.5 becomes unstable (held-out accuracy falls below lambda=1.25's, responses grow long)"
    high = [lam for lam in sweep if lam >= 1.5]
    if EXOPD in has and high:
        numbers, evidence, unstable = {}, [], []
        for lam in high:
            drop = paired(table, gopd_label(lam), EXOPD, acc["mean"])
            late = {key: interval([last_quarter(a) - last_quarter(b)
                                   for a, b in zip(runs[key][f"{lam:g}"], runs[key]["1.25"], strict=True)])
                    for key in ("response_length", "reward")}
            numbers[f"{lam:g}"] = {"accuracy": drop, **late}
            evidence.append(f"lambda {lam:g} - lambda 1.25: mean avg@n {shown(drop, ' points')}; training response "
                            f"length over the last quarter of steps {shown(late['response_length'], ' tokens')}; "
                            f"reward log pi_T - log pi_ref there {shown(late['reward'])}")
            if sign(drop) < 0:
                unstable.append(lam)
        verdict = ("reproduced" if 1.5 in unstable else f"partly reproduced (only at lambda {unstable[0]:g})"
                   if unstable else "not reproduced")
        claim(text, verdict, evidence, numbers)
    else:
        claim(text, "not tested", ["the profile has no lambda >= 1.5"], {})

    text = ("with a stronger teacher from another base, reward correction (reference = the teacher's base) beats the "
            "student's own init as the reference")
    if {S2W_INIT, S2W_CORRECTED} <= has:
        diffs = {d: paired(table, S2W_CORRECTED, S2W_INIT, acc[d]) for d in [*DOMAINS, "mean"]}
        signs = [sign(diffs[d]) for d in DOMAINS]
        verdict = improvement_verdict(signs)
        evidence = [f"(ref = teacher's base) - (ref = student's init), {d} avg@n: {shown(diffs[d], ' points')}"
                    for d in diffs]
        evidence += [f"the strong teacher on {d}: {statistics.fmean(table[STRONG_TEACHER][acc[d]]):.1f} (the {d} "
                     f"teacher {statistics.fmean(table[f'teacher ({d})'][acc[d]]):.1f}, the student's base "
                     f"{statistics.fmean(table['base'][acc[d]]):.1f})" for d in DOMAINS]
        claim(text, verdict, evidence, diffs)
    else:
        claim(text, "not tested", ["this profile has no strong-to-weak arm"], {})
    return found


def plateau(runs) -> dict | None:
    """OPD's held-out mean avg@n at its last evaluation before the final one minus at the final one, paired by
    seed: near 0 where distillation has plateaued (None with one evaluation per run)."""
    steps, accuracy = runs["eval_steps"].get("1"), runs["eval_accuracy"].get("1")
    if not steps or len(steps[0]) < 2:
        return None
    return {"steps": steps[0][-2:], **interval([a[-1] - a[-2] for a in accuracy])}


def markdown(table, seeds, stage_seconds=None, found=(), flat=None) -> str:
    columns = list(next(iter(table.values())))
    lines = [f"Held-out accuracy (%) and response length (tokens), mean ± std over seeds {list(seeds)}:", "",
             "| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, cols in table.items():
        lines.append(f"| {label} | " + " | ".join(cell(cols[c]) for c in columns) + " |")
    lines += [""] + findings(table)
    if found:
        lines += ["", "The paper's claims (differences paired by seed: mean [95% t-interval over seeds]):", ""]
        lines += [f"{i}. **{c['verdict']}**: {c['claim']}. " + "; ".join(c["evidence"]) + "."
                  for i, c in enumerate(found, 1)]
    if flat:
        lines += ["", (f"OPD's held-out mean avg@n from step {flat['steps'][0]} to step {flat['steps'][1]}: "
                       f"{shown(flat, ' points')}: "
                       + {1: "still rising.", -1: "falling.", 0: "no change resolved (a plateau)."}[sign(flat)])]
    if stage_seconds:
        lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items()) + "."]
    return "\n".join(lines) + "\n"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training box
    import matplotlib.pyplot as plt

    return plt


def plot(table, lambdas, path: Path) -> None:
    plt = pyplot()
    rows = methods(lambdas)
    fig, axes = plt.subplots(1, len(DOMAINS), figsize=(5 * len(DOMAINS), 3.6))
    for ax, d in zip(axes, DOMAINS):
        key = accuracy_key(table, d)
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


def plot_curves(runs, path: Path) -> None:
    """Per-step training response length and reward, and held-out accuracy at the evaluated steps: one line per
    lambda, the mean over seeds."""
    plt = pyplot()
    panels = [("response_length", "training response length (tokens)"), ("reward", "reward log pi_T - log pi_ref"),
              ("eval_accuracy", "held-out mean avg@n (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (name, ylabel) in zip(axes, panels):
        for lam, per_seed in runs[name].items():
            steps = runs["eval_steps"][lam][0] if name == "eval_accuracy" else range(1, len(per_seed[0]) + 1)
            ax.plot(list(steps), [statistics.fmean(v) for v in zip(*per_seed)],
                    marker="o" if name == "eval_accuracy" else None, label=f"lambda={lam}")
        ax.set(xlabel="step", ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, *, seeds, lambdas, strong_to_weak: bool = False, stage_seconds=None) -> dict:
    table = collect(out, seeds, lambdas, strong_to_weak)
    runs = curves(out, seeds, lambdas)
    found, flat = claims(table, runs, lambdas), plateau(runs)
    text = markdown(table, seeds, stage_seconds, found, flat)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"seeds": list(seeds), "table": table, "claims": found,
                                                  "plateau": flat, "curves": runs,
                                                  "stage_seconds": stage_seconds or {}}, indent=1))
    plot(table, lambdas, out / "lambda_sweep.png")
    plot_curves(runs, out / "training_curves.png")
    return {"markdown": text, "table": table, "claims": found}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the pipeline's --out directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    profile = json.loads((out / "profile.json").read_text())
    print(write_report(out, seeds=profile["seeds"], lambdas=profile["lambdas"],
                       strong_to_weak=profile.get("strong") is not None)["markdown"])


if __name__ == "__main__":
    main()
