"""The student's rollout: one engine per DP replica, on the replica's (tp=0, pp=0) rank, fed by the exporter."""

from __future__ import annotations

import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.export import export_hf_weights
from megatron_gopd.rollout.base import RolloutEngine, Sample, SamplingParams


class ColocatedRollout:
    def __init__(self, engine: RolloutEngine | None, student: GPTModel, dims: ModelDims, *, bucket_bytes: int):
        self.mp = student.pg_collection.mp
        self.is_leader = self.mp.rank() == 0
        if self.is_leader != (engine is not None):
            raise ValueError("the rollout engine lives on exactly the (tp=0, pp=0) rank of each student replica")
        self.engine, self.student, self.dims, self.bucket_bytes = engine, student, dims, bucket_bytes

    def sync_weights(self) -> None:
        """Streams the student's current weights into the engine (every rank of the replica takes part)."""
        stream = export_hf_weights(self.student, self.dims, bucket_bytes=self.bucket_bytes)
        if self.engine is not None:
            self.engine.wake()
            self.engine.sync_weights(stream)
        else:
            for _ in stream:
                pass

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """The leader generates; the other ranks of its TP x PP group receive the same samples."""
        result = [self.engine.generate(prompts, params) if self.is_leader else None]
        if self.mp.size() > 1:
            dist.broadcast_object_list(result, src=dist.get_global_rank(self.mp, 0), group=self.mp)
        return result[0]

    def sleep(self) -> None:
        if self.engine is not None:
            self.engine.sleep()
