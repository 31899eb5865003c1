"""The role layout: which ranks hold the student, and which hold each frozen model (teachers, reference).

The student occupies ranks [0, student_size) as an ordinary Megatron TP x PP x DP grid. A `dedicated` frozen
model gets ranks of its own after the student's; a `colocated` one shares the student's ranks and process
groups (it runs between the student's phases, so sharing the groups is safe).

Every group comes from megatron-core's HyperCommGrid with a rank offset, and reaches the models through a
ProcessGroupCollection, so no collective of one role ever spans another role's ranks. We never call
`parallel_state.initialize_model_parallel`: it would build DP groups that mix students and teachers.

Expert parallelism, as in megatron: the same ranks of a role are also laid out as an expert grid, expert-TP x EP
x expert-DP x PP (etp * ep * edp = tp * dp per stage), so the experts of a sparse layer are spread over `ep`
ranks that hold different data (ep from dp) or the same data (ep from tp, with etp = tp / ep).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import megatron.core
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection

# The megatron-core minor versions whose sources this layout was checked against (0.16.1, 0.17.0, 0.18.0, 0.19.2):
# HyperCommGrid(shape, dim_names, rank_offset) with create_pg(dims, timeout=...) and get_rank_enum(dims),
# ProcessGroupCollection taking every group below by name (0.18 and 0.19 add groups that megatron fills from
# parallel_state, i.e. None here, which switches those features off), and parallel_state's global memory buffer.
CHECKED_MEGATRON = ("0.16", "0.17", "0.18", "0.19")


def check_megatron_version(version: str) -> None:
    """A megatron-core outside the checked versions fails here, before any group exists, rather than misbehave."""
    if ".".join(version.split(".")[:2]) not in CHECKED_MEGATRON:
        raise RuntimeError(
            f"megatron-core {version} is not one the role layout was checked against ({', '.join(CHECKED_MEGATRON)}"
            ".x): its HyperCommGrid / ProcessGroupCollection may differ. Install one of those (setup.cfg pins "
            "megatron-core>=0.16,<0.20), or check megatron_gopd/runtime/layout.py against its sources")


# Megatron's default rank order, fastest-varying first: tp-cp-ep-dp-pp.
_DIMS = ["tp", "cp", "ep", "dp", "pp"]
_GRID_GROUPS = {
    "tp": "tp",
    "cp": "cp",
    "ep": "ep",
    "dp": "dp",
    "pp": "pp",
    "dp_cp": ["dp", "cp"],
    "mp": ["tp", "pp"],
    "tp_cp": ["tp", "cp"],
    "tp_ep": ["tp", "ep"],
    "tp_ep_pp": ["tp", "ep", "pp"],
    "tp_dp_cp": ["tp", "dp", "cp"],
}


def experts_within_replica(tp: int, ep: int, etp: int | None = None) -> bool:
    """Whether each expert-parallel group lies inside one DP replica (ep from tp): then replicas run
    independently; otherwise every forward is collective over the replicas of an expert group."""
    return tp % ((tp if etp is None else etp) * ep) == 0


# The expert grid's order (megatron's expert rank generator): tp-ep-dp-pp.
_EXPERT_DIMS = ["tp", "ep", "dp", "pp"]
_EXPERT_GROUPS = {"ep": "ep", "expt_tp": "tp", "expt_dp": "dp", "tp_ep": ["tp", "ep"], "tp_ep_pp": ["tp", "ep", "pp"]}


@dataclass(frozen=True)
class ParallelShape:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1  # expert parallel: the ranks a sparse layer's experts are spread over
    etp: int | None = None  # expert tensor parallel; None: tp (megatron's default)

    def __post_init__(self):
        if (self.tp * self.dp) % (self.expert_tp * self.ep):
            raise ValueError(f"etp={self.expert_tp} x ep={self.ep} must divide tp={self.tp} x dp={self.dp} (the "
                             "ranks of a pipeline stage)")

    @property
    def size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    @property
    def experts_within_replica(self) -> bool:
        return experts_within_replica(self.tp, self.ep, self.etp)


@dataclass
class RoleGroups:
    """The process groups of one role. On ranks outside the role, `pgc` and `world` are None."""

    name: str
    shape: ParallelShape
    first_rank: int
    pgc: ProcessGroupCollection | None = None
    world: dist.ProcessGroup | None = None  # all ranks of this role

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.shape.size)

    @property
    def is_member(self) -> bool:
        return self.pgc is not None

    def leader_of_dp_replica(self, dp_rank: int) -> int:
        """Global rank of (tp=0, pp=0) of the given DP replica: it talks to the other roles."""
        return self.first_rank + dp_rank * self.shape.tp


@dataclass
class RolloutRanks:
    """Rollout engines on ranks of their own (one rank per engine replica), after every other role's. Student
    replica r is served by engine r % engines; the student's first replica streams the weights to all of them over
    `weights` (its leader and every engine rank)."""

    first_rank: int
    engines: int
    weights: dist.ProcessGroup | None  # None on ranks outside it

    @property
    def ranks(self) -> range:
        return range(self.first_rank, self.first_rank + self.engines)

    def engine_of(self, student_replica: int) -> int:
        return self.first_rank + student_replica % self.engines


@dataclass
class RoleLayout:
    student: RoleGroups
    frozen: dict[str, RoleGroups] = field(default_factory=dict)  # teacher names and "reference"
    rollout: RolloutRanks | None = None

    def role_of(self, rank: int) -> str:
        if rank in self.student.ranks:
            return self.student.name
        for name, groups in self.frozen.items():
            if rank in groups.ranks and groups.first_rank >= self.student.shape.size:
                return name
        if self.rollout is not None and rank in self.rollout.ranks:
            return "rollout"
        raise ValueError(f"rank {rank} belongs to no role")


def _build_role(name: str, shape: ParallelShape, first_rank: int, timeout: timedelta) -> RoleGroups:
    # Must run on EVERY rank, for every role, in the same order: torch names groups by a global counter, so a
    # group created by only some ranks silently aliases another one.
    grid = HyperCommGrid([shape.tp, 1, 1, shape.dp, shape.pp], _DIMS, rank_offset=first_rank)
    groups = {key: grid.create_pg(dims, timeout=timeout) for key, dims in _GRID_GROUPS.items()}
    world = grid.create_pg(_DIMS, timeout=timeout)
    # Tied embeddings are all-reduced between the first and last pipeline stages; rope needs no position group.
    pp_enum = grid.get_rank_enum("pp")
    groups["embd"], _ = dist.new_subgroups_by_enumeration(
        [sorted({r[0], r[-1]}) for r in pp_enum], timeout=timeout
    )
    groups["pos_embd"], _ = dist.new_subgroups_by_enumeration([[r[0]] for r in pp_enum], timeout=timeout)
    # Without expert parallelism the expert groups are the dense ones (an always-present expt_dp matters: left
    # empty, DDP would call new_group() on this rank alone and desync the counter).
    groups.update(expt_tp=groups["tp"], expt_dp=groups["dp"])
    if shape.ep > 1 or shape.expert_tp != shape.tp:
        edp = shape.tp * shape.dp // (shape.expert_tp * shape.ep)
        experts = HyperCommGrid([shape.expert_tp, shape.ep, edp, shape.pp], _EXPERT_DIMS, rank_offset=first_rank)
        groups.update({key: experts.create_pg(dims, timeout=timeout) for key, dims in _EXPERT_GROUPS.items()})
    if dist.get_rank() not in range(first_rank, first_rank + shape.size):
        return RoleGroups(name, shape, first_rank)
    pgc = ProcessGroupCollection(
        **groups,
        intra_dp_cp=groups["dp_cp"],
        intra_expt_dp=groups["expt_dp"],
        intra_dist_opt=world,  # one optimizer instance per role: grad-norm statistics span the whole role
    )
    return RoleGroups(name, shape, first_rank, pgc=pgc, world=world)


def build_layout(
    student: ParallelShape,
    frozen: dict[str, tuple[ParallelShape, bool]] | None = None,
    timeout_s: float = 600.0,
    rollout_engines: int = 0,
) -> RoleLayout:
    """Builds the groups of every role. `frozen` maps a model name to (shape, dedicated).

    Dedicated models are placed one after another, after the student's ranks, in the order given, then
    `rollout_engines` ranks of dedicated rollout engines. A colocated model must have the student's shape and
    shares its groups.
    """
    check_megatron_version(megatron.core.__version__)
    timeout = timedelta(seconds=timeout_s)
    layout = RoleLayout(student=_build_role("student", student, 0, timeout))
    next_rank = student.size
    for name, (shape, dedicated) in (frozen or {}).items():
        if dedicated:
            layout.frozen[name] = _build_role(name, shape, next_rank, timeout)
            next_rank += shape.size
        else:
            if shape != student:
                raise ValueError(
                    f"colocated model {name!r} has parallel shape {shape}, but colocated models share the "
                    f"student's groups and need its shape {student}"
                )
            layout.frozen[name] = RoleGroups(name, shape, 0, layout.student.pgc, layout.student.world)
    if rollout_engines:
        members = [layout.student.leader_of_dp_replica(0), *range(next_rank, next_rank + rollout_engines)]
        weights = dist.new_group(members, timeout=timeout)  # on every rank, as every group
        layout.rollout = RolloutRanks(next_rank, rollout_engines, weights if dist.get_rank() in members else None)
        next_rank += rollout_engines
    if next_rank != dist.get_world_size():
        raise ValueError(
            f"the role layout needs {next_rank} ranks (student {student.size} + dedicated frozen models + rollout "
            f"engines), but the world size is {dist.get_world_size()}"
        )
    # The local attention reads megatron's global memory buffer; it is normally made by initialize_model_parallel.
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    return layout
