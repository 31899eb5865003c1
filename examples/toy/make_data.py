"""Writes the toy's datasets: per domain and split, a jsonl of rows {prompt, domain, answer, verifier, solution,
num_ops}.

    python examples/toy/make_data.py --out data/toy [--seed 0] [--sizes test=1000 train=5000 ...]
                                     [--math max_ops=5 ...] [--code max_len=8 ...]

Layout under --out:
    <domain>/<split>.jsonl   one domain (math, code)
    <split>.jsonl            both domains, shuffled together
    manifest.json            seed, sizes, difficulty knobs and each file's row count and sha256
(Point a loader at a file or at <domain>/, not at --out itself: that would read every row twice.)

Splits: `pretrain` (prompt + worked `solution`, for the base model's brief pretraining), `train` (prompts for RL and
distillation), `val` (choosing lr and lambda) and `test` (held out). Every prompt is unique across all splits of
all domains. Each domain draws its problems from one seeded stream in the order test, val, train, pretrain, so
growing the training splits never changes the held-out ones. Same seed and arguments -> byte-identical files.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

# Run as a script from a checkout: make the repo root importable (for megatron_gopd and examples.toy).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.toy.tasks import (
    CONFIGS,
    DOMAINS,
    CodeConfig,
    MathConfig,
    Problem,
    concludes,
    config_from_overrides,
    sample,
)
from megatron_gopd.data import write_jsonl

SPLITS = ("test", "val", "train", "pretrain")  # the order problems are drawn in
DEFAULT_SIZES = {"test": 1000, "val": 500, "train": 5000, "pretrain": 20000}  # per domain
MAX_DRAWS_PER_ROW = 50  # a difficulty whose problem space is nearly exhausted fails instead of looping forever


def problem_row(problem: Problem) -> dict[str, str | int]:
    return {"prompt": problem.prompt, "domain": problem.domain, "answer": problem.answer, "verifier": "exact",
            "solution": problem.solution, "num_ops": problem.num_ops}


def generate_domain(domain: str, sizes: Mapping[str, int], seed: int, config: MathConfig | CodeConfig | None,
                    seen: set[str]) -> dict[str, list[dict]]:
    """Rows per split for one domain; prompts already in `seen` are redrawn, and new ones are added to it."""
    rng = random.Random(f"toy-data:{seed}:{domain}")
    splits: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows, draws = [], 0
        while len(rows) < sizes[split]:
            draws += 1
            if draws > MAX_DRAWS_PER_ROW * max(sizes[split], 1):
                raise RuntimeError(f"{domain}/{split}: only {len(rows)} unique prompts after {draws} draws; "
                                   f"the difficulty settings leave too few distinct problems for {sizes[split]}")
            problem = sample(domain, rng, config)
            if problem.prompt not in seen:
                seen.add(problem.prompt)
                rows.append(problem_row(problem))
        splits[split] = rows
    return splits


def check_disjoint(splits: Mapping[str, Sequence[Mapping]]) -> None:
    """Raises if any prompt occurs twice within or across splits (held-out prompts must never be trained on)."""
    where: dict[str, str] = {}
    for name, rows in splits.items():
        for row in rows:
            if row["prompt"] in where:
                raise AssertionError(f"prompt {row['prompt']!r} is in both {where[row['prompt']]} and {name}")
            where[row["prompt"]] = name


def add_careless_answers(rows: list[dict], fraction: float, rng: random.Random) -> None:
    """Ends `fraction` of the worked solutions with another row's answer: the worked steps stay right, the final
    line does not follow from them. A base pretrained on this corpus often writes a final answer that ignores its
    own work, which is what RL on a verifiable reward fixes first (the toy's stand-in for a pretrained model's
    bad habits that RL removes); the `answer` column is never touched. A solution that restates its result first
    (tasks.concludes) is never made careless: writing that line is the habit that protects the answer."""
    answers = sorted({row["answer"] for row in rows})
    for row in rows:
        if rng.random() < fraction and len(answers) > 1 and not concludes(row["solution"]):
            wrong = rng.choice([a for a in answers if a != row["answer"]])
            row["solution"] = row["solution"].rsplit("Answer: ", 1)[0] + f"Answer: {wrong}"


def make_data(out: str | Path, *, seed: int = 0, sizes: Mapping[str, int] | None = None,
              overrides: Mapping[str, Mapping[str, str]] | None = None, careless_fraction: float = 0.0) -> dict:
    """Generates and writes every file (see the module doc); returns the manifest."""
    if not 0.0 <= careless_fraction <= 1.0:
        raise ValueError(f"careless_fraction must be in [0, 1], got {careless_fraction}")
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    for split, n in sizes.items():
        if split not in SPLITS or n < 0:
            raise ValueError(f"bad size {split}={n}: splits are {', '.join(SPLITS)} and sizes must be >= 0")
    configs = {domain: config_from_overrides(domain, dict((overrides or {}).get(domain, {}))) for domain in DOMAINS}
    out = Path(out)

    seen: set[str] = set()
    per_domain = {domain: generate_domain(domain, sizes, seed, configs[domain], seen) for domain in DOMAINS}
    check_disjoint({f"{domain}/{split}": rows for domain, splits in per_domain.items()
                    for split, rows in splits.items()})
    for domain in DOMAINS:
        add_careless_answers(per_domain[domain]["pretrain"], careless_fraction,
                             random.Random(f"toy-data:{seed}:{domain}:careless"))

    files: dict[str, list[dict]] = {}
    for split in SPLITS:
        combined = []
        for domain in DOMAINS:
            files[f"{domain}/{split}.jsonl"] = per_domain[domain][split]
            combined.extend(per_domain[domain][split])
        random.Random(f"toy-data:{seed}:mix:{split}").shuffle(combined)
        files[f"{split}.jsonl"] = combined

    manifest = {"seed": seed, "sizes_per_domain": {s: sizes[s] for s in SPLITS}, "careless_fraction": careless_fraction,
                "difficulty": {domain: dataclasses.asdict(configs[domain]) for domain in DOMAINS}, "files": {}}
    for name, rows in files.items():
        write_jsonl(out / name, rows)
        manifest["files"][name] = {"rows": len(rows),
                                   "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def parse_assignments(items: Sequence[str], what: str) -> dict[str, str]:
    """["a=1", "b=2"] -> {"a": "1", "b": "2"}, naming the bad item on a missing "="."""
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"{what}: expected KEY=VALUE, got {item!r}")
        result[key] = value
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--careless-fraction", type=float, default=0.0,
                        help="pretrain solutions whose final answer is another row's (add_careless_answers)")
    parser.add_argument("--sizes", nargs="+", default=[], metavar="SPLIT=N",
                        help=f"rows per domain; defaults {' '.join(f'{k}={v}' for k, v in DEFAULT_SIZES.items())}")
    for domain in DOMAINS:
        knobs = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(CONFIGS[domain]()).items())
        parser.add_argument(f"--{domain}", nargs="+", default=[], metavar="KNOB=VALUE",
                            help=f"{domain} difficulty; defaults: {knobs}")
    args = parser.parse_args(argv)
    sizes = {}
    for split, n in parse_assignments(args.sizes, "--sizes").items():
        try:
            sizes[split] = int(n)
        except ValueError:
            raise SystemExit(f"--sizes: {split} must be an integer, got {n!r}") from None
    overrides = {domain: parse_assignments(getattr(args, domain), f"--{domain}") for domain in DOMAINS}
    try:
        manifest = make_data(args.out, seed=args.seed, sizes=sizes, overrides=overrides,
                             careless_fraction=args.careless_fraction)
    except (ValueError, RuntimeError) as error:  # bad sizes or knobs, or too few distinct problems
        raise SystemExit(f"error: {error}") from None
    for name, info in manifest["files"].items():
        print(f"{Path(args.out) / name}: {info['rows']} rows")


if __name__ == "__main__":
    main()
