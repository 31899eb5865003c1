"""The toy experiment: the paper's multi-teacher expert merging in miniature, end to end on CPU.

    bash examples/toy/run.sh [--out runs/toy] [--fresh] [--profile full|quick|paper]

Stages, each cached in its own directory under --out (a rerun skips finished stages and resumes an interrupted
trainer run from its last checkpoint; --fresh starts over):
  data          two synthetic domains with exact verifiers (tasks.py), fixed seeds, jsonl splits
  tokenizer     a character tokenizer in HF format with a chat template (tokenizer.py)
  init          a randomly initialised tiny Qwen3, as HF and as a megatron-gopd checkpoint
  pretrain      brief SFT on worked solutions of both domains: a mediocre base
  teachers      GRPO from the base, one run per domain: the domain experts
  hf            the base and the teachers converted to HF (for sampling, ExPO and evaluation)
  samples       each teacher's samples on its domain's train prompts (the SFT baseline's data)
  expo          ExPO, alpha = 0.5: extrapolation from the base through the teachers' mean weights
  distill       back into the base, for each seed: SFT on teacher samples, and G-OPD at each lambda; side by
                side with the evaluation of base, teachers and ExPO on the held-out split, once per seed
  strong        with a strong-to-weak arm (profile.strong): a larger model from its own random init, pretrained
                and GRPO-trained on both domains like the base and the teachers; distilled into the (smaller)
                base with the reference = the student's init, and = the strong teacher's own base (reward correction)
  report        the results table, response lengths, the lambda plot, the G-OPD runs' curves per step and the
                paper's claims with paired-by-seed intervals (report.py)

Every trainer stage is `torchrun -m megatron_gopd.train` on a config written next to its outputs, so the toy
goes through the same code as a cluster run. Distillation uses dedicated teacher ranks when --ranks-per-run
leaves room for them (1 student rank + 1 per teacher) and colocated teachers otherwise, and with one rank more
also a dedicated rollout engine rank (on-policy, rollout.max_staleness 0: the same samples as the student's own
engine); independent runs go side by side, --jobs at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout: examples.toy and tools are importable

from examples.toy import report
from examples.toy.make_data import make_data
from examples.toy.tokenizer import build_tokenizer, corpus_texts

CONFIGS = Path(__file__).parent / "configs"
DOMAINS = ("math", "code")
# the strong-to-weak arm's runs (report.py labels them) -> the trainer run whose final weights are their reference
STRONG_TO_WEAK_REFERENCES = {"s2w-ref-init": "pretrain", "s2w-ref-teacher-base": "pretrain-strong"}


@dataclass(frozen=True)
class StrongToWeak:
    """The strong-to-weak arm (the paper's reward correction): one teacher larger than the student, from a base of
    its own, distilled at lambda `lam` with each of the two references."""

    model: dict[str, int]  # the strong teacher's shape (MODEL's keys)
    lam: float = 1.25
    init_seed: int = 1  # its random init's torch seed (the student's base is from seed 0): another base


@dataclass(frozen=True)
class Profile:
    """How big each stage is. `full` is the README's run; `quick` checks the plumbing in a few minutes; `paper` is
    sized to test the paper's claims."""

    sizes: dict[str, int]  # rows per domain and split
    difficulty: dict[str, dict[str, str]]  # tasks.py knobs per domain
    model: dict[str, int]  # the tiny Qwen3's shape
    pretrain_steps: int
    teacher_steps: int
    distill_steps: int
    seeds: tuple[int, ...]
    lambdas: tuple[float, ...]
    eval_n: int  # avg@n
    # held-out evaluations in each OPD run, evenly spaced, the last at its end (the plateau check); other runs once
    evals_per_run: int = 1
    sft_samples_per_domain: int = 400  # teacher samples for the SFT baseline: more than its steps can use
    careless_fraction: float = 0.5  # of the pretraining solutions (make_data.add_careless_answers says why)
    max_new_tokens: int = 64
    teacher_lr: float = 1e-4  # GRPO's Adam lr: at >= 3e-4 for 40 steps the tiny model collapses
    strong: StrongToWeak | None = None  # the strong-to-weak arm, run for every seed; None: not run

    def __post_init__(self) -> None:
        if self.distill_steps % self.evals_per_run:  # the trainer evaluates every distill_steps / evals_per_run
            raise ValueError(f"evals_per_run ({self.evals_per_run}) must divide distill_steps ({self.distill_steps}):"
                             " the last evaluation must be at the end of the run")


# Easy enough for a 0.8M model to get its worked solution right ~70% of the time after ~300 SFT steps on 2 cores
# (single-digit + and - chains; list moves that need no arithmetic), so that the careless habit, not the skill,
# limits the base.
# Harder settings (1-2 ops with * and operands to 12; strings, map, rot, shift) left a base near 10% that RL could
# not lift in the time.
DIFFICULTY = {
    "math": {"min_ops": "2", "max_ops": "3", "min_operand": "1", "max_operand": "9", "mul_prob": "0",
             "max_value": "30", "detail_prob": "0.3"},
    "code": {"min_ops": "2", "max_ops": "2", "min_len": "3", "max_len": "4", "max_item": "9", "max_arg": "2",
             "string_prob": "0", "list_ops": "rev,sort,take,drop"},
}
# The paper profile's math lets a longer answer earn more (claim 3): 30% of the pretraining solutions restate their
# result before the answer, and those are never careless (tasks.py, check_prob)
PAPER_DIFFICULTY = {**DIFFICULTY, "math": {**DIFFICULTY["math"], "check_prob": "0.3"}}
MODEL = {"hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384, "num_attention_heads": 4,
         "num_key_value_heads": 2}
# the strong teacher: ~3x the base's parameters, the paper's strong-to-weak setting in miniature
STRONG_MODEL = {"hidden_size": 192, "num_hidden_layers": 6, "intermediate_size": 576, "num_attention_heads": 6,
                "num_key_value_heads": 2}
PROFILES = {
    "full": Profile(sizes={"test": 100, "val": 100, "train": 1500, "pretrain": 5000}, difficulty=DIFFICULTY,
                    model=MODEL, pretrain_steps=320, teacher_steps=28, distill_steps=10, seeds=(1, 2, 3),
                    lambdas=(0.5, 1.0, 1.25, 1.5), eval_n=4),
    # the test's pipeline: every stage, each as short as it can be (its numbers mean nothing; the learning itself
    # is shown by the full profile's report and tested where it is robust, tests/test_objectives.py)
    "quick": Profile(sizes={"test": 16, "val": 8, "train": 64, "pretrain": 400}, difficulty=DIFFICULTY,
                     model=MODEL, pretrain_steps=40, teacher_steps=3, distill_steps=2, seeds=(1,),
                     lambdas=(1.0, 1.25), eval_n=2, evals_per_run=2, sft_samples_per_domain=16, teacher_lr=3e-4,
                     strong=StrongToWeak(STRONG_MODEL)),
    # the paper's claims with enough power to see them (issue 25): 8 seeds and 4 x 500 held-out answers per domain
    # for paired-by-seed intervals; 64 distillation steps, twice where OPD levelled off at its teachers in a probe
    # of these settings (seed 1, math / code avg@4 every 8 steps: 33.8 / 22.1 at the start, 47.6 / 41.1 at step 8,
    # 48.0 / 44.9 at 24, 51.8 / 46.8 at 32, 51.4 / 46.8 at 40, 53.7 / 46.0 at 48; teachers 52.5 on math, 47.3 on
    # code), evaluated at 32 as well to show the plateau; lambda up to 2
    "paper": Profile(sizes={"test": 500, "val": 100, "train": 1500, "pretrain": 5000}, difficulty=PAPER_DIFFICULTY,
                     model=MODEL, pretrain_steps=320, teacher_steps=28, distill_steps=64, seeds=tuple(range(1, 9)),
                     lambdas=(0.5, 1.0, 1.25, 1.5, 2.0), eval_n=4, evals_per_run=2, sft_samples_per_domain=1024,
                     strong=StrongToWeak(STRONG_MODEL)),
}


@dataclass
class Job:
    """One command; <out>/logs/<name>.log keeps its output and <name>.done records its success for reruns."""

    name: str
    cmd: list[str]
    nproc: int = 1
    steps: int = 1  # progress units: a trainer run's steps, read from its metrics.jsonl as it goes
    metrics: Path | None = None

    def progress(self) -> int:
        if self.metrics is None or not self.metrics.exists():
            return 0
        lines = self.metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0


@dataclass
class Pipeline:
    out: Path
    profile: Profile
    jobs: int
    ranks_per_run: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    configs: ClassVar[Path] = CONFIGS  # where trainer_job's templates live

    # ---- paths -----------------------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def data(self, name: str) -> str:
        return str(self.path("data", name))

    def checkpoint(self, run: str) -> str:
        """The final checkpoint of a finished trainer run (its `latest` pointer, resolved)."""
        checkpoints = self.path("runs", run, "checkpoints")
        return str(checkpoints / (checkpoints / "latest").read_text().strip())

    # ---- the stages ------------------------------------------------------------------------------------------
    def run(self) -> None:
        start = time.time()
        for stage in (self.make_data, self.make_tokenizer, self.init_model, self.pretrain, self.train_teachers,
                      self.convert_models, self.sample_teachers, self.expo, self.distill_and_evaluate):
            self.timed(stage)
        self.stage_seconds["total"] = time.time() - start
        self.timed(self.report)

    def timed(self, stage: Callable[[], None]) -> None:
        began = time.time()
        stage()
        self.stage_seconds[stage.__name__] = time.time() - began

    def make_data(self) -> None:
        if not self.path("data", "manifest.json").exists():
            make_data(self.path("data"), seed=0, sizes=self.profile.sizes, overrides=self.profile.difficulty,
                      careless_fraction=self.profile.careless_fraction)

    def make_tokenizer(self) -> None:
        if not self.path("tokenizer", "tokenizer.json").exists():
            build_tokenizer(corpus_texts(self.path("data"))).save_pretrained(self.path("tokenizer"))

    def random_inits(self) -> dict[str, tuple[dict[str, int], int]]:
        """Each random init -> (its shape, its torch seed): the student's base, and the strong teacher's own."""
        inits = {"init": (self.profile.model, 0)}
        if self.profile.strong:
            inits["init-strong"] = (self.profile.strong.model, self.profile.strong.init_seed)
        return inits

    def init_model(self) -> None:
        todo = {name: init for name, init in self.random_inits().items() if not self.done(name)}
        if not todo:
            return
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path("tokenizer"))
        jobs = []
        for name, (dims, seed) in todo.items():
            config = AutoConfig.for_model(
                "qwen3", vocab_size=len(tokenizer), head_dim=dims["hidden_size"] // dims["num_attention_heads"],
                max_position_embeddings=4 * self.profile.max_new_tokens, tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, **dims)
            torch.manual_seed(seed)
            hf = self.path("models", f"{name}-hf")
            AutoModelForCausalLM.from_config(config).save_pretrained(hf)
            tokenizer.save_pretrained(hf)
            jobs.append(Job(name, [sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", str(hf),
                                   "--save-dir", str(self.path("models", name))]))
        self.run_jobs("init", jobs)

    def pretrain(self) -> None:
        """The student's base (run `pretrain`), and the strong teacher's (`pretrain-strong`: the same corpus and steps,
        from its own init)."""
        self.run_jobs("pretrain", [self.trainer_job(name.replace("init", "pretrain"), "pretrain.yaml",
                                                    nproc=self.jobs, settings={
            "student.path": str(self.path("models", name)),
            "data.train": [self.data("pretrain.jsonl")],
            "train.steps": self.profile.pretrain_steps,
        }) for name in self.random_inits()])

    def train_teachers(self) -> None:
        """A domain expert per domain from the base; the strong teacher from its own base on both domains."""
        bases = {f"teacher-{d}": ("pretrain", [f"{d}/train.jsonl"]) for d in DOMAINS}
        if self.profile.strong:
            bases["teacher-strong"] = ("pretrain-strong", ["train.jsonl"])
        self.run_jobs("teachers", [self.trainer_job(name, "teacher.yaml", settings={
            "student.path": self.checkpoint(base),
            "data.train": [self.data(f) for f in files],
            "train.steps": self.profile.teacher_steps,
            "optim.lr": self.profile.teacher_lr,
        }) for name, (base, files) in bases.items()])

    def convert_models(self) -> None:
        self.run_jobs("hf", [Job(f"{name}-hf", [sys.executable, "tools/convert_megatron_to_hf.py", "--load-dir",
                                                 self.checkpoint(run), "--save-dir", str(self.path("models", name))])
                             for name, run in self.hf_models().items()])

    def hf_models(self) -> dict[str, str]:
        """The models evaluated by the pipeline itself (in HF format): HF name -> trainer run."""
        teachers = [*(f"teacher-{d}" for d in DOMAINS), *(["teacher-strong"] if self.profile.strong else [])]
        return {"base": "pretrain", **{name: name for name in teachers}}

    def sample_teachers(self) -> None:
        self.run_jobs("samples", [Job(f"samples-{d}", [
            sys.executable, "tools/generate.py", "--model", str(self.path("models", f"teacher-{d}")),
            "--data", self.data(f"{d}/train.jsonl"), "--out", self.data(f"samples/{d}.jsonl"),
            "--max-new-tokens", str(self.profile.max_new_tokens),
            "--max-prompts", str(self.profile.sft_samples_per_domain)]) for d in DOMAINS])

    def expo(self) -> None:
        self.run_jobs("expo", [Job("expo", [
            sys.executable, "tools/expo.py", "--student", str(self.path("models", "base")), "--teachers",
            *(str(self.path("models", f"teacher-{d}")) for d in DOMAINS), "--alpha", "0.5",
            "--out", str(self.path("models", "expo"))])])

    def distill_and_evaluate(self) -> None:
        """The distillation runs, and the evaluation of the models that have no trainer run of their own, in one
        pool, longest jobs first (G-OPD, evaluations, SFT): the short ones fill the cores the last long ones leave
        idle."""
        gopd, sft = self.distill_jobs()
        self.run_jobs("distill", gopd + self.evaluation_jobs() + sft)

    def distill_jobs(self) -> tuple[list[Job], list[Job]]:
        """The G-OPD runs (the lambda sweep, then the strong-to-weak arm), and the SFT runs."""
        gopd, sft = [], []
        nproc, placement = self.gopd_placement({d: (f"teacher-{d}", [d]) for d in DOMAINS}, reference="pretrain")
        for seed in self.profile.seeds:
            sft.append(self.trainer_job(f"sft-s{seed}", "distill.yaml", settings={
                **self.distill_settings(seed), "algo.name": "sft", "teachers": [],
                "data.train": [self.data(f"samples/{d}.jsonl") for d in DOMAINS], "data.response_key": "response"}))
            for lam in self.profile.lambdas:
                gopd.append(self.trainer_job(f"gopd-lam{lam:g}-s{seed}", "distill.yaml", nproc=nproc, settings={
                    **self.distill_settings(seed, lam == 1.0), **placement, "algo.lam": lam}))
        if self.profile.strong:
            strong = {"strong": ("teacher-strong", list(DOMAINS))}
            for name, reference in STRONG_TO_WEAK_REFERENCES.items():
                nproc, placement = self.gopd_placement(strong, reference)
                gopd += [self.trainer_job(f"{name}-s{seed}", "distill.yaml", nproc=nproc, settings={
                    **self.distill_settings(seed), **placement, "algo.lam": self.profile.strong.lam})
                    for seed in self.profile.seeds]
        return gopd, sft

    def gopd_placement(self, teachers: dict[str, tuple[str, list[str]]], reference: str) -> tuple[int, dict]:
        """The ranks of a G-OPD run and where its teachers (name -> (trainer run, domains)), reference (a trainer
        run) and rollout engine live, from --ranks-per-run: 1 student rank, + 1 per teacher when they fit, + 1
        rollout engine rank when that fits too."""
        dedicated = self.ranks_per_run >= 1 + len(teachers)
        rollout = self.ranks_per_run >= 2 + len(teachers)
        settings = {"teachers": [{"name": name, "path": self.checkpoint(run), "domains": domains,
                                  "placement": "dedicated" if dedicated else "colocated"}
                                 for name, (run, domains) in teachers.items()],
                    # named even when it is the student's init (the base): then lambda = 1 runs it too (it cancels
                    # there) and logs the reward log pi_T - log pi_ref that the report plots for every lambda
                    "reference.path": self.checkpoint(reference),
                    "rollout.placement": "dedicated" if rollout else "colocated", "rollout.engines": 1}
        return 1 + len(teachers) * dedicated + rollout, settings

    def distill_settings(self, seed: int, plateau_check: bool = False) -> dict:
        """A distillation run's settings; OPD's runs (plateau_check) evaluate evals_per_run times, the others only at
        their end: the held-out evaluations cost as much as the training itself."""
        evaluations = self.profile.evals_per_run if plateau_check else 1
        return {"student.path": self.checkpoint("pretrain"), "data.train": [self.data("train.jsonl")],
                "train.steps": self.profile.distill_steps, "train.seed": seed, **self.eval_settings(),
                "eval.interval": self.profile.distill_steps // evaluations}

    def eval_settings(self) -> dict:
        return {"data.eval": [self.data(f"{d}/test.jsonl") for d in DOMAINS],
                "eval.n": self.profile.eval_n, "eval.max_prompts": len(DOMAINS) * self.profile.sizes["test"],
                "rollout.max_new_tokens": self.profile.max_new_tokens}

    def evaluation_jobs(self) -> list[Job]:
        """The base, the teachers and ExPO, evaluated like a trainer's final evaluation: one process per model for
        all seeds."""
        return [Job(f"{name}-eval", [
            sys.executable, "tools/evaluate.py", "--model", str(self.path("models", name)),
            "--data", *self.eval_settings()["data.eval"], "--n", str(self.profile.eval_n),
            "--seed", *map(str, self.profile.seeds), "--max-new-tokens", str(self.profile.max_new_tokens),
            "--out", str(self.path("eval", f"{name}-s{{seed}}.json"))]) for name in [*self.hf_models(), "expo"]]

    def report(self) -> None:
        results = report.write_report(self.out, seeds=self.profile.seeds, lambdas=self.profile.lambdas,
                                      strong_to_weak=self.profile.strong is not None,
                                      stage_seconds=self.stage_seconds)
        print(results["markdown"])

    # ---- running commands ------------------------------------------------------------------------------------
    def trainer_job(self, name: str, template: str, settings: dict, nproc: int = 1) -> Job:
        workdir = self.path("runs", name)
        config = yaml.safe_load((self.configs / template).read_text())
        for dotted, value in {**settings, "train.output_dir": str(workdir)}.items():
            *parents, leaf = dotted.split(".")
            node = config
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        workdir.mkdir(parents=True, exist_ok=True)
        # the trainer writes its resolved config.yaml there; this file is what the pipeline asked for
        (workdir / "pipeline.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        return Job(name, [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                          "-m", "megatron_gopd.train", "--config", str(workdir / "pipeline.yaml")], nproc,
                   steps=config["train"]["steps"], metrics=workdir / "metrics.jsonl")

    def run_jobs(self, stage: str, jobs: list[Job]) -> None:
        """Runs the unfinished jobs, as many at once as fit in --jobs ranks; raises with the log of a failure."""
        todo = [job for job in jobs if not self.done(job.name)]
        if not todo:
            print(f"[{stage}] cached")
            return
        width = max(1, self.jobs // max(job.nproc for job in todo))
        with ThreadPoolExecutor(max_workers=width) as pool, \
                tqdm(total=sum(job.steps for job in todo), desc=stage, dynamic_ncols=True,
                     unit="step" if any(job.metrics for job in todo) else "job") as bar:
            running = {pool.submit(self.run_job, job): job for job in todo}
            while running:
                finished, _ = wait(running, timeout=2, return_when=FIRST_COMPLETED)
                for future in finished:
                    running.pop(future)
                    future.result()  # a failed job raises here, with its errors
                bar.n = sum(job.steps if self.done(job.name) else min(job.progress(), job.steps) for job in todo)
                bar.set_postfix_str(f"{len(running)} of {len(todo)} jobs to finish")

    def done(self, job_name: str) -> bool:
        return self.path("logs", f"{job_name}.done").exists()

    def run_job(self, job: Job) -> Job:
        log = self.path("logs", f"{job.name}.log")
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        with open(log, "a") as f:
            f.write(f"$ {' '.join(job.cmd)}\n")
            f.flush()
            proc = subprocess.run(job.cmd, check=False, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:  # torchrun's own report ends the log: show the ranks' errors instead
            errors = [line for line in log.read_text(errors="replace").splitlines()
                      if ("Error" in line or "error:" in line) and "torch/distributed" not in line]
            raise RuntimeError(f"{job.name} failed (exit {proc.returncode}); its log is {log}. Errors:\n"
                               + "\n".join(dict.fromkeys(errors[-5:])))
        self.path("logs", f"{job.name}.done").touch()
        return job


def pipeline_arguments(description: str, default_out: Path, profiles: dict) -> argparse.ArgumentParser:
    """The options every example pipeline takes: where it writes, its profile, starting over, parallel jobs."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(default_out), help="where every stage writes")
    parser.add_argument("--profile", choices=sorted(profiles), default="full")
    parser.add_argument("--fresh", action="store_true", help="delete --out first and redo every stage")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="processes to run at once (default: the CPUs this process may use)")
    return parser


def prepare_out(args: argparse.Namespace, profile) -> Path:
    """--out, emptied with --fresh, and holding `profile` (a dataclass): cached stages of another profile there would
    mix into this run, so that stops with how to proceed."""
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    recorded, wanted = out / "profile.json", json.dumps(dataclasses.asdict(profile), indent=1)
    if recorded.exists() and recorded.read_text() != wanted:
        sys.exit(f"error: {out} holds a run with other settings than --profile {args.profile} (see {recorded}); "
                 "pass --fresh to redo it, or another --out")
    recorded.write_text(wanted)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = pipeline_arguments(__doc__, ROOT / "runs" / "toy", PROFILES)
    parser.add_argument("--ranks-per-run", type=int, default=1,
                        help="ranks per G-OPD run: 3 gives each teacher a dedicated rank, 4 also the rollout engine")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    out = prepare_out(args, profile)
    Pipeline(out, profile, jobs=max(1, args.jobs), ranks_per_run=args.ranks_per_run).run()


if __name__ == "__main__":
    main()
