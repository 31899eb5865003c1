"""The student's rollout: one engine per DP replica, led by the replica's (tp=0, pp=0) rank, fed by the exporter.

Memory moves between the trainer and the engine in stages, in this order each step (the engine and the trainer
share the replica's GPUs):
    sync_weights: the trainer frees its transient memory (and with `offload_optimizer` moves the optimizer state
                  and gradient buffers to host) -> the engine regains its weights -> the weights stream in ->
                  the engine regains its KV cache
    sleep:        the engine releases its KV cache, then its weights -> the trainer takes its memory back
"""

from __future__ import annotations

from typing import Iterator, Protocol

from megatron.core.models.gpt import GPTModel

from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.export import export_hf_weights
from megatron_gopd.rollout.base import RolloutEngine, Sample, SamplingParams
from megatron_gopd.runtime.distributed import computed_on


class TrainerMemory(Protocol):  # models.parallel_model.TrainableModel
    def release_memory(self, offload: bool) -> None: ...

    def reclaim_memory(self) -> None: ...


class ColocatedRollout:
    def __init__(self, engine: RolloutEngine | None, student: GPTModel, dims: ModelDims, *, bucket_bytes: int,
                 engine_ranks: int = 1, weight_peer=None, trainer: TrainerMemory | None = None,
                 offload_optimizer: bool = False):
        """`engine` lives on the replica's leader. An engine spanning `engine_ranks` > 1 TP ranks (SGLang) takes
        full weights from each of them: the other first-stage TP ranks pass their `weight_peer` (a WeightHandoff)."""
        self.mp = student.pg_collection.mp
        self.is_leader = self.mp.rank() == 0
        if self.is_leader != (engine is not None):
            raise ValueError("the rollout engine lives on exactly the (tp=0, pp=0) rank of each student replica")
        pgc = student.pg_collection
        hosts_engine_rank = pgc.pp.rank() == 0 and 0 < pgc.tp.rank() < engine_ranks
        if hosts_engine_rank != (weight_peer is not None):
            raise ValueError(f"an engine over {engine_ranks} TP ranks takes a weight peer on exactly the other "
                             "first-stage TP ranks that host its ranks")
        self.engine, self.student, self.dims, self.bucket_bytes = engine, student, dims, bucket_bytes
        self.engine_ranks, self.weight_peer = engine_ranks, weight_peer
        self.trainer, self.offload_optimizer = trainer, offload_optimizer
        self._requests: dict[int, tuple[list[list[int]], SamplingParams]] = {}

    def sync_weights(self, version: int = 0) -> None:
        """Streams the student's current weights into the engine (every rank of the replica takes part); the
        engine draws every sample with the newest weights (`version` counts the updates they have seen)."""
        if self.trainer is not None:
            self.trainer.release_memory(offload=self.offload_optimizer)
        if self.engine is not None:
            self.engine.wake_weights()
        stream = export_hf_weights(self.student, self.dims, bucket_bytes=self.bucket_bytes,
                                   tp_receivers=self.engine_ranks)
        if self.engine is not None:
            self.engine.sync_weights(stream)
        elif self.weight_peer is not None:
            self.weight_peer.send(stream, update=None)
        else:
            for _ in stream:
                pass
        if self.engine is not None:
            self.engine.wake_cache()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """The leader generates; the other ranks of its TP x PP group receive the same samples."""
        return computed_on(self.mp, lambda: self.engine.generate(prompts, params))

    def request(self, step: int, prompts: list[list[int]], params: SamplingParams) -> None:
        """Remembers what `results(step)` generates: a colocated engine generates on demand, never ahead."""
        self._requests[step] = (prompts, params)

    def results(self, step: int) -> Iterator[tuple[int, Sample]]:
        return self.generate_iter(*self._requests.pop(step))

    def leader_generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """Samples for an evaluation, on the replica's leader (elsewhere nothing)."""
        return self.engine.generate(prompts, params) if self.engine is not None else []

    def generate_iter(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[int, Sample]]:
        """(row, sample) as the engine finishes them (see RolloutEngine.generate_iter), on every rank of the
        leader's TP x PP group, in the leader's order: each is broadcast as it comes, then an end marker."""
        source = self.engine.generate_iter(prompts, params) if self.is_leader else None
        while (item := computed_on(self.mp, lambda: next(source, None))) is not None:
            yield item

    def sleep(self) -> None:
        if self.engine is not None:
            self.engine.sleep()
        if self.trainer is not None:
            self.trainer.reclaim_memory()

    def shutdown(self) -> None:
        self.sleep()
