"""Training checkpoints at DP=2 with the distributed optimizer: exact resume, and every way a save can go wrong.

--phase first (ends killed by SIGKILL, so it writes its results to --progress before that):
  resume run: train 1 step, save, draw from every RNG stream, train 2 more steps.
  faults run: save step 3; train; save step 4, but rank 0 is SIGKILLed at the rename that would commit it.
--phase second (a fresh job, other init, other seeds):
  resume run: load, draw from every RNG stream, train the same 2 steps. Each rank draws its micro-batches from
    its torch RNG, so the losses match only if weights, optimizer, LR schedule AND RNG states all came back.
  faults run: resume after the kill; a full disk (ENOSPC) during a save; a corrupted shard; keep_last; a
    truncated file; a missing file; a broken explicit resume path.
"""

import argparse
import errno
import functools
import hashlib
import json
import multiprocessing
import os
import random
import signal
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--phase", choices=["first", "second"], required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--progress", required=True)
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.distributed as dist

    from megatron_gopd.runtime.distributed import init_distributed, seed_everything

    rank, world = init_distributed(timeout_s=120)

    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_gopd import checkpoint
    from megatron_gopd.models.architectures import ModelDims
    from megatron_gopd.models.builder import HFWeights, build_model, load_hf_weights
    from megatron_gopd.metrics import Stat
    from megatron_gopd.models.parallel_model import LRSchedule, TrainableModel, adam
    from megatron_gopd.runtime.layout import ParallelShape, build_layout
    from tests.tiny import tiny_hf_model

    first = args.phase == "first"
    work = Path(args.workdir)
    layout = build_layout(ParallelShape(1, 1, world))
    group, pgc = layout.student.world, layout.student.pgc
    hf = tiny_hf_model("llama", seed=3)
    dims = ModelDims.from_hf(hf.config)
    if rank == 0 and first:
        hf.config.save_pretrained(work / "hf")
    dist.barrier()

    gpt = build_model(dims, pgc, seed=11 if first else 99)
    if first:
        load_hf_weights(gpt, dims, HFWeights(hf.state_dict()))
    trainable = TrainableModel(gpt, dims, adam(1e-3, weight_decay=0.01, clip_grad=1.0), group,
                               LRSchedule(warmup_steps=2, decay_steps=10, decay_style="cosine"))
    seed_everything(1000 + rank if first else 7 + rank)  # the second job must not get these streams by luck
    MB, SEQ = 2, 12
    global_tokens = MB * world * (SEQ - 1)

    def nll(mb, lp, ent, logits):
        loss = -lp[:, 1:].sum() / global_tokens
        return loss, {"loss": Stat.total_of(loss)}  # summed over micro-batches and DP: the global loss

    def step():
        micro_batches = [{"tokens": torch.randint(0, dims.vocab_size, (1, SEQ))} for _ in range(MB)]
        metrics, info = trainable.train_step(micro_batches, nll, temperature=1.0)
        return {"loss": metrics["loss"], "grad_norm": info["grad_norm"], "lr": info["lr"]}

    def draws():
        with tensor_parallel.get_cuda_rng_tracker().fork():
            tracked = torch.rand(3).tolist()
        return {"torch": torch.rand(3).tolist(), "tracker": tracked, "python": random.random(),
                "numpy": float(np.random.rand())}

    def fingerprint():
        """Weights, the optimizer's Adam state (every DP rank's shard) and the schedule, tensor by tensor: a hash of
        each tensor's bytes, so that a permuted, swapped or misplaced shard shows (a sum of squares would not)."""
        def digest(t):
            return hashlib.sha256(t.detach().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]

        adam = [digest(value) for opt in trainable.optimizer.chained_optimizers
                for state in opt.optimizer.state.values() for key, value in sorted(state.items())
                if key in ("exp_avg", "exp_avg_sq")]
        shards = [None] * pgc.dp.size()
        dist.all_gather_object(shards, adam, group=pgc.dp)
        steps = {float(s["step"]) for opt in trainable.optimizer.chained_optimizers
                 for s in opt.optimizer.state.values()}
        return {"params": {name: digest(p) for name, p in gpt.named_parameters()}, "adam": shards,
                "adam_steps": sorted(steps), "scheduler_steps": trainable.scheduler.num_steps}

    def listing(root):
        return sorted(p.name for p in root.iterdir())

    def save(root, step_no, keep_last=3):
        return checkpoint.save_training_checkpoint(
            root, step_no, trainable, trainer_state={"step": step_no, "data": {"epoch": 0, "cursor": 4 * step_no}},
            rank_state={"sampler": torch.tensor([rank, step_no]), "seen": 3 + rank}, keep_last=keep_last,
            group=group, hf_dir=work / "hf",
        )

    def load(root, resume="auto"):
        """(trainer_state, warnings on this rank, error) of a load."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                restored = checkpoint.load_training_checkpoint(root, trainable, resume, group=group)
                state, error = (restored[0] if restored else None), None
            except Exception as e:  # noqa: BLE001 - the test asserts on the type and the message
                state, error = None, f"{type(e).__name__}: {e}"
        return state, [str(w.message) for w in caught if "checkpoint" in str(w.message)], error

    resume_root, faults_root = work / "resume" / "checkpoints", work / "faults" / "checkpoints"
    out = {}
    if first:
        out["first_step"] = step()
        save(resume_root, 1, keep_last=2)
        out["draws"] = draws()
        out["steps"] = [step(), step()]
        out["resume_files"] = sorted(str(p.relative_to(resume_root)) for p in resume_root.rglob("*") if p.is_file())
        out["resume_manifest"] = json.loads((resume_root / "step_00000001" / "MANIFEST.json").read_text())

        save(faults_root, 3)
        out["fp3"] = fingerprint()
        step()
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        if rank == 0:
            Path(args.progress).write_text(json.dumps(gathered))
        dist.barrier()
        if rank == 0:  # dies at the atomic rename that would commit step 4
            rename = os.rename

            def killed_at_commit(src, dst, *a, **kw):
                if Path(src).name.startswith(".tmp-step_"):
                    # as in a node crash, the helpers die too: dist_checkpointing's Manager would otherwise
                    # outlive us holding the job's stdout open
                    for child in multiprocessing.active_children():
                        os.kill(child.pid, signal.SIGKILL)
                    os.kill(os.getpid(), signal.SIGKILL)
                return rename(src, dst, *a, **kw)

            os.rename = killed_at_commit
        save(faults_root, 4)
        raise AssertionError("the save of step 4 should have been killed")

    # ---- second job ----
    restored = checkpoint.load_training_checkpoint(resume_root, trainable, group=group)
    trainer_state, rank_state = restored
    out["trainer_state"] = trainer_state
    out["rank_state"] = {"sampler": rank_state["sampler"].tolist(), "seen": rank_state["seen"]}
    out["draws"] = draws()
    out["steps"] = [step(), step()]

    # after the kill: the uncommitted temp dir is left, `latest` still names step 3, and resume takes step 3
    out["after_kill"] = {"listing": listing(faults_root), "latest": (faults_root / "latest").read_text().strip()}
    out["after_kill"]["load"] = load(faults_root)
    out["after_kill"]["fp"] = fingerprint()

    step()
    save(faults_root, 4)
    out["fp4"] = fingerprint()
    out["after_save4"] = listing(faults_root)

    # a full disk while rank 1 writes its shard: every rank raises, step 4 stays the latest and loads
    original_write_item = filesystem_async._write_item
    if rank == 1:
        @functools.wraps(original_write_item)
        def disk_full(*a, **kw):
            next(x for x in a if hasattr(x, "write")).write(b"\0" * 64)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        filesystem_async._write_item = disk_full  # the writer processes are forked, so they inherit it
    step()
    try:
        save(faults_root, 5)
        enospc_error = None
    except Exception as e:  # noqa: BLE001
        enospc_error = f"{type(e).__name__}: {e}"
    filesystem_async._write_item = original_write_item
    out["enospc"] = {"error": enospc_error, "listing": listing(faults_root),
                     "latest": (faults_root / "latest").read_text().strip(), "load": load(faults_root),
                     "fp": fingerprint()}

    # a corrupted shard of the latest checkpoint (same size, flipped bytes): skipped, step 3 is used
    if rank == 0:
        shard = faults_root / "step_00000004" / "dist" / "__1_0.distcp"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 8])
        shard.write_bytes(bytes(data))
    dist.barrier()
    out["corrupt"] = {"load": load(faults_root), "fp": fingerprint()}

    # keep_last=2 over three more saves; then a truncated file, then a missing one
    for step_no in (5, 6, 7):
        step()
        save(faults_root, step_no, keep_last=2)
        if step_no == 6:
            out["fp6"] = fingerprint()
    out["keep_last"] = listing(faults_root)
    if rank == 0:
        rank_file = faults_root / "step_00000007" / "rank_state" / "rank_00001.pt"
        os.truncate(rank_file, rank_file.stat().st_size // 2)
    dist.barrier()
    out["truncated"] = {"load": load(faults_root), "fp": fingerprint()}
    if rank == 0:
        (faults_root / "step_00000006" / "trainer_state.json").unlink()
    dist.barrier()
    out["missing"] = {"load": load(faults_root)}
    out["explicit"] = {"load": load(faults_root, str(faults_root / "step_00000007"))}

    gathered = [None] * world
    dist.all_gather_object(gathered, out)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(gathered, f)
    dist.destroy_process_group()


if __name__ == "__main__":  # required: dist_checkpointing's writer starts a multiprocessing Manager
    main()
