"""Point-to-point exchanges between roles (the student and a dedicated teacher, reference or rollout engine).

Every wait runs under the run's exchange timeout, and any failure (gloo raises at once when the peer's process is
gone, and on timeouts) ends the run with one error naming the peer, its ranks, the student replica and the step:
never a hang, never a bare gloo message.
"""

from __future__ import annotations

import contextlib
import pickle
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


class ExchangeTimeoutError(RuntimeError):
    pass


@dataclass
class Sent:
    """Non-blocking sends or receives in flight, and the tensors gloo uses until they complete."""

    works: list = field(default_factory=list)
    buffers: list = field(default_factory=list)


class Peer:
    """One rank of another role, as one student replica (or one server) talks to it."""

    def __init__(self, name: str, rank: int, ranks: range, *, replica: int, timeout_s: float | None):
        """`timeout_s` None: the process group's own timeout (a server waiting for its next request)."""
        self.name, self.rank, self.ranks, self.replica = name, rank, ranks, replica
        self.timeout_s = timeout_s
        self.step = 0  # named in errors; the caller keeps it current

    @contextlib.contextmanager
    def answering(self):
        try:
            yield
        except Exception as e:
            within = f" within {self.timeout_s:.0f}s" if self.timeout_s is not None else ""
            raise ExchangeTimeoutError(
                f"{self.name} (ranks {self.ranks.start}-{self.ranks.stop - 1}) did not answer student replica "
                f"{self.replica}{within} at step {self.step}: {type(e).__name__}: {e}") from e

    def isend(self, *tensors: torch.Tensor) -> Sent:
        with self.answering():
            return Sent([dist.isend(t, self.rank) for t in tensors], list(tensors))

    def irecv(self, *tensors: torch.Tensor) -> Sent:
        with self.answering():
            return Sent([dist.irecv(t, self.rank) for t in tensors], list(tensors))

    def wait(self, works: list) -> None:
        """Waits for all the works under ONE deadline (not one timeout per message)."""
        deadline = time.monotonic() + (self.timeout_s or 0)
        with self.answering():
            for work in works:
                if self.timeout_s is None:
                    work.wait()
                elif not work.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.001))):
                    raise TimeoutError("timed out")

    def send_object(self, obj) -> Sent:
        """Sends a picklable object without blocking: its size, then its bytes."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        return self.isend(torch.tensor([payload.numel()]), payload)

    def recv_object(self):
        size = torch.empty(1, dtype=torch.long)
        self.wait(self.irecv(size).works)
        payload = torch.empty(int(size), dtype=torch.uint8)
        self.wait(self.irecv(payload).works)
        return pickle.loads(payload.numpy().tobytes())  # our own processes' messages
