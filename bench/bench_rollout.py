"""Rollout: our transformers engine (HFRolloutEngine), eager and compiled, against `transformers.generate`, and the
weight-sync cost.

Generation: batch 16, exactly 128 new tokens (the tokenizer's EOS lies outside the model's vocabulary, and our
engine gets no stop ids), temperature 1, no top-k/top-p, on the tiny Llama, fp32. Every side returns the sampled
tokens AND their log-probs (generate with output_scores + compute_transition_scores), which is what a rollout
needs; plain generate (tokens only) is timed too. The engine runs twice: eager (a DynamicCache, as before) and
compiled (rollout.compile: a StaticCache and a torch.compile'd decode step, one shape bucket here). The compiled
engine's warm-up call compiles: its compile seconds (wall, the compile's worker processes included) are reported
apart, cold (an empty inductor cache of the worker's own; at the smoke size the machine's cache) and warm (dynamo
reset, a second compiled engine compiles from inductor's cache, as a later run on the machine does), with the break-even decode steps (compile seconds over the seconds a step
saves against the eager engine) and the tokens/s over the measured calls with the cold compile counted in. Calls alternate (ABCD, BCDA, ...) after one
warm-up call each; the ratios are taken per round. Time is the process's CPU seconds per call (one thread: on an
idle machine it equals the wall time, on a shared one it leaves out the waits for a core); the wall-clock ratio is
reported beside it.

The generation runs twice: first in a clean process, then (engine and generate+logprobs) with megatron_gopd's CPU
compatibility layer active (its process-wide TorchFunctionMode, which every training process on CPU has), which
shows what that layer costs our engine inside the trainer.

Weight sync: `ColocatedRollout.sync_weights()` (the streaming exporter -> the engine's parameters, one 512 MiB
bucket bound) on a world-1 Megatron student, in seconds per sync and GB/s of exported weights.

    python bench/bench_rollout.py [--size smoke|quick|full]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (
    BENCH,
    by_size,
    checkpoints,
    cli,
    describe,
    md_table,
    num_params,
    ratio_summary,
    run_script,
    spread,
    summary,
    timed,
    verdict,
    write_hf_config_dir,
)

BATCH, NEW_TOKENS = 16, 128
TARGET = 1.5  # compiled engine tokens/s at least 1.5x generate+logprobs'
ENGINES = ("engine", "engine compiled")
BASELINES = ("generate+logprobs", "generate")
# Sync sizes beyond the tiny student (random weights: the sync cost does not depend on their values).
SYNC_SIZES = {
    "tiny": None,  # the converted tiny student checkpoint
    "llama-56M": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
                  "intermediate_size": 1408, "vocab_size": 32000},
    "llama-0.25B": {"hidden_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 16,
                    "num_key_value_heads": 8, "intermediate_size": 2816, "vocab_size": 32000},
}
QUICK_SYNC = ("tiny", "llama-56M")


def _prompts(n: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(5, 250, (4 + i % 9,), generator=g).tolist() for i in range(n)]


def _generation_rounds(engines: dict, model, prompts, rounds: int, which: tuple[str, ...]) -> dict:
    import dataclasses

    import torch

    from megatron_gopd.rollout.base import SamplingParams

    params = SamplingParams(temperature=1.0, max_new_tokens=NEW_TOKENS, stop_token_ids=())
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left-padded, as generate wants for a decoder-only model
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1

    def engine_call(engine, seed: int) -> None:
        samples = engine.generate(prompts, dataclasses.replace(params, seed=seed))
        assert all(len(s.response_ids) == NEW_TOKENS for s in samples)

    @torch.no_grad()
    def generate_call(seed: int, with_logprobs: bool) -> None:
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=NEW_TOKENS,
                             temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, output_scores=with_logprobs,
                             return_dict_in_generate=True)
        assert out.sequences.shape[1] == longest + NEW_TOKENS
        if with_logprobs:
            model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)

    methods = {name: (lambda s, e=engine: engine_call(e, s)) for name, engine in engines.items()}
    methods |= {"generate+logprobs": lambda s: generate_call(s, True), "generate": lambda s: generate_call(s, False)}
    names = [n for n in methods if n in which]
    warmup = {name: timed(methods[name], 0) for name in names}  # the compiled engine's compiles here
    runs = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(timed(methods[name], r + 1))
    tokens = len(prompts) * NEW_TOKENS
    out = {clock: {"tokens_per_s": {n: summary([tokens / x[clock] for x in runs[n]]) for n in names},
                   "ratios": {e: {b: ratio_summary([x[clock] for x in runs[b]], [x[clock] for x in runs[e]])
                                  for b in names if b not in ENGINES or b == "engine" and e != b}
                              for e in ENGINES if e in names}}
           for clock in ("cpu", "wall")}
    out["warmup_wall_s"] = {n: warmup[n]["wall"] for n in names}
    return out


def _compile_payoff(result: dict, compile_s: dict) -> dict:
    """What the compile costs against what it saves, in wall seconds (the compile runs in worker processes too):
    cold (an empty inductor cache, as a machine's first run) and warm (inductor's cache holds the graph)."""
    wall = result["wall"]["tokens_per_s"]
    step_s = {e: BATCH / wall[e]["median"] for e in ENGINES}  # one decode step = BATCH tokens
    saved = step_s["engine"] - step_s["engine compiled"]
    calls = wall["engine compiled"]["n"]
    return {"compile_s": compile_s, "step_ms": {e: 1e3 * s for e, s in step_s.items()},
            "break_even_decode_steps": {k: s / saved if saved > 0 else float("inf") for k, s in compile_s.items()},
            "amortised_tokens_per_s": BATCH * NEW_TOKENS * calls / (calls * NEW_TOKENS * step_s["engine compiled"]
                                                                    + compile_s["cold"])}


def _sync(name: str, root: Path, tmp: Path, reps: int) -> dict:
    import torch

    from megatron_gopd.checkpoint import load_model
    from megatron_gopd.models.architectures import ModelDims
    from megatron_gopd.models.builder import build_model
    from megatron_gopd.models.export import ExportStats, export_hf_weights
    from megatron_gopd.rollout.colocated import ColocatedRollout
    from megatron_gopd.rollout.hf_engine import HFRolloutEngine
    from megatron_gopd.runtime.layout import ParallelShape, build_layout

    overrides = SYNC_SIZES[name]
    hf_dir = root / "hf" / "student" if overrides is None else write_hf_config_dir("tiny", tmp / name, **overrides)
    layout = build_layout(ParallelShape())
    dims = ModelDims.from_hf(hf_dir)
    gpt = build_model(dims, layout.student.pgc)
    if overrides is None:
        load_model(root / "student", gpt, group=layout.student.world)
    rollout = ColocatedRollout(HFRolloutEngine(str(hf_dir)), gpt, dims, bucket_bytes=512 << 20)
    stats = ExportStats()
    for _ in export_hf_weights(gpt, dims, bucket_bytes=512 << 20, stats=stats):
        pass
    rollout.sync_weights()  # warm-up
    seconds = []
    for _ in range(reps):
        start = time.perf_counter()
        rollout.sync_weights()
        seconds.append(time.perf_counter() - start)
    with torch.no_grad():  # the sync really moved the student's weights
        engine_params = dict(rollout.engine.model.named_parameters())
        name0, tensor0 = next(export_hf_weights(gpt, dims))
        assert torch.equal(engine_params[name0], tensor0)
    s = summary(seconds)
    return {"model": name, "params": sum(p.numel() for p in gpt.parameters()), "bytes": stats.total_bytes,
            "seconds": s, "gb_per_s": stats.total_bytes / s["median"] / 1e9, "peak_bucket_bytes": stats.peak_bytes}


def _worker(size: str) -> dict:
    import os
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from megatron_gopd.rollout.base import SamplingParams
    from megatron_gopd.rollout.hf_engine import HFRolloutEngine
    from megatron_gopd.runtime.distributed import init_distributed

    root = checkpoints()
    hf_dir = root / "hf" / "student"
    inductor_cache = tempfile.TemporaryDirectory()
    if size != "smoke":  # the cold compile a machine's first run pays; smoke keeps the machine's cache (seconds)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache.name
    engines = {name: HFRolloutEngine.from_pretrained(str(hf_dir), compile=name == "engine compiled")
               for name in ENGINES}
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompts = _prompts(BATCH)
    all_methods = ENGINES + BASELINES
    result = {"model": describe("tiny"), "params": num_params("tiny"), "threads": torch.get_num_threads(),
              "clean": _generation_rounds(engines, model, prompts, by_size(size, smoke=1, quick=6, full=12),
                                          all_methods)}
    init_distributed()  # applies the CPU compatibility layer, as in every training process
    result["with_cpu_compat"] = _generation_rounds(engines, model, prompts, by_size(size, smoke=1, quick=4, full=8),
                                                    all_methods[:3])
    # A warm compile, as a later process on the same machine pays: dynamo forgets its compiled code, inductor's cache
    # keeps the kernels.
    torch.compiler.reset()
    warm = HFRolloutEngine.from_pretrained(str(hf_dir), compile=True)
    warm.generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, seed=0))  # the same shape bucket
    result["compile"] = _compile_payoff(result["clean"], {"cold": engines["engine compiled"].compile_seconds,
                                                          "warm": warm.compile_seconds})
    result["compile"]["cold_cache"] = size != "smoke"

    with tempfile.TemporaryDirectory() as tmp:
        result["sync"] = [_sync(name, root, Path(tmp), by_size(size, smoke=1, quick=3, full=5))
                          for name in by_size(size, smoke=("tiny",), quick=QUICK_SYNC, full=SYNC_SIZES)]
    return result


def run(size: str) -> dict:
    """Generation throughput of the engines and generate (clean process and under the CPU compat layer), the
    compile's cost, and sync costs."""
    result = run_script(BENCH / "bench_rollout.py", "--worker", size)
    result["meets_target"] = headline_ratio(result)["median"] >= TARGET
    return result


def headline_ratio(result: dict) -> dict:
    return result["clean"]["cpu"]["ratios"]["engine compiled"]["generate+logprobs"]


def to_markdown(result: dict) -> str:
    rows = []
    for label, key in (("clean process", "clean"), ("CPU compat layer on", "with_cpu_compat")):
        cpu, wall = result[key]["cpu"], result[key]["wall"]
        for engine in ENGINES:
            tps, ratios = cpu["tokens_per_s"], cpu["ratios"][engine]
            rows.append([label, engine, spread(tps[engine], "{:.0f}")]
                        + [spread(ratios[b], "{:.2f}") if b in ratios else "-"
                           for b in ("engine",) + BASELINES]
                        + [spread(wall["ratios"][engine]["generate+logprobs"], "{:.2f}")])
    baselines = "; ".join(f"{label}: " + ", ".join(f"{b} {spread(result[key]['cpu']['tokens_per_s'][b], '{:.0f}')}"
                                                   for b in BASELINES if b in result[key]["cpu"]["tokens_per_s"])
                          for label, key in (("clean", "clean"), ("compat layer on", "with_cpu_compat")))
    gen = md_table(["process", "engine", "tok/s", "/ eager engine", "/ generate+logprobs", "/ generate",
                    "/ generate+logprobs, wall clock"], rows)
    c = result["compile"]
    cold, warm = c["break_even_decode_steps"]["cold"], c["break_even_decode_steps"]["warm"]
    first = "cold (empty inductor cache)" if c["cold_cache"] else "first (the machine's inductor cache)"
    payoff = (f"Compile of one shape bucket (wall, in the warm-up call): {first} {c['compile_s']['cold']:.1f} s, warm (dynamo reset, from inductor's cache) "
              f"{c['compile_s']['warm']:.1f} s. Decode step (batch {BATCH}, wall): eager {c['step_ms']['engine']:.2f} "
              f"ms, compiled {c['step_ms']['engine compiled']:.2f} ms, so the compile pays after {cold:.0f} decode "
              f"steps cold ({cold / NEW_TOKENS:.0f} calls of {NEW_TOKENS} tokens), {warm:.0f} warm; over this "
              f"section's {result['clean']['wall']['tokens_per_s']['engine compiled']['n']} measured calls with the "
              f"cold compile counted in, the compiled engine made {c['amortised_tokens_per_s']:.0f} tok/s (eager "
              f"{result['clean']['wall']['tokens_per_s']['engine']['median']:.0f}).")
    sync = md_table(["student", "params", "MB exported", "sync s/step (wall)", "GB/s"], [
        [s["model"], f"{s['params'] / 1e6:.2f}M", f"{s['bytes'] / 1e6:.1f}", spread(s["seconds"], "{:.4f}"),
         f"{s['gb_per_s']:.2f}"] for s in result["sync"]])
    return (f"Rollout, batch {BATCH} x exactly {NEW_TOKENS} new tokens, {result['model']} "
            f"({result['params'] / 1e6:.2f}M params), fp32, {result['threads']} thread. Tokens/s and ratios from "
            f"the process's CPU seconds per call (wall-clock ratio in the last column); ratios are the engine's tok/s "
            f"over the baseline's, per round: median (min-max, n). Baselines, tok/s: {baselines}. Target compiled "
            f"engine >= {TARGET}x generate+logprobs in a clean process: {verdict(result['meets_target'])}.\n\n{gen}"
            f"\n\n{payoff}\n\nWeight sync (ColocatedRollout.sync_weights, world 1, fp32, one 512 MiB bucket "
            f"bound):\n\n{sync}")


def notes(result: dict) -> str:
    ratio = headline_ratio(result)
    eager = result["clean"]["cpu"]["ratios"]["engine"]["generate+logprobs"]
    return (f"**Compiled rollout engine {ratio['median']:.2f}x generate+logprobs ({ratio['min']:.2f}-{ratio['max']:.2f} "
            f"per round; eager engine {eager['median']:.2f}x), target {TARGET}x.** At {result['params'] / 1e6:.2f}M "
            f"parameters the decode step is Python and kernel-launch overhead plus attention over the static cache's "
            f"padded length. *Would close it:* fewer launches per step (inductor's C++ wrapper, CUDA graphs on a GPU), "
            f"or on a GPU the SGLang engine.")


if __name__ == "__main__":
    cli(__doc__, _worker, lambda size: to_markdown(run(size)))
