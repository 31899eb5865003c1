"""Process-group initialisation from torchrun's environment, and seeding."""

from __future__ import annotations

import contextlib
import inspect
import os
import random
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from megatron_gopd.runtime import cpu_compat

T = TypeVar("T")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's env (NCCL + gloo on GPU, gloo on CPU); returns (rank, world).

    A plain `python` launch runs as a world of one, so every entry point also works without torchrun.
    """
    cpu_compat.apply_if_needed()
    if not dist.is_initialized():
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(_free_port())
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        # On a GPU, one process group per device type: CUDA tensors (the model's collectives, p2p, grads) go
        # through NCCL, CPU tensors (metric reductions, object collectives, checkpoint coordination, the
        # teacher wire) through gloo. megatron's HyperCommGrid and our subgroups pass backend=None, so every
        # group inherits both. On CPU, gloo alone.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch. Megatron's model-parallel RNG tracker is seeded per model, see models."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def computed_on(group: dist.ProcessGroup, compute: Callable[[], T], *, src: int = 0) -> T:
    """`compute()` run on rank `src` of `group` only (the replica's leader, which holds the rollout engine or the
    answers of another role; or the last pipeline stage, which holds the loss outputs), its result shared with every
    rank of the group as one object broadcast."""
    box = [compute() if group.rank() == src else None]
    if group.size() > 1:
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, src), group=group)
    return box[0]


_GROUPLESS_COLLECTIVES = (
    "get_rank", "get_world_size", "barrier", "broadcast", "all_reduce", "all_gather", "gather", "scatter",
    "reduce_scatter", "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list",
)


@contextlib.contextmanager
def collectives_scoped_to(group: dist.ProcessGroup) -> Iterator[None]:
    """Within the block, torch.distributed calls made without a group act on `group`, as if it were the world.

    dist_checkpointing (and torch.distributed.checkpoint under it) hard-code the default group: rank 0 of the
    world writes the common files, every collective spans the world. A role's ranks must save and load on their
    own, so a call without a group goes to the role's group, its rank and size are those within the role, and
    the `src`/`dst` ranks such a caller passes (which it numbers in its "world") are mapped to global ranks.
    Process-wide while active: do not run other collectives from another thread meanwhile.
    """
    originals = {name: getattr(dist, name) for name in _GROUPLESS_COLLECTIVES}

    def scoped(fn):
        signature = inspect.signature(fn)

        def call(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            if bound.arguments.get("group") is None:
                bound.arguments["group"] = group
                for key in ("src", "dst"):
                    if bound.arguments.get(key) is not None:
                        bound.arguments[key] = dist.get_global_rank(group, bound.arguments[key])
            return fn(*bound.args, **bound.kwargs)

        return call

    for name, fn in originals.items():
        setattr(dist, name, scoped(fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
