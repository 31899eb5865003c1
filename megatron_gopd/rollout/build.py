"""The rollout a run uses: which engine, and where it lives (on the student's ranks or on ranks of its own)."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from megatron.core.models.gpt import GPTModel

from megatron_gopd.config import RunConfig
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import DTYPES
from megatron_gopd.rollout.base import RolloutEngine
from megatron_gopd.rollout.colocated import ColocatedRollout, TrainerMemory
from megatron_gopd.rollout.dedicated import DedicatedRollout
from megatron_gopd.runtime.distributed import device
from megatron_gopd.runtime.layout import RoleLayout


# rollout.compile auto: the decode steps (one token for a chunk of rows) a run must plan for its compiled decoding
# to repay the compile. bench_rollout measures the break-even of one shape bucket (compile seconds over the seconds
# saved per step): 20-25k steps with a cold inductor cache on 2 busy cores; a run compiles a few buckets.
AUTO_COMPILE_DECODE_STEPS = 50_000


def compiles_decode(cfg: RunConfig) -> bool:
    """Whether the transformers engine compiles its decode step: rollout.compile, where auto counts the decode steps
    the run plans at most (every chunk of every step decoding max_new_tokens; stop tokens end chunks sooner). On CPU
    inductor builds C++: without a compiler auto stays eager and always is refused, before any step."""
    r = cfg.rollout
    if r.compile == "never":
        return False
    compiler = os.environ.get("CXX", "g++")
    if not torch.cuda.is_available() and shutil.which(compiler) is None:
        if r.compile == "always":
            raise ValueError(f"rollout.compile: always needs a C++ compiler for torch.compile on the CPU ({compiler!r}, "
                             "or $CXX), and none is on PATH: install one (e.g. g++) or set rollout.compile: never")
        return False
    if r.compile == "always":
        return True
    chunks = math.ceil(cfg.data.prompts_per_step * r.samples_per_prompt / r.chunk_size)
    return cfg.train.steps * chunks * r.max_new_tokens >= AUTO_COMPILE_DECODE_STEPS


def make_engine(cfg: RunConfig, *, tp_size: int = 1, tp_group=None) -> RolloutEngine:
    """The configured engine for the student's model (its weights arrive by the first weight sync): transformers,
    or SGLang on GPU spanning `tp_size` GPUs."""
    r, hf_dir = cfg.rollout, str(Path(cfg.student.path) / "hf")
    if r.engine == "sglang":
        from megatron_gopd.rollout.sglang_engine import SGLangRolloutEngine

        return SGLangRolloutEngine(hf_dir, dtype="bfloat16" if cfg.student.dtype == "bf16" else "float32",
                                   mem_fraction_static=r.sglang_mem_fraction, seed=cfg.train.seed,
                                   bucket_bytes=r.sync_bucket_mb << 20, tp_size=tp_size, tp_group=tp_group,
                                   deterministic=r.sglang_deterministic)
    from megatron_gopd.rollout.hf_engine import HFRolloutEngine

    return HFRolloutEngine(hf_dir, dtype=DTYPES[cfg.student.dtype], device=device(), max_batch_size=r.chunk_size,
                           compile=compiles_decode(cfg))


def build_rollout(cfg: RunConfig, trainer: TrainerMemory, student: GPTModel, dims: ModelDims, layout: RoleLayout):
    """The student's side of the rollout: the replica's engine on its leader (transformers, or SGLang on GPU
    spanning `rollout.engine_tp` of the first stage's TP ranks), or the client of dedicated engine ranks."""
    pgc, r = student.pg_collection, cfg.rollout
    bucket_bytes = r.sync_bucket_mb << 20
    if r.placement == "dedicated":
        return DedicatedRollout(student, dims, layout, bucket_bytes=bucket_bytes, chunk_rows=r.chunk_size,
                                timeout_s=cfg.faults.exchange_timeout_s)
    is_leader, ranks = pgc.mp.rank() == 0, (r.engine_tp or cfg.student.parallel.tp) if r.engine == "sglang" else 1
    group = pgc.tp if ranks > 1 else None
    engine = make_engine(cfg, tp_size=ranks, tp_group=group) if is_leader else None
    weight_peer = None
    if r.engine == "sglang" and not is_leader and group is not None and pgc.pp.rank() == 0:
        from megatron_gopd.rollout.sglang_engine import WeightHandoff

        weight_peer = WeightHandoff(bucket_bytes, group)
    return ColocatedRollout(engine, student, dims, bucket_bytes=bucket_bytes, engine_ranks=ranks,
                            weight_peer=weight_peer, trainer=trainer, offload_optimizer=cfg.train.offload_optimizer)
