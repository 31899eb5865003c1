"""Rollout engines on ranks of their own (`rollout.placement: dedicated`), so that generation can overlap the update.

Student side (`DedicatedRollout`, the same interface as `ColocatedRollout`): each replica's leader sends its engine
requests ("generate step k from these prompts"), and reads the samples back as the engine finishes them, chunk by
chunk, sharing each chunk with its TP x PP group. After each update the student's first replica streams its weights
to every engine through the same bounded-bucket exporter (a broadcast from its leader over the `weights` group);
every sample carries the version of the weights that drew it (the number of updates they had seen). Requests may
run ahead of the update (`rollout.max_staleness`): an engine works through its messages in order, so a request sent
before a weight sync is served with the weights before it.

Engine side (`serve_rollout`): answers the messages of the student leaders it serves, in a fixed order, until every
one of them ends the run. Messages (pickled objects over point-to-point ops): ("weights", version), ("generate",
step, prompts, params), ("eval", prompts, params), ("end",); answers: ("rows", [(row, Sample)]) per finished chunk
and ("done",) after a request's last, or ("rows", samples) for an evaluation.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core.models.gpt import GPTModel

from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.export import export_hf_weights
from megatron_gopd.rollout.base import RolloutEngine, Sample, SamplingParams
from megatron_gopd.runtime.distributed import computed_on
from megatron_gopd.runtime.exchange import Peer, Sent
from megatron_gopd.runtime.layout import RoleLayout


class DedicatedRollout:
    engine = None  # it lives on another rank

    def __init__(self, student: GPTModel, dims: ModelDims, layout: RoleLayout, *, bucket_bytes: int,
                 chunk_rows: int, timeout_s: float):
        pgc = student.pg_collection
        self.student, self.dims, self.bucket_bytes = student, dims, bucket_bytes
        self.mp, self.is_leader = pgc.mp, pgc.mp.rank() == 0
        self.streams_weights = pgc.dp.rank() == 0  # the first replica's ranks export, its leader broadcasts
        self.weights = layout.rollout.weights
        self.engine_ranks = layout.rollout.ranks
        self.peer = Peer("rollout engine", layout.rollout.engine_of(pgc.dp.rank()), self.engine_ranks,
                         replica=pgc.dp.rank(), timeout_s=timeout_s)
        self.chunk_rows = chunk_rows
        self._requested: list[int] = []  # steps asked for and not read back yet
        self._sent: list[Sent] = []

    def sync_weights(self, version: int) -> None:
        """Every engine takes the student's current weights (every rank of the student calls this)."""
        self.peer.step = version
        if self.is_leader:
            self._send(("weights", version))
        if not self.streams_weights:
            return
        stream = export_hf_weights(self.student, self.dims, bucket_bytes=self.bucket_bytes)
        if self.weights is None:  # the first replica's other ranks: their part in the export's collectives
            for _ in stream:
                pass
            return
        src = dist.get_global_rank(self.weights, 0)
        with self.peer.answering():
            for name, tensor in stream:
                dist.broadcast_object_list([(name, tuple(tensor.shape), tensor.dtype)], src=src, group=self.weights)
                dist.broadcast(tensor.contiguous(), src=src, group=self.weights)
            dist.broadcast_object_list([None], src=src, group=self.weights)

    def request(self, step: int, prompts: list[list[int]], params: SamplingParams) -> None:
        """Asks the engine for `step`'s samples; they are read back by `results(step)`, in request order."""
        if self.is_leader:
            self._send(("generate", step, prompts, params))
        self._requested.append(step)

    def results(self, step: int) -> Iterator[tuple[int, Sample]]:
        """(row, sample) of a requested step as the engine finishes them, on every rank of the replica's group."""
        if self._requested[:1] != [step]:
            raise RuntimeError(f"results of step {step} asked for, but the next requested step is {self._requested}")
        self._requested.pop(0)
        self.peer.step = step
        while (message := computed_on(self.mp, self.peer.recv_object))[0] == "rows":
            yield from message[1]

    def leader_generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """Samples for an evaluation, on the replica's leader (elsewhere nothing)."""
        if not self.is_leader:
            return []
        self._send(("eval", prompts, params))
        return self.peer.recv_object()[1]

    def sleep(self) -> None:
        pass

    def shutdown(self) -> None:
        """Reads back what is still in flight (a run stopped early), then ends the engine's service."""
        for step in list(self._requested):
            for _ in self.results(step):
                pass
        if self.is_leader:
            self._send(("end",))
            self.peer.wait([w for sent in self._sent for w in sent.works])

    def _send(self, message) -> None:
        self._sent = [sent for sent in self._sent if not all(w.is_completed() for w in sent.works)]
        self._sent.append(self.peer.send_object(message))


def serve_rollout(engine: RolloutEngine, layout: RoleLayout, *, chunk_rows: int) -> None:
    """Engine side: answer the student leaders this rank serves until each of them ends the run."""
    me, student = dist.get_rank(), layout.student
    served = [student.leader_of_dp_replica(r) for r in range(student.shape.dp) if layout.rollout.engine_of(r) == me]
    peers = [Peer("student leader", rank, range(rank, rank + 1), replica=r, timeout_s=None)
             for r, rank in enumerate(served)]
    src = dist.get_global_rank(layout.rollout.weights, 0)
    version, active, sent = -1, list(peers), []
    while active:
        for peer in list(active):
            message = peer.recv_object()
            if message[0] == "end":
                active.remove(peer)
            elif message[0] == "weights":
                if message[1] > version:  # once per sync, whichever served replica says so first
                    engine.sync_weights(_received(layout.rollout.weights, src))
                    version = message[1]
            elif message[0] == "eval":
                sent.append(peer.send_object(("rows", engine.generate(*message[1:]))))
            else:
                _, step, prompts, params = message
                chunk = []
                for row, sample in engine.generate_iter(prompts, params):
                    sample.meta["version"] = version
                    chunk.append((row, sample))
                    if len(chunk) >= chunk_rows:
                        sent.append(peer.send_object(("rows", chunk)))
                        chunk = []
                sent.append(peer.send_object(("rows", chunk)))
                sent.append(peer.send_object(("done",)))
            sent = [s for s in sent if not all(w.is_completed() for w in s.works)]
    for s in sent:
        for work in s.works:
            work.wait()


def _received(group: dist.ProcessGroup, src: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's weights as its leader broadcasts them, one tensor at a time."""
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=src, group=group)
        if box[0] is None:
            return
        name, shape, dtype = box[0]
        tensor = torch.empty(shape, dtype=dtype)
        dist.broadcast(tensor, src=src, group=group)
        yield name, tensor
