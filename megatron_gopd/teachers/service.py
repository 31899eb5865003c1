"""Scoring a step's rows with the frozen models (teachers, reference), wherever each one lives.

Student side: `Scoring` sends each finished row, once, to the models that must score it (the objective names them)
and returns every model's per-row log-probs at the end of the step, keyed by row. Behind it, one `Scorer` per model:
- colocated: the model shares the student's ranks and groups; it scores all of the step's rows when they are
  collected, in as few forward passes as its batching allows;
- dedicated: the model has ranks of its own. The replica's leader (tp=0, pp=0) sends each submission at once with
  non-blocking point-to-point ops and posts the receive of the answer, so the frozen ranks work while the student
  keeps generating; the answers are shared with the leader's TP x PP group;
- server: an SGLang server, asked in background threads by the leader.

Frozen side (`serve_frozen_model`): the model's leader receives the submissions of the student leaders assigned to
it, in a fixed order, shares each with its TP x PP group, scores it and sends the log-probs back.

Wire format, per (step, student replica, frozen model): a header [rows, tokens, more], then the rows' lengths
(int64 [rows]) and their token ids end to end (int64 [tokens]); the answer is float32 [tokens], each row's
log-probs aligned with its tokens. A header with more=0 ends the step; rows=-1 ends the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import computed_on
from megatron_gopd.runtime.exchange import ExchangeTimeoutError, Peer, Sent
from megatron_gopd.runtime.layout import RoleGroups, RoleLayout
from megatron_gopd.teachers.frozen import FrozenModel
from megatron_gopd.teachers.sglang_http import SGLangHTTPModel

_END_STEP, _END_RUN = (0, 0, 0), (-1, 0, 0)
Rows = dict[int, list[int]]  # row id (its index in the replica's step) -> token ids, prompt and response


class Scorer(Protocol):
    def submit(self, rows: Rows) -> None:
        """Queues rows for scoring (every student rank calls it with the same rows)."""

    def collect(self) -> dict[int, torch.Tensor]:
        """The log-probs of every row submitted since the last collect ([its length], aligned with its tokens),
        on every student rank."""

    def shutdown(self) -> None: ...


class Scoring:
    """The student's side of every frozen model it uses: routes rows, collects scores."""

    def __init__(self, scorers: dict[str, Scorer]):
        self.scorers = scorers

    def submit(self, rows: dict[int, tuple[list[int], list[str]]]) -> None:
        """`rows`: row id -> (token ids, the names of the models that must score it)."""
        for name, scorer in self.scorers.items():
            mine = {row: tokens for row, (tokens, names) in rows.items() if name in names}
            if mine:
                scorer.submit(mine)

    def collect(self) -> dict[str, dict[int, torch.Tensor]]:
        """model name -> row id -> log-probs, for every row submitted this step."""
        return {name: scorer.collect() for name, scorer in self.scorers.items()}

    def shutdown(self) -> None:
        for scorer in self.scorers.values():
            scorer.shutdown()


class ColocatedScorer:
    def __init__(self, model: FrozenModel, *, temperature: float):
        self.model, self.temperature = model, temperature
        self._pending: Rows = {}

    def submit(self, rows: Rows) -> None:
        self._pending.update(rows)

    def collect(self) -> dict[int, torch.Tensor]:
        rows, self._pending = self._pending, {}
        # a mixture of experts spread over replicas forwards in lockstep with them, with rows or without
        scores = self.model.score(list(rows.values()), self.temperature) \
            if rows or self.model.experts_span_replicas else []
        self.model.offload()  # on GPU, parked in host memory until the next step needs it
        return dict(zip(rows, scores))

    def shutdown(self) -> None:
        pass


@dataclass
class _Submission:
    rows: list[int]
    lengths: list[int]
    answer: torch.Tensor
    exchanges: list[Sent]


class DedicatedScorer:
    def __init__(self, name: str, layout: RoleLayout, *, timeout_s: float):
        pgc = layout.student.pgc
        groups = layout.frozen[name]
        self.mp, self.is_leader = pgc.mp, pgc.mp.rank() == 0
        self.peer = Peer(f"frozen model {name!r}", groups.leader_of_dp_replica(pgc.dp.rank() % groups.shape.dp),
                         groups.ranks, replica=pgc.dp.rank(), timeout_s=timeout_s)
        self._sent: list[_Submission] = []

    def submit(self, rows: Rows) -> None:
        if not self.is_leader:
            return
        lengths = [len(tokens) for tokens in rows.values()]
        answer = torch.empty(sum(lengths))
        message = self.peer.isend(torch.tensor([len(rows), sum(lengths), 1]), torch.tensor(lengths),
                                  torch.tensor([t for tokens in rows.values() for t in tokens]))
        self._sent.append(_Submission(list(rows), lengths, answer, [message, self.peer.irecv(answer)]))

    def collect(self) -> dict[int, torch.Tensor]:
        def answers() -> dict[int, torch.Tensor]:
            end = self.peer.isend(torch.tensor(_END_STEP))
            self.peer.wait(end.works + [w for sent in self._sent for x in sent.exchanges for w in x.works])
            return {row: lp for sent in self._sent for row, lp in zip(sent.rows, sent.answer.split(sent.lengths))}

        scores = computed_on(self.mp, answers)
        self._sent.clear()
        self.peer.step += 1
        return scores

    def shutdown(self) -> None:
        """Tells the model's server that the run is over."""
        if self.is_leader:
            self.peer.wait(self.peer.isend(torch.tensor(_END_RUN)).works)


class ServerScorer:
    def __init__(self, model: SGLangHTTPModel, layout: RoleLayout, *, timeout_s: float):
        pgc = layout.student.pgc
        self.model, self.mp, self.dp_rank, self.timeout_s = model, pgc.mp, pgc.dp.rank(), timeout_s
        self.step = 0
        self._futures: list[tuple[list[int], object]] = []

    def submit(self, rows: Rows) -> None:
        if self.mp.rank() == 0:
            self._futures.append((list(rows), self.model.score_async(list(rows.values()))))

    def collect(self) -> dict[int, torch.Tensor]:
        scores = computed_on(self.mp, lambda: {row: lp for rows, future in self._futures
                                               for row, lp in zip(rows, self._result(future))})
        self._futures.clear()
        self.step += 1
        return scores

    def _result(self, future) -> list[torch.Tensor]:
        try:
            return future.result(timeout=self.timeout_s)
        except Exception as e:
            raise ExchangeTimeoutError(
                f"sglang model {self.model.name!r} ({self.model.url}) did not answer student replica {self.dp_rank} "
                f"within {self.timeout_s:.0f}s at step {self.step}: {type(e).__name__}: {e}") from e

    def shutdown(self) -> None:
        self.model.shutdown()


def student_leaders_served_by(layout: RoleLayout, groups: RoleGroups, replica: int) -> list[int]:
    student = layout.student
    return [student.leader_of_dp_replica(r) for r in range(student.shape.dp) if r % groups.shape.dp == replica]


def serve_frozen_model(model: FrozenModel, layout: RoleLayout, groups: RoleGroups, *, temperature: float) -> None:
    """Frozen side: answer the student's submissions until every student leader ends the run."""
    mp = model.pgc.mp
    is_leader = mp.rank() == 0
    active = student_leaders_served_by(layout, groups, model.pgc.dp.rank())

    def receive(shape, src):
        t = torch.empty(shape, dtype=torch.long)
        if is_leader:
            dist.recv(t, src)
        if mp.size() > 1:
            dist.broadcast(t, src=dist.get_global_rank(mp, 0), group=mp)
        return t

    while active:
        for src in list(active):
            while True:
                rows, total, more = receive((3,), src).tolist()
                if rows == -1:
                    active.remove(src)
                    break
                if not more:
                    break
                lengths = receive((rows,), src).tolist()
                tokens = receive((total,), src).split(lengths)
                scores = model.score([t.tolist() for t in tokens], temperature)
                if is_leader:  # score returns CPU tensors: the wire is gloo's
                    dist.send(torch.cat(scores).float().contiguous(), src)
