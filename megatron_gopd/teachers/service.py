"""The streaming log-prob service between the student and the frozen models (teachers, reference).

Student side (`FrozenScorer`): each finished rollout micro-batch is split by owner (each row goes to the teacher
of its domain, and every row to the reference when one is used). For a dedicated model, the replica's leader
(tp=0, pp=0) sends the rows with non-blocking point-to-point ops at once and posts the receive of the answer, so
the frozen ranks work while the student keeps generating and computes pi_old. Colocated models score on the
student's own ranks when the results are collected.

Frozen side (`serve_frozen_model`): the model's leader receives requests from the student leaders assigned to
it, in a fixed order, shares each with its TP x PP group, scores it and sends the log-probs back.

Wire format, per (step, student replica, frozen model): messages of header [rows, seq, more] followed by a
[rows, seq] int64 token tensor; a header with more=0 and rows=0 ends the step; rows=-1 ends the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_gopd.runtime.layout import RoleGroups, RoleLayout
from megatron_gopd.teachers.frozen import FrozenModel
from megatron_gopd.teachers.sglang_http import SGLangHTTPModel

_END_STEP, _END_RUN = (0, 0, 0), (-1, 0, 0)


class ExchangeTimeoutError(RuntimeError):
    pass


@dataclass
class _Pending:
    """One submitted micro-batch for one model: where its rows came from, and its answer when it comes."""

    rows: list[int]  # row indices within the submitted micro-batch
    tokens: torch.Tensor
    result: torch.Tensor | None = None
    works: list = field(default_factory=list)
    header: torch.Tensor | None = None  # gloo sends from this memory until the work completes
    future: object = None  # an SGLang server's answer


class FrozenScorer:
    """Student side. Call `submit` for every rollout micro-batch (on every student rank, with the same
    arguments), then `collect` once per step."""

    def __init__(self, layout: RoleLayout, owners: dict[str, FrozenModel | SGLangHTTPModel | None], *,
                 temperature: float, timeout_s: float):
        """`owners` maps each frozen model name the student uses to its local FrozenModel (colocated), to an
        SGLangHTTPModel (a remote server), or to None (dedicated ranks)."""
        pgc = layout.student.pgc
        self.layout, self.models, self.temperature = layout, owners, temperature
        self.timeout = timedelta(seconds=timeout_s)
        self.mp, self.dp_rank = pgc.mp, pgc.dp.rank()
        self.is_leader = pgc.mp.rank() == 0
        self.peers = {  # dedicated models: their leader that serves this student replica
            name: layout.frozen[name].leader_of_dp_replica(self.dp_rank % layout.frozen[name].shape.dp)
            for name, local in owners.items() if local is None
        }
        self.step = 0
        self._batches: list[tuple[int, int]] = []  # (rows, seq) per submitted micro-batch
        self._pending: dict[str, list[tuple[int, _Pending]]] = {name: [] for name in owners}

    def submit(self, tokens: torch.Tensor, owners: list[list[str]], lengths: list[int] | None = None) -> None:
        """`tokens` [rows, seq]; `owners[i]` names every model that must score row i; `lengths[i]` is row i's
        length without padding (default: all of it)."""
        lengths = lengths or [tokens.shape[1]] * tokens.shape[0]
        index = len(self._batches)
        self._batches.append(tuple(tokens.shape))
        for name in self.models:
            rows = [i for i, names in enumerate(owners) if name in names]
            if not rows:
                continue
            pending = _Pending(rows, tokens[rows].contiguous())
            model = self.models[name]
            if isinstance(model, SGLangHTTPModel):
                if self.is_leader:
                    pending.future = model.score_async(pending.tokens, [lengths[i] for i in rows])
            elif name in self.peers and self.is_leader:
                peer = self.peers[name]
                pending.header = torch.tensor([len(rows), tokens.shape[1], 1])
                pending.result = torch.empty(len(rows), tokens.shape[1])
                pending.works = [dist.isend(pending.header, peer), dist.isend(pending.tokens, peer),
                                 dist.irecv(pending.result, peer)]
            self._pending[name].append((index, pending))

    def collect(self) -> dict[str, list[torch.Tensor | None]]:
        """Per model, per submitted micro-batch, the [rows, seq] log-probs (None for rows it did not score,
        which hold zeros). Available on every student rank."""
        out = {name: [torch.zeros(shape) for shape in self._batches] for name in self.models}
        for name, local in self.models.items():
            if isinstance(local, FrozenModel):
                if self._pending[name] or local.experts_span_replicas:  # the latter forward in lockstep
                    scores = local.score([{"tokens": p.tokens} for _, p in self._pending[name]], self.temperature)
                    for (index, p), lp in zip(self._pending[name], scores):
                        out[name][index][p.rows] = lp
                local.offload()
                continue
            if isinstance(local, SGLangHTTPModel) and self.is_leader:
                for _, p in self._pending[name]:
                    p.result = self._result(name, p.future)
            elif self.is_leader:
                end = torch.tensor(_END_STEP)
                works = [dist.isend(end, self.peers[name])]
                for _, p in self._pending[name]:
                    works += p.works
                self._wait(name, works)
            for index, p in self._pending[name]:
                result = p.result if self.is_leader else torch.empty(len(p.rows), p.tokens.shape[1])
                if self.mp.size() > 1:
                    dist.broadcast(result, src=dist.get_global_rank(self.mp, 0), group=self.mp)
                out[name][index][p.rows] = result
        self._batches.clear()
        self._pending = {name: [] for name in self.models}
        self.step += 1
        return out

    def _result(self, name: str, future) -> torch.Tensor:
        try:
            return future.result(timeout=self.timeout.total_seconds())
        except Exception as e:
            raise ExchangeTimeoutError(
                f"sglang model {name!r} ({self.models[name].url}) did not answer student replica {self.dp_rank} "
                f"within {self.timeout.total_seconds():.0f}s at step {self.step}: {type(e).__name__}: {e}"
            ) from e

    def _wait(self, name: str, works: list) -> None:
        """Waits for all of a model's exchanges under ONE deadline (not one timeout per message)."""
        groups = self.layout.frozen[name]
        deadline = time.monotonic() + self.timeout.total_seconds()
        try:
            for work in works:
                if not work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.001))):
                    raise TimeoutError("timed out")
        except Exception as e:  # gloo raises on a dead peer, and on timeouts
            raise ExchangeTimeoutError(
                f"frozen model {name!r} (ranks {groups.ranks.start}-{groups.ranks.stop - 1}) did not answer "
                f"student replica {self.dp_rank} within {self.timeout.total_seconds():.0f}s at step {self.step}: "
                f"{type(e).__name__}: {e}"
            ) from e

    def shutdown(self) -> None:
        """Tells the dedicated models' servers that the run is over."""
        if self.is_leader:
            for peer in self.peers.values():
                dist.send(torch.tensor(_END_RUN), peer)
        for model in self.models.values():
            if isinstance(model, SGLangHTTPModel):
                model.shutdown()


def student_leaders_served_by(layout: RoleLayout, groups: RoleGroups, replica: int) -> list[int]:
    student = layout.student
    return [student.leader_of_dp_replica(r) for r in range(student.shape.dp) if r % groups.shape.dp == replica]


def serve_frozen_model(model: FrozenModel, layout: RoleLayout, groups: RoleGroups, *, temperature: float) -> None:
    """Frozen side: answer the student's requests until every student leader ends the run."""
    pgc = model.pgc
    mp, is_leader = pgc.mp, pgc.mp.rank() == 0
    leader = dist.get_global_rank(mp, 0)
    sources = student_leaders_served_by(layout, groups, pgc.dp.rank())
    active = list(sources)

    def receive(shape, dtype, src):
        t = torch.empty(shape, dtype=dtype)
        if is_leader:
            dist.recv(t, src)
        if mp.size() > 1:
            dist.broadcast(t, src=leader, group=mp)
        return t

    while active:
        for src in list(active):
            while True:
                rows, seq, more = receive((3,), torch.long, src).tolist()
                if rows == -1:
                    active.remove(src)
                    break
                if not more:
                    break
                tokens = receive((rows, seq), torch.long, src)
                lp = model.score([{"tokens": tokens}], temperature)[0]
                if is_leader:  # score returns CPU tensors: the wire is gloo's
                    dist.send(lp.contiguous(), src)
