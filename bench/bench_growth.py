"""Growth: step time and peak memory of one G-OPD training step against the response length (256 to 4096).

One step on the tiny Llama student (world 1, local layer spec, fp32), a batch of BATCH sequences of PROMPT prompt
tokens plus L response tokens: the teacher's forward (a tiny teacher) and the student's pi_old forward, the G-OPD
advantages (lambda = 1), then the student's forward + backward with the G-OPD policy loss and the optimizer step
(TrainableModel.train_step, megatron's schedule and optimizer).

Each length runs in a FRESH process (forked from a parent that has only imported the libraries), after one warm-up
step that allocates the optimizer state. Peak memory = the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs right before the measured steps) minus the resident set before them: what the step adds on
top of the resident models and optimizer. Lines are fitted to time and memory against L; R^2 and each point's
deviation from the line say where growth is not linear.

    python bench/bench_growth.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BENCH, describe, emit, linear_fit, md_table, num_params, proc_status_kib, reset_peak_rss, run_script, spread,
    summary, write_hf_config_dir,
)

LENGTHS = (256, 512, 1024, 2048, 4096)
BATCH, PROMPT = 2, 16
MAX_POSITIONS = 4352  # room for PROMPT + 4096


def _measure(hf_dir: str, length: int, steps: int, conn) -> None:
    """Runs in the forked child: builds the models, warms up, then measures `steps` steps."""
    import torch

    from megatron_gopd.algo.gopd import PolicyLossConfig, gopd_advantages, loss_denominator, policy_loss
    from megatron_gopd.config import OptimConfig
    from megatron_gopd.models.architectures import ModelDims
    from megatron_gopd.models.builder import build_model
    from megatron_gopd.models.parallel_model import ParallelModel, TrainableModel
    from megatron_gopd.runtime.distributed import init_distributed
    from megatron_gopd.runtime.layout import ParallelShape, build_layout

    try:
        init_distributed()
        layout = build_layout(ParallelShape())
        dims = ModelDims.from_hf(hf_dir)
        student = TrainableModel(build_model(dims, layout.student.pgc, seed=0), dims, OptimConfig(lr=1e-5),
                                 layout.student.world, total_steps=steps + 1)
        teacher = ParallelModel(build_model(dims, layout.student.pgc, seed=1).requires_grad_(False).eval(), dims)
        g = torch.Generator().manual_seed(length)
        tokens = torch.randint(3, 250, (BATCH, PROMPT + length), generator=g)
        mask = torch.zeros(BATCH, PROMPT + length)
        mask[:, PROMPT:] = 1.0
        cfg = PolicyLossConfig(aggregation="token-mean")

        def step() -> None:
            mb = {"tokens": tokens, "loss_mask": mask}
            teacher_lp = teacher.token_logprobs([mb])[0]
            mb["old_lp"] = mb["rollout_lp"] = student.token_logprobs([mb])[0]
            mb["advantages"] = torch.where(mask.bool(), gopd_advantages(teacher_lp, mb["old_lp"], None, 1.0), 0.0)
            denominator = loss_denominator(mask, cfg.aggregation)

            def loss_fn(batch, lp, entropy, logits):
                return policy_loss(lp, batch["old_lp"], batch["advantages"], batch["loss_mask"], cfg,
                                   rollout_lp=batch["rollout_lp"], denominator=denominator)

            _, info = student.train_step([mb], loss_fn, temperature=1.0)
            assert info["update_ok"], info

        step()  # warm-up: the optimizer state and megatron's buffers
        base_kib = reset_peak_rss()
        seconds = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            seconds.append(time.perf_counter() - start)
        conn.send({"length": length, "seconds": seconds,
                   "peak_extra_mib": (proc_status_kib("VmHWM") - base_kib) / 1024,
                   "peak_rss_mib": proc_status_kib("VmHWM") / 1024})
    except BaseException as e:  # the parent reports it
        conn.send({"length": length, "error": f"{type(e).__name__}: {e}"})
        raise


def _worker(quick: bool) -> dict:
    import multiprocessing
    import tempfile

    import megatron.core  # noqa: F401  the children inherit the imports, not any state
    import torch

    import megatron_gopd.models.parallel_model  # noqa: F401

    steps = 1 if quick else 3
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(write_hf_config_dir("tiny", Path(tmp) / "tiny", max_position_embeddings=MAX_POSITIONS))
        fork = multiprocessing.get_context("fork")
        for length in LENGTHS:
            parent, child = fork.Pipe()
            proc = fork.Process(target=_measure, args=(hf_dir, length, steps, child))
            proc.start()
            point = parent.recv()
            proc.join()
            if "error" in point or proc.exitcode != 0:
                raise RuntimeError(f"length {length}: {point.get('error', f'exit code {proc.exitcode}')}")
            points.append(point)
    return {"model": describe("tiny"), "params": num_params("tiny"), "threads": torch.get_num_threads(),
            "points": points}


def run(quick: bool) -> dict:
    result = run_script(BENCH / "bench_growth.py", "--worker", "quick" if quick else "full")
    xs = [p["length"] for p in result["points"]]
    for p in result["points"]:
        p["seconds"] = summary(p["seconds"])
    result["time_fit"] = linear_fit(xs, [p["seconds"]["median"] for p in result["points"]])
    result["memory_fit"] = linear_fit(xs, [p["peak_extra_mib"] for p in result["points"]])
    # the same fits without the longest length: where the curve bends
    result["time_fit_to_2048"] = linear_fit(xs[:-1], [p["seconds"]["median"] for p in result["points"]][:-1])
    result["memory_fit_to_2048"] = linear_fit(xs[:-1], [p["peak_extra_mib"] for p in result["points"]][:-1])
    # per-token cost against the shortest length: 1.0 everywhere is linear growth
    first = result["points"][0]
    for p in result["points"]:
        p["time_per_token_vs_256"] = (p["seconds"]["median"] / p["length"]) / (first["seconds"]["median"] / first["length"])
        p["memory_per_token_vs_256"] = (p["peak_extra_mib"] / p["length"]) / (first["peak_extra_mib"] / first["length"])
    return result


def to_markdown(result: dict) -> str:
    tf, mf = result["time_fit"], result["memory_fit"]
    rows = [[p["length"], spread(p["seconds"]), f"{p['time_per_token_vs_256']:.2f}", f"{tf['rel_dev'][i]:+.0%}",
             f"{p['peak_extra_mib']:.0f}", f"{p['memory_per_token_vs_256']:.2f}", f"{mf['rel_dev'][i]:+.0%}",
             f"{p['peak_rss_mib']:.0f}"] for i, p in enumerate(result["points"])]
    table = md_table(["response tokens", "step s", "s/token vs 256", "time vs line", "step peak MiB",
                      "MiB/token vs 256", "memory vs line", "process peak RSS MiB"], rows)
    t2, m2 = result["time_fit_to_2048"], result["memory_fit_to_2048"]
    return (f"Growth: one G-OPD step (teacher + pi_old forwards, student forward+backward, optimizer), batch "
            f"{BATCH} x ({PROMPT} prompt + L response) tokens, {result['model']} ({result['params'] / 1e6:.2f}M "
            f"params), fresh process per length. Linear fits over 256-4096: time R^2 {tf['r2']:.3f}, memory R^2 "
            f"{mf['r2']:.3f}; over 256-2048: time R^2 {t2['r2']:.3f}, memory R^2 {m2['r2']:.3f}.\n\n{table}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=["quick", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        emit(_worker(args.worker == "quick"))
        return
    print(to_markdown(run(args.quick)))


if __name__ == "__main__":
    main()
