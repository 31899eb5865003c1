"""The one typed config of a run: YAML plus dotted command-line overrides, checked before any process group.

OmegaConf merges the YAML and the overrides onto these dataclasses and checks types and choices (`Literal`);
`validate()` checks what types cannot (ranges and cross-field rules) and names the offending key in every error.
What needs more than the config itself (the objective's own rules, the world size, files on disk) is checked by
`preflight.check_run` before any process group exists.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

Dtype = Literal["fp32", "bf16"]
Placement = Literal["colocated", "dedicated", "sglang"]
Aggregation = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum"]


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
    dtype: Dtype = "fp32"
    fp8: Optional[Literal["e4m3", "hybrid"]] = None  # GPU + Transformer Engine only
    fp8_recipe: str = "delayed"
    # auto: Transformer Engine's fused attention where TE and a GPU are, else torch's fused attention (sdpa,
    # linear memory); megatron: megatron-core's local attention (S x S scores); te: TE or an error
    attention: Literal["auto", "sdpa", "megatron", "te"] = "auto"
    moe_aux_loss_coef: float = 0.0  # mixture of experts: the router's load-balancing loss weight (0: off)


@dataclass
class FrozenModelConfig:
    """A model that only scores: a teacher or the reference."""

    path: Optional[str] = None
    placement: Placement = "colocated"  # the student's ranks | ranks of its own | an SGLang server (`url`)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # dedicated only; colocated = the student's
    dp: int = 1  # replicas, for dedicated models
    dtype: Dtype = "fp32"
    url: Optional[str] = None  # placement sglang: the server's base URL; `path` is then a HF dir (tokenizer)


@dataclass
class TeacherConfig(FrozenModelConfig):
    name: str = MISSING
    path: Optional[str] = MISSING
    domains: list[str] = field(default_factory=list)


@dataclass
class ReferenceConfig(FrozenModelConfig):
    """path None: the student's initial weights (no extra file); else e.g. the teacher's pre-RL base."""


@dataclass
class AlgoConfig:
    name: Literal["gopd", "grpo", "sft"] = "gopd"  # the objective: algo/objectives.py
    lam: float = 1.0  # G-OPD reward scale: 1 = OPD, 1.25 = ExOPD
    loss: Literal["sampled", "full_vocab"] = "sampled"  # the paper's per-token estimator | the exact KL (G-OPD)
    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: Optional[float] = None
    tis_cap: Optional[float] = 5.0  # truncated importance weight cap; null switches the weight off
    aggregation: Aggregation = "seq-mean-token-mean"
    updates_per_batch: int = 1
    # where pi_old comes from: recompute (a forward before the update), rollout (the engine's log-probs, checked
    # against the update's own forward within max_rollout_mismatch), train_forward (the update's forward, detached:
    # exact when updates_per_batch = 1), auto (train_forward when updates_per_batch = 1, else recompute)
    old_logprobs: Literal["auto", "recompute", "rollout", "train_forward"] = "auto"
    max_rollout_mismatch: float = 1e-3  # old_logprobs=rollout: largest mean |log pi_rollout - log pi_theta| allowed
    kl_coef: float = 0.0  # GRPO only: KL to the reference


@dataclass
class RolloutConfig:
    engine: Literal["hf", "sglang"] = "hf"  # transformers | SGLang (GPU)
    # colocated: an engine on each student replica's leader, sharing its devices; dedicated: `engines` ranks of
    # their own, after every other role's, fed the weights after each update
    placement: Literal["colocated", "dedicated"] = "colocated"
    engines: int = 1
    # dedicated: how many steps the rollout may run ahead of the update (0: on-policy, as colocated; 1: the rollout
    # of step k+1 overlaps the update of step k, its samples one update old)
    max_staleness: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    samples_per_prompt: int = 1
    chunk_size: int = 16  # rows per generate call; each finished chunk streams to the teachers at once
    sync_bucket_mb: int = 512
    sglang_mem_fraction: float = 0.5
    engine_tp: Optional[int] = None  # sglang: GPUs per engine, 1 or the student's TP (None: the student's TP)
    sglang_deterministic: bool = False  # sglang honours the per-row sampling seeds only so (slower; exact resume)
    # hf engine: decode over a static KV cache with a torch.compile'd step (log-probs equal to float tolerance).
    # auto: when the run decodes enough to repay the compile (rollout.build.compiles_decode); always | never.
    # (always/never rather than on/off, which YAML reads as booleans)
    compile: Literal["auto", "always", "never"] = "auto"


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    max_prompt_len: int = 512
    prompts_per_step: int = 8
    on_bad_row: Literal["skip", "error"] = "skip"  # skip (counted) | error
    default_teacher: Optional[str] = None  # scores samples whose domain no teacher claims
    response_key: str = "response"  # SFT: the column holding the target response
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false} for Qwen3


@dataclass
class TrainConfig:
    steps: int = 50
    micro_batch_size: int = 4  # rows per micro-batch (the cap, when a token budget is set)
    seed: int = 1234
    output_dir: str = "runs/default"
    resume: str = "auto"  # auto (latest valid checkpoint, if any) | never | a checkpoint directory
    offload_optimizer: bool = False  # GPU: optimizer state and gradient buffers go to host during the rollout
    # activation recompute of the student: none | selective (attention's core) | full (every layer's activations
    # recomputed in the backward, megatron's uniform method)
    recompute: Literal["none", "selective", "full"] = "none"
    # token budget of a micro-batch (prompt + response tokens, padding included): a step's rows are grouped by
    # length under it; micro_batch_size stays the cap on rows. None: micro_batch_size rows per micro-batch.
    max_tokens_per_micro_batch: Optional[int] = None
    # the rows of a micro-batch laid end to end in one sequence (no padding; needs attention sdpa or te)
    pack_sequences: bool = False


@dataclass
class CheckpointConfig:
    interval: int = 10
    keep_last: int = 3
    # the distributed optimizer's state stored per parameter, so that a resume may change TP and PP as well as DP;
    # each save gathers it over DP (every DP rank holds its model shard's whole Adam state in host memory meanwhile).
    # false: each rank writes its flat shard, which reshards over DP only (megatron's default)
    fully_reshardable: bool = False


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
    http_retries: int = 3  # an SGLang server teacher: retries after a connection error, 5xx, timeout or bad reply


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay_steps: int | None = None  # None: the whole run
    decay_style: Literal["constant", "linear", "cosine"] = "constant"
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

    def teacher_for(self, domain: str) -> str:
        for teacher in self.teachers:
            if domain in teacher.domains:
                return teacher.name
        if self.data.default_teacher:
            return self.data.default_teacher
        raise KeyError(domain)


# ---- loading ------------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """YAML file + `a.b=c` overrides (list entries by index: `teachers.0.placement=dedicated`) -> a RunConfig
    checked by `validate`. Raises ConfigError naming the bad key."""
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config: {path} must hold a mapping, not {type(data).__name__}")
    for item in overrides:
        _apply_override(data, item)
    _check_keys(data, RunConfig, "")
    try:
        config: RunConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "config"
        message = getattr(e, "msg", str(e)).splitlines()[0]
        if "missing mandatory value" in message:
            message = "required, but not set"
        raise ConfigError(f"{key}: {message}") from None
    validate(config)
    return config


def _apply_override(data: dict, item: str) -> None:
    """Sets one `a.b=c` override in the YAML data, in place. A number after a list's key indexes into the list, as
    OmegaConf's own dotlists do for its containers (OmegaConf.from_dotlist alone would make it a mapping key)."""
    key, sep, raw = item.partition("=")
    if not sep or not all(key.split(".")):
        raise ConfigError(f"overrides: {item!r} is not a dotted key=value pair, e.g. algo.lam=1.25")
    try:  # as OmegaConf's dotlists: YAML scalars and lists, anything else as the text it is
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    node, parts = data, key.split(".")
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not re.fullmatch(r"\d+", part):
                raise ConfigError(f"{where}: {'.'.join(parts[:depth])} is a list; index it by number")
            if int(part) >= len(node):
                raise ConfigError(f"{where}: index {part} is out of range ({'.'.join(parts[:depth])} has "
                                  f"{len(node)} entries)")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:depth])} is a value, not a section")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and node.get(part) is None:
                node[part] = {}
            node = node[part]


def _schema_of(hint: Any) -> Any:
    """The dataclass (or list of dataclasses) behind a field's type hint, else None."""
    if is_dataclass(hint):
        return hint
    origin, args = get_origin(hint), get_args(hint)
    if origin is list and args:
        return [_schema_of(args[0])]
    return next((_schema_of(a) for a in args if a is not type(None) and _schema_of(a)), None)


def _choices(hint: Any) -> tuple | None:
    """The allowed values of a Literal (or Optional Literal) field, else None."""
    if get_origin(hint) is Literal:
        return get_args(hint)
    literal = [a for a in get_args(hint) if get_origin(a) is Literal]
    return get_args(literal[0]) + (None,) if literal else None


def _check_keys(data: Any, schema: Any, prefix: str) -> None:
    """Unknown keys, with a 'did you mean', and values outside a field's choices, named by their full path (OmegaConf
    names the key but suggests nothing, and loses the path inside lists)."""
    if isinstance(schema, list) and isinstance(data, list):
        for i, item in enumerate(data):
            _check_keys(item, schema[0], f"{prefix}[{i}]")
        return
    if not isinstance(data, dict) or not is_dataclass(schema):
        return
    known = [f.name for f in fields(schema)]
    hints = get_type_hints(schema)
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {known}"
            raise ConfigError(f"{path}: unknown config key; {hint}")
        choices = _choices(hints[key])
        if choices is not None and value not in choices:
            raise ConfigError(f"{path}: {value!r} is not one of {[c for c in choices if c is not None]}")
        _check_keys(value, _schema_of(hints[key]), path)


# ---- rules types cannot express -----------------------------------------------------------------------------


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def validate(config: RunConfig) -> None:
    """Ranges and cross-field rules of the config alone (no files, no world size, no objective)."""
    a, r, d, t = config.algo, config.rollout, config.data, config.train
    _require(a.lam > 0, "algo.lam", f"must be > 0, got {a.lam}")
    _require(a.updates_per_batch >= 1, "algo.updates_per_batch", "must be >= 1")
    _require(a.max_rollout_mismatch > 0, "algo.max_rollout_mismatch", "must be > 0")
    _require(r.temperature > 0, "rollout.temperature",
             f"must be > 0, got {r.temperature} (the log-probs of a greedy policy are not defined; sample at a "
             "small temperature instead)")
    _require(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    _require(r.samples_per_prompt >= 1, "rollout.samples_per_prompt", "must be >= 1")
    _require(r.chunk_size >= 1, "rollout.chunk_size", "must be >= 1")
    _require(r.engines >= 1, "rollout.engines", "must be >= 1")
    _require(r.max_staleness >= 0, "rollout.max_staleness", "must be >= 0")
    _require(r.max_staleness == 0 or r.placement == "dedicated", "rollout.max_staleness",
             "a colocated engine shares the student's devices, so it cannot generate while the student trains; "
             "use rollout.placement=dedicated")
    _require(r.compile != "always" or r.engine == "hf", "rollout.compile",
             "always compiles the transformers engine's decoding; rollout.engine sglang has its own (use auto or never)")
    if r.engine_tp is not None:
        _require(r.engine_tp in (1, config.student.parallel.tp), "rollout.engine_tp",
                 f"must be 1 or student.parallel.tp ({config.student.parallel.tp}), got {r.engine_tp}")
    _require(all(str(k).isidentifier() for k in d.chat_template_kwargs), "data.chat_template_kwargs",
             f"keys must be identifiers (keyword arguments of the chat template), got {list(d.chat_template_kwargs)}")
    _require(config.faults.http_retries >= 0, "faults.http_retries", "must be >= 0")
    _require(not t.offload_optimizer or config.optim.distributed_optimizer or config.student.dtype == "bf16",
             "train.offload_optimizer", "needs optim.distributed_optimizer or student.dtype bf16 (otherwise the "
             "optimizer steps the model's own weights, which the rollout needs on the GPU)")
    _require(d.prompts_per_step >= 1, "data.prompts_per_step", "must be >= 1")
    _require(t.steps >= 1, "train.steps", "must be >= 1")
    _require(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    if t.max_tokens_per_micro_batch is not None:
        _require(t.max_tokens_per_micro_batch >= d.max_prompt_len, "train.max_tokens_per_micro_batch",
                 f"{t.max_tokens_per_micro_batch} is below data.max_prompt_len={d.max_prompt_len}: no row would fit")
    _require(not t.pack_sequences or config.student.attention != "megatron", "train.pack_sequences",
             "packed rows need student.attention sdpa, te or auto (megatron's local attention cannot confine "
             "attention to each row)")
    _require(config.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    _require(config.optim.lr > 0, "optim.lr", f"must be > 0, got {config.optim.lr}")
    decay_steps = config.optim.decay_steps or t.steps
    _require(0 <= config.optim.warmup_steps < max(decay_steps, 1), "optim.warmup_steps",
             f"must be in [0, decay steps = {decay_steps}) (optim.decay_steps, else train.steps), "
             f"got {config.optim.warmup_steps}")

    names = [tc.name for tc in config.teachers]
    _require(len(set(names)) == len(names), "teachers", f"teacher names must be unique, got {names}")
    _require("reference" not in names, "teachers", "'reference' is reserved for the reference model")
    claimed: dict[str, str] = {}
    for i, tc in enumerate(config.teachers):
        _require(bool(tc.domains) or d.default_teacher == tc.name, f"teachers[{i}].domains",
                 f"teacher {tc.name!r} claims no domain and is not data.default_teacher")
        for domain in tc.domains:
            _require(domain not in claimed, f"teachers[{i}].domains",
                     f"domain {domain!r} is claimed by both {claimed.get(domain)!r} and {tc.name!r}")
            claimed[domain] = tc.name
    if d.default_teacher is not None:
        _require(d.default_teacher in names, "data.default_teacher", f"{d.default_teacher!r} is not a teacher {names}")
    _require(config.student.moe_aux_loss_coef >= 0, "student.moe_aux_loss_coef",
             f"must be >= 0, got {config.student.moe_aux_loss_coef}")
    for key, parallel, dp in [("student", config.student.parallel, 1)] + [
            (f"teachers[{i}]", tc.parallel, tc.dp) for i, tc in enumerate(config.teachers)] + [
            ("reference", config.reference.parallel, config.reference.dp)]:
        _require(min(parallel.tp, parallel.pp, parallel.ep, dp, parallel.etp or 1) >= 1, f"{key}.parallel",
                 f"tp, pp, ep, etp and dp must be >= 1, got {parallel} dp={dp}")
    for key, section in [(f"teachers[{i}]", tc) for i, tc in enumerate(config.teachers)] + [
            ("reference", config.reference)]:
        if section.placement == "sglang":
            _require(bool(section.url), f"{key}.url", "placement sglang needs the server's url")


def resolved(config: RunConfig) -> dict:
    """The config as plain data (for the run's config.yaml, and Weights & Biases)."""
    return json.loads(json.dumps(OmegaConf.to_container(OmegaConf.structured(config))))


def save_resolved(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(resolved(config)))
