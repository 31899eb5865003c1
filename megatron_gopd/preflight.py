"""The checks a run passes before any process group exists: the config against the checkpoints it names (their
shapes against the parallel sizes), the world size against the roles, and the output directory. Each failure is a
ConfigError naming the key."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from megatron_gopd import checkpoint
from megatron_gopd.algo.objectives import objective_class
from megatron_gopd.config import ConfigError, FrozenModelConfig, RunConfig
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.runtime.layout import experts_within_replica


def frozen_models(cfg: RunConfig) -> dict[str, FrozenModelConfig]:
    """name -> config section of every frozen model the run uses (the objective says which)."""
    return objective_class(cfg).frozen_models(cfg)


def _key(cfg: RunConfig, name: str) -> str:
    """A frozen model's config key, for errors."""
    return "reference" if name == "reference" else f"teachers[{[t.name for t in cfg.teachers].index(name)}]"


def check_run(cfg: RunConfig, world_size: int | None, *, files: bool = True) -> None:
    """Raises ConfigError naming the key, before any process group exists."""
    objective_class(cfg).check(cfg)
    models = frozen_models(cfg)
    for name, section in models.items():
        if section.placement == "sglang" and cfg.rollout.temperature != 1.0:
            raise ConfigError(f"rollout.temperature: {_key(cfg, name)} is an sglang server, which scores at "
                              "temperature 1; set rollout.temperature=1.0")
    for name, section in models.items():
        p = section.parallel
        # a dedicated model's replicas serve different students independently: a forward collective over replicas
        # (experts spread over them) would deadlock
        if section.placement == "dedicated" and not experts_within_replica(p.tp, p.ep, p.etp):
            raise ConfigError(f"{_key(cfg, name)}.parallel: a dedicated model's expert groups must stay inside one "
                              f"replica: etp*ep = {(p.etp or p.tp) * p.ep} must divide tp={p.tp} (e.g. tp: 2, ep: 2, "
                              "etp: 1)")
    if files:  # first: a checkpoint's shape (say ep against its experts) is the root cause of a rank-count error
        _check_files(cfg, models)
    if world_size is not None:
        student, d = cfg.student.parallel, cfg.data
        dedicated = sum(s.parallel.tp * s.parallel.pp * s.dp for s in models.values() if s.placement == "dedicated")
        engines = cfg.rollout.engines if cfg.rollout.placement == "dedicated" else 0
        student_ranks, per_replica = world_size - dedicated - engines, student.tp * student.pp
        if student_ranks < per_replica or student_ranks % per_replica:
            raise ConfigError(f"student.parallel: world size {world_size} minus {dedicated} dedicated frozen-model "
                              f"ranks{f' and {engines} rollout engine ranks' if engines else ''} leaves "
                              f"{student_ranks} student ranks, not a multiple of tp*pp={per_replica}")
        dp, experts = student_ranks // per_replica, (student.etp or student.tp) * student.ep
        if engines > dp:
            raise ConfigError(f"rollout.engines: {engines} dedicated engines for {dp} student replicas; each engine "
                              "serves whole replicas, so there can be at most one per replica")
        if (student.tp * dp) % experts:
            raise ConfigError(f"student.parallel.ep: etp*ep = {experts} must divide the tp*dp = {student.tp * dp} "
                              "ranks of a pipeline stage")
        if d.prompts_per_step % dp:
            raise ConfigError(f"data.prompts_per_step: {d.prompts_per_step} prompts per step do not split over "
                              f"{dp} data-parallel student replicas")


def _check_files(cfg: RunConfig, models: dict[str, FrozenModelConfig]) -> None:
    # A colocated model shares the student's groups, so it takes the student's parallel sizes whatever its own say.
    student = cfg.student.parallel
    checkpoints = [("student", cfg.student.path, student)]
    for name, section in models.items():
        key = _key(cfg, name)
        if section.placement == "sglang":
            if not (Path(section.path) / "config.json").is_file():
                raise ConfigError(f"{key}.path: {section.path}: an sglang model's path must be its HF directory "
                                  "(config, tokenizer)")
            continue
        parallel = section.parallel if section.placement == "dedicated" else student
        checkpoints.append((key, section.path or cfg.student.path, parallel))
    for key, path, parallel in checkpoints:
        hf_dir = Path(path) / "hf"
        if not hf_dir.is_dir():
            raise ConfigError(f"{key}.path: {str(path)!r} is not a megatron-gopd model checkpoint (no {hf_dir}); make one "
                              "with tools/convert_hf_to_megatron.py")
        dims = ModelDims.from_hf(hf_dir)
        colocated_dense = key != "student" and parallel is student and not dims.is_moe
        try:
            dims.check_parallel(parallel.tp, parallel.pp, *((1, None) if colocated_dense else (parallel.ep,
                                                                                               parallel.etp)))
        except ValueError as e:
            raise ConfigError(f"{key}.parallel: {e}") from None
        if key == "student" and dims.is_moe and parallel.tp > 1:
            raise ConfigError("student.parallel.tp: megatron trains a mixture of experts at tp > 1 only with "
                              "sequence parallelism, which this trainer does not enable; spread the experts with ep "
                              "(over data-parallel ranks) instead")
        if cfg.algo.loss == "full_vocab" and dims.is_moe and key != "student" and parallel is student and \
                not experts_within_replica(parallel.tp, parallel.ep, parallel.etp):
            raise ConfigError(f"algo.loss: full_vocab runs {key}'s forwards per teacher, unequal over replicas, "
                              "which a mixture of experts spread over data-parallel replicas (student.parallel.ep) "
                              "cannot")
    if not cfg.data.train:
        raise ConfigError("data.train: no training data given")
    _check_output_dir(cfg)
    for key, paths in [("data.train", cfg.data.train), ("data.eval", cfg.data.eval)]:
        for p in paths:  # a name without a path or a data suffix may be a datasets hub name
            if not Path(p).exists() and ("/" in p or p.endswith((".jsonl", ".json", ".parquet"))):
                raise ConfigError(f"{key}: no such file or directory {p}")


def _check_output_dir(cfg: RunConfig) -> None:
    """The run's directory takes files, and has room for the checkpoints, before the first step rather than at
    the first save: a checkpoint is about the student's weights plus Adam's state (two fp32 moments, and fp32
    master weights for bf16: 12 bytes per parameter in fp32, 14 in bf16), and a save needs room for one more than
    it keeps."""
    out = Path(cfg.train.output_dir)
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * (1 << 16))
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        if out.is_dir():
            probe.unlink(missing_ok=True)
        raise ConfigError(f"train.output_dir: cannot write to {out}: {e}") from None
    stored = sum(f.stat().st_size for f in (Path(cfg.student.path) / "dist").glob("*") if f.is_file())
    params = stored / (2 if checkpoint.read_checkpoint_metadata(cfg.student.path)["dtype"] == "bf16" else 4)
    needed = params * (14 if cfg.student.dtype == "bf16" else 12) * (cfg.checkpoint.keep_last + 1)
    free = shutil.disk_usage(out).free
    if free < needed:
        raise ConfigError(f"train.output_dir: {out} has {free / 2**30:.2f} GiB free, but {cfg.checkpoint.keep_last} "
                          f"kept checkpoints and the one being written need about {needed / 2**30:.2f} GiB; free space "
                          "or lower checkpoint.keep_last")
