"""The one typed config of a run: YAML plus dotted command-line overrides, validated before any process group.

OmegaConf merges the YAML and the overrides onto these dataclasses and checks types; `validate()` checks what
types cannot (sizes, paths, cross-field rules) and names the offending key in every error.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, get_args, get_type_hints

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad config value; the message starts with the dotted key."""


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallel (mixture-of-experts models): the ranks each sparse layer's experts spread over
    etp: Optional[int] = None  # expert tensor parallel; None: tp. ep * etp must divide tp * dp


@dataclass
class StudentConfig:
    path: str = MISSING  # a megatron-gopd model checkpoint (tools/convert_hf_to_megatron.py) with hf/ inside
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dtype: str = "fp32"  # fp32 | bf16
    fp8: Optional[str] = None  # e4m3 | hybrid (GPU + Transformer Engine only)
    fp8_recipe: str = "delayed"
    moe_aux_loss_coef: float = 0.0  # mixture of experts: the router's load-balancing loss weight (0: off)


@dataclass
class TeacherConfig:
    name: str = MISSING
    path: str = MISSING
    domains: list[str] = field(default_factory=list)
    placement: str = "colocated"  # colocated (student's ranks) | dedicated (ranks of its own) | sglang (a server)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # dedicated only; colocated = the student's
    dp: int = 1  # replicas, for dedicated teachers
    dtype: str = "fp32"
    url: Optional[str] = None  # placement sglang: the server's base URL; `path` is then a HF dir (tokenizer)


@dataclass
class ReferenceConfig:
    path: Optional[str] = None  # None: the student's initial weights (no extra file); else e.g. the teacher's base
    placement: str = "colocated"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    dp: int = 1
    dtype: str = "fp32"
    url: Optional[str] = None


@dataclass
class AlgoConfig:
    name: str = "gopd"  # gopd | grpo | sft
    lam: float = 1.0  # G-OPD reward scale: 1 = OPD, 1.25 = ExOPD
    loss: str = "sampled"  # sampled (the paper's per-token estimator) | full_vocab (exact KL to the G-OPD target)
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    tis_cap: Optional[float] = 5.0  # truncated importance weight cap; null switches the weight off
    aggregation: str = "seq-mean-token-mean"
    updates_per_batch: int = 1
    kl_coef: float = 0.0  # GRPO only: KL to the reference


@dataclass
class RolloutConfig:
    engine: str = "hf"  # hf (transformers) | sglang (GPU)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    samples_per_prompt: int = 1
    chunk_size: int = 16  # rows per generate call; each finished chunk streams to the teachers at once
    sync_bucket_mb: int = 512
    sglang_mem_fraction: float = 0.5


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    max_prompt_len: int = 512
    prompts_per_step: int = 8
    on_bad_row: str = "skip"  # skip (counted) | error
    default_teacher: Optional[str] = None  # scores samples whose domain no teacher claims
    response_key: str = "response"  # SFT: the column holding the target response


@dataclass
class TrainConfig:
    steps: int = 50
    micro_batch_size: int = 4
    seed: int = 1234
    output_dir: str = "runs/default"
    resume: str = "auto"  # auto (latest valid checkpoint, if any) | never | a checkpoint directory


@dataclass
class CheckpointConfig:
    interval: int = 10
    keep_last: int = 3


@dataclass
class EvalConfig:
    interval: int = 0  # 0: no evaluation during training
    at_start: bool = True  # also evaluate the initial model (when interval > 0)
    n: int = 4
    max_prompts: int = 256
    temperature: float = 1.0


@dataclass
class LogConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron-gopd"
    progress: bool = True


@dataclass
class FaultConfig:
    exchange_timeout_s: float = 600.0  # teacher streaming, weight sync, rollout broadcast
    max_bad_sample_fraction: float = 0.5  # more NaN/inf samples than this in a step skips the step
    max_consecutive_skips: int = 3


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: the whole run
    decay_style: str = "constant"  # constant | linear | cosine
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = True


@dataclass
class RunConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teachers: list[TeacherConfig] = field(default_factory=list)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)

    # -- derived facts the rest of the code asks for ---------------------------------------------------------
    def uses_reference(self) -> bool:
        """The reference cancels in OPD (lam = 1) when it is the student's init, so it is never run then."""
        if self.algo.name == "grpo":
            return self.algo.kl_coef > 0
        return self.algo.name == "gopd" and not (self.algo.lam == 1.0 and self.reference.path is None)

    def teacher_for(self, domain: str) -> str:
        for teacher in self.teachers:
            if domain in teacher.domains:
                return teacher.name
        if self.data.default_teacher:
            return self.data.default_teacher
        raise KeyError(domain)


def _check_keys(data: Any, schema: Any, prefix: str) -> None:
    """Unknown keys, with a 'did you mean' (OmegaConf names the key but suggests nothing)."""
    if isinstance(data, list):
        for i, item in enumerate(data):
            _check_keys(item, schema, f"{prefix}[{i}]")
        return
    if not isinstance(data, dict) or not is_dataclass(schema):
        return
    known = [f.name for f in fields(schema)]
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {known}"
            raise ConfigError(f"{path}: unknown config key; {hint}")
        child = get_type_hints(schema)[key]
        _check_keys(value, get_args(child)[0] if get_args(child) else child, path)


def load_config(path: str | Path | None = None, overrides: list[str] = (), *, world_size: int | None = None,
                check_paths: bool = True) -> RunConfig:
    """YAML file + `a.b=c` overrides -> a validated RunConfig. Raises ConfigError naming the bad key."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {path} must hold a mapping, not {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are dotted key=value pairs, e.g. algo.lam=1.25")
    override_data = OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    _check_keys(data, RunConfig, "")
    _check_keys(override_data, RunConfig, "")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), data, override_data)
        config: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        message = getattr(e, "msg", str(e)).splitlines()[0]
        if "missing mandatory value" in message:
            message = "required, but not set"
        raise ConfigError(f"{key}: {message}") from None
    validate(config, world_size=world_size, check_paths=check_paths)
    return config


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(value, key: str, choices) -> None:
    _require(value in choices, key, f"{value!r} is not one of {list(choices)}")


def validate(config: RunConfig, *, world_size: int | None = None, check_paths: bool = True) -> None:
    from megatron_gopd.models.architectures import ModelDims
    from megatron_gopd.runtime.layout import experts_within_replica

    a, r, d, t = config.algo, config.rollout, config.data, config.train
    _choice(a.name, "algo.name", ("gopd", "grpo", "sft"))
    _require(a.lam > 0, "algo.lam", f"must be > 0, got {a.lam}")
    _choice(a.loss, "algo.loss", ("sampled", "full_vocab"))
    _choice(a.aggregation, "algo.aggregation", ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum"))
    _require(a.updates_per_batch >= 1, "algo.updates_per_batch", "must be >= 1")
    _choice(r.engine, "rollout.engine", ("hf", "sglang"))
    _require(r.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1")
    _require(r.chunk_size >= 1, "rollout.chunk_size", "must be >= 1")
    _require(d.prompts_per_step >= 1, "data.prompts_per_step", "must be >= 1")
    _choice(d.on_bad_row, "data.on_bad_row", ("skip", "error"))
    _require(t.steps >= 1, "train.steps", "must be >= 1")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    _require(config.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _require(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
    _choice(config.optim.decay_style, "optim.decay_style", ("constant", "linear", "cosine"))
    decay_steps = config.optim.decay_steps or config.train.steps
    _require(0 <= config.optim.warmup_steps < max(decay_steps, 1), "optim.warmup_steps",
             f"must be in [0, decay steps = {decay_steps}) (optim.decay_steps, else train.steps), "
             f"got {config.optim.warmup_steps}")
    for key, dtype in [("student.dtype", config.student.dtype), ("reference.dtype", config.reference.dtype)] + [
        (f"teachers[{i}].dtype", tc.dtype) for i, tc in enumerate(config.teachers)
    ]:
        _choice(dtype, key, ("fp32", "bf16"))
    if config.student.fp8 is not None:
        _choice(config.student.fp8, "student.fp8", ("e4m3", "hybrid"))

    names = [tc.name for tc in config.teachers]
    _require(len(set(names)) == len(names), "teachers", f"teacher names must be unique, got {names}")
    _require("reference" not in names, "teachers", "'reference' is reserved for the reference model")
    claimed: dict[str, str] = {}
    placements = ("colocated", "dedicated", "sglang")
    frozen_sections = [(f"teachers[{i}]", tc) for i, tc in enumerate(config.teachers)]
    if config.uses_reference():
        frozen_sections.append(("reference", config.reference))
    for key, section in frozen_sections:
        _choice(section.placement, f"{key}.placement", placements)
        if section.placement == "sglang":
            _require(bool(section.url), f"{key}.url", "placement sglang needs the server's url")
            _require(r.temperature == 1.0, "rollout.temperature",
                     f"{key} is an sglang server, which scores at temperature 1; set rollout.temperature=1.0")
    for i, tc in enumerate(config.teachers):
        _require(bool(tc.domains) or d.default_teacher == tc.name, f"teachers[{i}].domains",
                 f"teacher {tc.name!r} claims no domain and is not data.default_teacher")
        for domain in tc.domains:
            _require(domain not in claimed, f"teachers[{i}].domains",
                     f"domain {domain!r} is claimed by both {claimed.get(domain)!r} and {tc.name!r}")
            claimed[domain] = tc.name
    if d.default_teacher is not None:
        _require(d.default_teacher in names, "data.default_teacher", f"{d.default_teacher!r} is not a teacher {names}")
    if a.name == "gopd":
        _require(bool(config.teachers), "teachers", "G-OPD needs at least one teacher")
    if a.loss == "full_vocab":  # the teachers' logits must sit on the student's own vocabulary shards
        _require(a.name == "gopd", "algo.loss", "full_vocab is a G-OPD loss")
        _require(config.student.parallel.pp == 1, "algo.loss", "full_vocab needs student.parallel.pp == 1")
        for key, section in frozen_sections:
            _require(section.placement == "colocated", f"{key}.placement", "algo.loss=full_vocab needs colocated models")

    _require(config.student.moe_aux_loss_coef >= 0, "student.moe_aux_loss_coef",
             f"must be >= 0, got {config.student.moe_aux_loss_coef}")
    for key, parallel in [("student", config.student.parallel)] + [
            (k, c.parallel) for k, c in frozen_sections if c.placement == "dedicated"]:
        _require(parallel.ep >= 1 and (parallel.etp is None or parallel.etp >= 1), f"{key}.parallel",
                 f"ep and etp must be >= 1, got ep={parallel.ep}, etp={parallel.etp}")
        # A dedicated model's replicas serve different students independently: a forward collective over
        # replicas (experts spread over them) would deadlock.
        _require(key == "student" or experts_within_replica(parallel.tp, parallel.ep, parallel.etp),
                 f"{key}.parallel", f"a dedicated model's expert groups must stay inside one replica: etp*ep = "
                 f"{(parallel.etp or parallel.tp) * parallel.ep} must divide tp={parallel.tp} (e.g. tp: 2, ep: 2, "
                 "etp: 1)")

    # Models: paths, architectures, and TP/PP/EP against the heads and experts.
    # A colocated model shares the student's groups, so it takes the student's parallel sizes whatever its own say.
    student_parallel = config.student.parallel
    models = [("student", config.student.path, student_parallel)] + [
        (key, section.path or config.student.path,
         section.parallel if section.placement == "dedicated" else student_parallel)
        for key, section in frozen_sections if section.placement != "sglang"
    ]
    if check_paths:
        for key, section in frozen_sections:
            if section.placement == "sglang":
                _require((Path(section.path) / "config.json").is_file(), f"{key}.path",
                         f"{section.path}: an sglang model's path must be its HF directory (config, tokenizer)")
        for key, model_path, parallel in models:
            hf_dir = Path(model_path) / "hf"
            _require(hf_dir.is_dir(), f"{key}.path",
                     f"{model_path} is not a megatron-gopd model checkpoint (no {hf_dir}); make one with "
                     "tools/convert_hf_to_megatron.py")
            try:
                dims = ModelDims.from_hf(hf_dir)
                colocated_dense = key != "student" and parallel is student_parallel and not dims.is_moe
                ep, etp = (1, None) if colocated_dense else (parallel.ep, parallel.etp)
                dims.check_parallel(parallel.tp, parallel.pp, ep, etp)
            except ValueError as e:
                raise ConfigError(f"{key}.parallel: {e}") from None
            _require(not (key == "student" and dims.is_moe and parallel.tp > 1), "student.parallel.tp",
                     "megatron trains a mixture of experts at tp > 1 only with sequence parallelism, which this "
                     "trainer does not enable; spread the experts with ep (over data-parallel ranks) instead")
            _require(not (a.loss == "full_vocab" and dims.is_moe and key != "student" and parallel is student_parallel
                          and not experts_within_replica(parallel.tp, parallel.ep, parallel.etp)), "algo.loss",
                     f"full_vocab runs {key}'s forwards per teacher, unequal over replicas, which a mixture of "
                     "experts spread over data-parallel replicas (student.parallel.ep) cannot")
        for key, paths in [("data.train", d.train), ("data.eval", d.eval)]:
            for p in paths:
                _require(Path(p).exists() or "/" not in p and not p.endswith((".jsonl", ".json", ".parquet")),
                         key, f"no such file or directory {p}")
    _require(bool(d.train), "data.train", "no training data given")

    # Placement and world size.
    student = config.student.parallel
    dedicated = sum(c.parallel.tp * c.parallel.pp * c.dp for _, c in frozen_sections if c.placement == "dedicated")
    if world_size is not None:
        student_ranks = world_size - dedicated
        per_replica = student.tp * student.pp
        _require(student_ranks >= per_replica and student_ranks % per_replica == 0, "student.parallel",
                 f"world size {world_size} minus {dedicated} dedicated frozen-model ranks leaves {student_ranks} "
                 f"student ranks, not a multiple of tp*pp={per_replica}")
        dp = student_ranks // per_replica
        experts = (student.etp or student.tp) * student.ep
        _require((student.tp * dp) % experts == 0, "student.parallel.ep",
                 f"etp*ep = {experts} must divide the tp*dp = {student.tp * dp} ranks of a pipeline stage")
        _require(d.prompts_per_step % dp == 0, "data.prompts_per_step",
                 f"{d.prompts_per_step} prompts per step do not split over {dp} data-parallel student replicas")
        rows = d.prompts_per_step // dp * r.samples_per_prompt
        _require(rows % t.micro_batch_size == 0, "train.micro_batch_size",
                 f"each replica's {rows} samples per step do not split into micro-batches of {t.micro_batch_size}")


def save_resolved(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(config))))))
