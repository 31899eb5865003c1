"""The estimated peak device memory of a run, per role and rank, before anything is launched (`tools/plan.py`), and
the same estimate as a warning when the trainer starts on a GPU.

Each rank's memory is summed per phase of a step, and its peak is the largest phase:
- resident (every phase): the student's weights (student.dtype), megatron DDP's fp32 gradient buffer, Adam's state
  (fp32 main parameters for bf16 weights, two fp32 moments), the last sharded over the data-parallel ranks by the
  distributed optimizer;
- rollout: the co-located engine's share (SGLang: rollout.sglang_mem_fraction of the GPU; it is released for
  the other phases) and the weight-sync buckets;
- scoring: pi_old's forward, or one colocated frozen model's weights (parked in host memory otherwise) and forward;
- loss (last stage): the activations autograd keeps for the backward of the micro-batches in flight, at the chosen
  recompute, plus the logits (with their gradient or transposed copy) and the chunked log-prob workspace;
- backward: the same activations, and a layer's backward (with full recompute: the layer recomputed, then its
  gradients);
- update (the optimizer step): Adam's fp32 temporaries.
A micro-batch holds `micro_batch_tokens` tokens: train.max_tokens_per_micro_batch, else micro_batch_size rows of
data.max_prompt_len + rollout.max_new_tokens (the longest row a step can have).

The activation counts are what megatron-core's local layer spec saves with SDPAttention on torch 2.13, term by
term (`LayerActivations`); tests/dist/recompute.py measures them exactly on CPU through autograd's saved-tensor
hooks. On a GPU with Transformer Engine's spec (fused norms and attention) they are an estimate. Not counted: the
CUDA context, NCCL buffers and allocator fragmentation, which `margin` leaves room for, and SGLang's own
activations and CUDA graphs outside its static fraction.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

from megatron_gopd.algo.logprobs import DEFAULT_CHUNK_BYTES
from megatron_gopd.config import RunConfig
from megatron_gopd.models.architectures import ModelDims, padded_vocab_size
from megatron_gopd.preflight import frozen_models

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
FP32 = 4
# the chunked log-prob functions keep at most this many fp32 chunk slabs alive (algo/logprobs.py)
LOGPROB_CHUNK_SLABS = 3


class PlanError(ValueError):
    """The plan cannot be made (a model's architecture cannot be found); the message names the model."""


# ---- the model ------------------------------------------------------------------------------------------------
def layer_params(dims: ModelDims, tp: int, *, sparse: bool = False, ep: int = 1, etp: int | None = None) -> int:
    """Parameters of one transformer layer on one rank (norms and the router are replicated, linear layers split
    over TP; a sparse layer's experts spread over `ep` ranks, each split over `etp`)."""
    q, kv, h = dims.num_heads * dims.head_dim, dims.num_kv_heads * dims.head_dim, dims.hidden_size
    qkv = h * (q + 2 * kv) + (q + 2 * kv if dims.qkv_bias else 0)
    norms = 2 * h + (2 * dims.head_dim if dims.qk_norm else 0)
    if sparse:
        return (qkv + q * h) // tp + dims.num_experts * h + expert_params(dims, tp, ep, etp) + norms
    return (qkv + q * h + 3 * h * dims.ffn_hidden_size) // tp + norms


def expert_params(dims: ModelDims, tp: int, ep: int = 1, etp: int | None = None) -> int:
    """Expert parameters of one sparse layer on one rank: its `num_experts / ep` SwiGLU experts, split over `etp`."""
    return dims.num_experts // ep * 3 * dims.hidden_size * dims.moe_ffn_hidden_size // (etp or tp)


def stage_layers(dims: ModelDims, pp: int, stage: int) -> range:
    per_stage = dims.num_layers // pp
    return range(stage * per_stage, (stage + 1) * per_stage)


def stage_params(dims: ModelDims, tp: int, pp: int, stage: int, ep: int = 1, etp: int | None = None) -> int:
    """Parameters on one rank of pipeline stage `stage`: its layers, the embedding on the first stage, the final
    norm and the output layer on the last (the first stage's embedding doubles as it when tied and pp = 1)."""
    vocab = padded_vocab_size(dims.vocab_size) * dims.hidden_size // tp
    params = sum(layer_params(dims, tp, sparse=i in dims.moe_layers, ep=ep, etp=etp)
                 for i in stage_layers(dims, pp, stage))
    if stage == 0:
        params += vocab
    if stage == pp - 1:
        params += dims.hidden_size + (0 if dims.tie_word_embeddings and pp == 1 else vocab)
    return params


@dataclass(frozen=True)
class LayerActivations:
    """Bytes per token that one transformer layer keeps for its backward (`kept`), and what it keeps without
    recompute (`full`: also its live temporaries in a forward, and about what its backward allocates)."""

    kept: float
    full: float


def layer_activations(dims: ModelDims, *, tp: int, dtype: str, attention: str, recompute: str,
                      seq: int, sparse: bool = False, etp: int | None = None) -> LayerActivations:
    """What megatron's local layer (RMSNorm, SwiGLU, GQA, RoPE; no sequence parallelism) saves per token, each
    tensor counted once however many autograd nodes hold it. `seq` is the longest row, for attention 'megatron'
    (its S x S probabilities). A sparse (mixture-of-experts) layer's MLP is an estimate, not measured: the
    router's fp32 logits and probabilities, and per routed copy of a token (top-k of them, spread evenly over the
    expert ranks) its permuted input, its expert's SwiGLU (split over `etp`) and its output before unpermuting."""
    d = DTYPE_BYTES[dtype]
    h, f, hd = dims.hidden_size, dims.ffn_hidden_size, dims.head_dim
    q, kv = dims.num_heads * hd // tp, dims.num_kv_heads * hd // tp
    heads, groups = dims.num_heads // tp, dims.num_kv_heads // tp

    def norm(width: int, rows: int) -> int:
        # torch's RMSNorm, whose weight megatron leaves in fp32 whatever the model's dtype: torch's unfused path,
        # which keeps its input upcast to fp32, the normalised fp32 and 1/rms
        return (2 * width + rows) * FP32

    saved = (
        2 * norm(h, 1)  # input_layernorm, pre_mlp_layernorm
        + 2 * h * d  # the inputs of linear_qkv and linear_fc1 (the norms' outputs, times their weights)
        + (q + 2 * kv) * d  # linear_qkv's output (v is a view of it)
        + 4 * hd * d  # RoPE's cos and sin, for q and for k
    )
    if sparse:
        saved += 2 * dims.num_experts * FP32 + dims.moe_topk * (2 * h + 5 * dims.moe_ffn_hidden_size // (etp or tp)) * d
    else:  # SwiGLU: fc1's output (2f), silu(gate), the linear half's copy, their product (fc2's input)
        saved += 5 * f // tp * d
    if dims.qk_norm:
        saved += norm(q, heads) + norm(kv, groups)
        if d == FP32:  # no upcast: k's input is a view of linear_qkv's output, and so is q's with one query group
            saved -= (kv + (q if groups == 1 else 0)) * FP32
    rows_attention = (q + kv + q) * d  # rotated q and k, and the output (linear_proj's input)
    if attention == "megatron":
        # q, and k, v repeated to every head, each copied for the batched matmuls, and the softmax [heads, S, S]
        internal = (3 * q + q) * d + heads * seq * d - rows_attention
    else:  # torch's fused attention (sdpa; te: about the same) keeps its log-sum-exp
        internal = heads * FP32
    full = saved + rows_attention + internal
    if recompute == "full":  # only the layer's input
        return LayerActivations(kept=h * d, full=full)
    if recompute == "selective":  # the core attention's inputs, not its internals
        return LayerActivations(kept=full - internal, full=full)
    return LayerActivations(kept=full, full=full)


def logits_bytes(dims: ModelDims, tp: int, dtype: str, tokens: int) -> float:
    """The logits of `tokens` tokens on one TP rank (their own vocabulary shard)."""
    return tokens * padded_vocab_size(dims.vocab_size) // tp * DTYPE_BYTES[dtype]


def logprob_workspace(dims: ModelDims, tp: int, tokens: int) -> float:
    """The chunked log-prob kernel's fp32 slabs (algo/logprobs.py): DEFAULT_CHUNK_BYTES each, or the whole
    [tokens, V/tp] when smaller."""
    return LOGPROB_CHUNK_SLABS * min(DEFAULT_CHUNK_BYTES, tokens * padded_vocab_size(dims.vocab_size) // tp * FP32)


def head_bytes_per_token(dims: ModelDims, dtype: str) -> float:
    """What the last stage keeps besides its layers and logits: the final norm's tensors and the output layer's
    input."""
    return (2 * dims.hidden_size + 1) * FP32 + dims.hidden_size * DTYPE_BYTES[dtype]


def stage_activations(dims: ModelDims, *, pp: int, stage: int, etp: int | None = None,
                      **kwargs) -> list[LayerActivations]:
    """layer_activations of each layer of the stage (`kwargs`: tp, dtype, attention, recompute, seq)."""
    return [layer_activations(dims, sparse=i in dims.moe_layers, etp=etp, **kwargs)
            for i in stage_layers(dims, pp, stage)]


def forward_transient(dims: ModelDims, *, tp: int, pp: int, stage: int, dtype: str, attention: str,
                      tokens: int, seq: int, etp: int | None = None) -> float:
    """A forward without gradients (scoring, pi_old): one layer's temporaries, and on the last stage the logits,
    their transposed copy and the log-prob workspace."""
    layers = stage_activations(dims, pp=pp, stage=stage, etp=etp, tp=tp, dtype=dtype, attention=attention,
                               recompute="none", seq=seq)
    out = max(layer.full for layer in layers) * tokens
    if stage == pp - 1:
        out += 2 * logits_bytes(dims, tp, dtype, tokens) + logprob_workspace(dims, tp, tokens)
    return out


# ---- the run --------------------------------------------------------------------------------------------------
def row_length(cfg: RunConfig) -> int:
    return cfg.data.max_prompt_len + cfg.rollout.max_new_tokens


def micro_batch_tokens(cfg: RunConfig) -> int:
    """Tokens of the largest micro-batch: the token budget (a row longer than it gets a micro-batch of its own),
    else micro_batch_size rows of the longest length; micro_batch_size caps the rows either way."""
    row, rows = row_length(cfg), cfg.train.micro_batch_size
    budget = cfg.train.max_tokens_per_micro_batch
    return rows * row if budget is None else min(rows * row, max(budget, row))


@dataclass
class Term:
    name: str
    bytes: float
    knobs: str = ""  # the config keys that change it


@dataclass
class RankPlan:
    """One kind of rank (`count` ranks alike): its memory per phase."""

    role: str
    where: str
    count: int
    phases: dict[str, list[Term]] = field(default_factory=dict)

    def total(self, phase: str) -> float:
        return sum(t.bytes for t in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.total)

    @property
    def peak(self) -> float:
        return self.total(self.peak_phase)


@dataclass
class Plan:
    ranks: list[RankPlan]
    budget: float  # bytes per GPU
    margin: float  # fraction of the budget left for what the estimate does not count
    world_size: int
    micro_batch_tokens: int
    row_length: int
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> float:
        return self.budget * (1 - self.margin)

    def over(self) -> list[RankPlan]:
        return [r for r in self.ranks if r.peak > self.usable]

    @property
    def peak(self) -> float:
        return max(r.peak for r in self.ranks)


KNOBS = {
    "weights": "student.parallel.tp / pp",
    "grads": "student.parallel.tp / pp",
    "optimizer": "more data-parallel ranks, optim.distributed_optimizer=true, student.parallel.tp / pp",
    "activations": "train.recompute, train.max_tokens_per_micro_batch / micro_batch_size, student.parallel.tp / pp",
    "layer backward": "train.max_tokens_per_micro_batch / micro_batch_size, student.parallel.tp",
    "logits": "train.max_tokens_per_micro_batch / micro_batch_size, student.parallel.tp",
    "forward": "train.max_tokens_per_micro_batch / micro_batch_size",
    "engine": "rollout.sglang_mem_fraction",
    "sync buckets": "rollout.sync_bucket_mb",
}


def find_model_config(path: str, recipe_dir: Path | None) -> Path:
    """The HF config.json of a model: in its megatron-gopd checkpoint (<path>/hf), in a HF directory, or, before
    the checkpoint exists, the copy a recipe ships beside its config (<recipe>/models/<name>/config.json)."""
    candidates = [Path(path) / "hf" / "config.json", Path(path) / "config.json"]
    if recipe_dir is not None:
        candidates.append(recipe_dir / "models" / Path(path).name / "config.json")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise PlanError(f"{path}: no HF config.json found (looked at {', '.join(map(str, candidates))}); convert the "
                    "model, or put its config.json at the last of these")


def make_plan(cfg: RunConfig, *, world_size: int | None = None, gpu_memory_gb: float = 80.0, margin: float = 0.1,
              recipe_dir: Path | None = None) -> Plan:
    """The memory plan of `cfg` on GPUs of `gpu_memory_gb` GiB. `world_size` defaults to the fewest ranks the
    run can have (one student replica: the optimizer unsharded)."""
    models = frozen_models(cfg)
    path_of = {name: c.path or cfg.student.path for name, c in models.items()}
    dims_cache: dict[str, ModelDims] = {}

    def dims_of(path: str) -> ModelDims:
        if path not in dims_cache:
            dims_cache[path] = ModelDims.from_hf(find_model_config(path, recipe_dir))
        return dims_cache[path]

    sp = cfg.student.parallel
    dedicated = {n: c for n, c in models.items() if c.placement == "dedicated"}
    world_size = world_size or _min_world(cfg)
    replica = sp.tp * sp.pp
    dp = max(1, (world_size - (_min_world(cfg) - replica)) // replica)
    engine_ranks = cfg.rollout.placement == "dedicated"
    tokens, row = micro_batch_tokens(cfg), row_length(cfg)
    student = dims_of(cfg.student.path)
    dtype, attention = cfg.student.dtype, _attention(cfg.student.attention)
    colocated = {n: (dims_of(path_of[n]), c.dtype) for n, c in models.items() if c.placement == "colocated"}
    rows_per_micro_batch = max(1, tokens // row)
    micro_batches = math.ceil(cfg.data.prompts_per_step // dp * cfg.rollout.samples_per_prompt / rows_per_micro_batch)
    gpu = gpu_memory_gb * GiB
    sync = min(cfg.rollout.sync_bucket_mb * 2**20, stage_params(student, 1, 1, 0) * DTYPE_BYTES[dtype])

    ranks = []
    for stage in range(sp.pp):
        n_params = stage_params(student, sp.tp, sp.pp, stage, sp.ep, sp.etp)
        # the distributed optimizer shards dense parameters over DP, experts over the expert-DP group (the stage's
        # tp * dp ranks over etp * ep)
        n_experts = sum(expert_params(student, sp.tp, sp.ep, sp.etp)
                        for i in stage_layers(student, sp.pp, stage) if i in student.moe_layers)
        dense_shards, expert_shards = (dp, sp.tp * dp // ((sp.etp or sp.tp) * sp.ep)) \
            if cfg.optim.distributed_optimizer else (1, 1)
        sharded = (n_params - n_experts) / dense_shards + n_experts / expert_shards
        resident = [Term("weights", n_params * DTYPE_BYTES[dtype]), Term("grads", n_params * FP32),
                    Term("optimizer", sharded * (12 if dtype == "bf16" else 8))]
        kept = _update_activations(cfg, student, stage=stage, tokens=tokens, seq=row,
                                   in_flight=min(sp.pp - stage, micro_batches))
        activations = resident + [Term("activations", kept.kept)]
        phases = {"backward": activations + [Term("layer backward", kept.transient)]}
        if stage == sp.pp - 1:  # the loss's backward starts with every activation kept and the logits' gradient
            loss = activations + [Term("logits", 2 * logits_bytes(student, sp.tp, dtype, tokens)
                                       + logprob_workspace(student, sp.tp, tokens))]
            if cfg.algo.loss == "full_vocab":  # every colocated model onloaded, their logits beside the student's
                loss += [Term(f"frozen {name}", stage_params(d, sp.tp, sp.pp, stage, sp.ep, sp.etp)
                              * DTYPE_BYTES[frozen_dtype]
                              + logits_bytes(d, sp.tp, frozen_dtype, tokens))
                         for name, (d, frozen_dtype) in colocated.items()]
            phases["loss"] = loss
        scoring = [resident + [Term("forward", forward_transient(student, tp=sp.tp, pp=sp.pp, stage=stage,
                                                                    dtype=dtype, attention=attention, tokens=tokens,
                                                                    seq=row, etp=sp.etp))]]
        for name, (d, frozen_dtype) in colocated.items():
            scoring.append(resident + [
                Term(f"frozen {name}", stage_params(d, sp.tp, sp.pp, stage, sp.ep, sp.etp) * DTYPE_BYTES[frozen_dtype]),
                Term("forward", forward_transient(d, tp=sp.tp, pp=sp.pp, stage=stage, dtype=frozen_dtype,
                                                  attention="sdpa", tokens=tokens, seq=row, etp=sp.etp)),
            ])
        phases["scoring"] = max(scoring, key=lambda terms: sum(t.bytes for t in terms))
        phases["update"] = resident + [Term("adam temporaries", sharded * FP32)]
        rollout = list(resident)
        if cfg.algo.loss == "full_vocab":  # the loss onloads the colocated models; the next scoring parks them
            rollout += [Term(f"frozen {name}", stage_params(d, sp.tp, sp.pp, stage, sp.ep, sp.etp)
                             * DTYPE_BYTES[frozen_dtype]) for name, (d, frozen_dtype) in colocated.items()]
        if stage == 0 and not engine_ranks:  # the replica's leader (tp rank 0) hosts the rollout engine
            leader = RankPlan("student", "pp stage 0, tp rank 0 (rollout engine)", dp, dict(phases))
            leader.phases["rollout"] = rollout + [Term("engine", _engine_bytes(cfg, student, gpu, row)),
                                                  Term("sync buckets", 2 * sync)]
            ranks.append(leader)
            if sp.tp > 1:
                ranks.append(RankPlan("student", "pp stage 0, tp ranks 1+", (sp.tp - 1) * dp,
                                      dict(phases, rollout=rollout + [Term("sync buckets", sync)])))
        else:
            ranks.append(RankPlan("student", f"pp stage {stage}", sp.tp * dp,
                                  dict(phases, rollout=rollout + [Term("sync buckets", sync)])))

    if engine_ranks:  # each engine rank holds a whole engine and receives the weights bucket by bucket
        ranks.append(RankPlan("rollout", "dedicated engine", cfg.rollout.engines, {"rollout": [
            Term("engine", _engine_bytes(cfg, student, gpu, row)), Term("sync buckets", 2 * sync)]}))
    for name, section in dedicated.items():
        d, p = dims_of(path_of[name]), section.parallel
        for stage in range(p.pp):
            ranks.append(RankPlan(name, f"dedicated, pp stage {stage}" if p.pp > 1 else "dedicated",
                                  p.tp * section.dp, {"scoring": [
                                      Term("weights", stage_params(d, p.tp, p.pp, stage, p.ep, p.etp)
                                           * DTYPE_BYTES[section.dtype]),
                                      Term("forward", forward_transient(d, tp=p.tp, pp=p.pp, stage=stage,
                                                                        dtype=section.dtype, attention="sdpa",
                                                                        tokens=tokens, seq=row, etp=p.etp))]}))
    for r in ranks:
        for terms in r.phases.values():
            for term in terms:
                term.knobs = KNOBS.get(term.name, "placement: dedicated, dtype: bf16"
                                       if term.name.startswith("frozen") else "")
    notes = [f"{name}: served by SGLang at {c.url}, not on these GPUs"
             for name, c in models.items() if c.placement == "sglang"]
    if any(dims.is_moe for dims in dims_cache.values()):
        notes.append("mixture of experts: the expert weights are counted exactly, their activations estimated "
                     "(tokens spread evenly over the expert ranks)")
    if cfg.student.attention in ("auto", "te"):
        notes.append("attention auto/te: with Transformer Engine the activations are counted as the local spec's; "
                     "TE's fused norms keep no fp32 copies, so the estimate errs high there")
    return Plan(ranks, gpu, margin, world_size, tokens, row, notes)


def _attention(choice: str) -> str:
    return "megatron" if choice == "megatron" else "sdpa"


@dataclass(frozen=True)
class _Kept:
    kept: float  # what autograd keeps at the start of the backward
    transient: float  # what the backward adds on top, besides the logits


def _update_activations(cfg: RunConfig, dims: ModelDims, *, stage: int, tokens: int, seq: int,
                        in_flight: int) -> _Kept:
    """One stage's activations at the start of its first backward (1F1B: stage s has pp - s micro-batches in
    flight), and the transient of a layer's backward (with full recompute: the layer recomputed, then its
    gradients)."""
    sp, dtype = cfg.student.parallel, cfg.student.dtype
    layers = stage_activations(dims, pp=sp.pp, stage=stage, etp=sp.etp, tp=sp.tp, dtype=dtype,
                               attention=_attention(cfg.student.attention), recompute=cfg.train.recompute, seq=seq)
    per_token = sum(layer.kept for layer in layers)
    if stage == sp.pp - 1:
        per_token += head_bytes_per_token(dims, dtype)
    if stage > 0:  # the activation received from the previous stage
        per_token += dims.hidden_size * DTYPE_BYTES[dtype]
    backward = max(layer.full for layer in layers) * tokens * (2 if cfg.train.recompute == "full" else 1)
    return _Kept(per_token * tokens * in_flight, backward)


def _engine_bytes(cfg: RunConfig, dims: ModelDims, gpu: float, row: int) -> float:
    if cfg.rollout.engine == "sglang":  # weights and KV cache: its static fraction of the whole GPU
        return cfg.rollout.sglang_mem_fraction * gpu
    # the transformers engine: a whole copy of the student and the KV cache of a generate call's rows
    d = DTYPE_BYTES[cfg.student.dtype]
    mbs = cfg.train.micro_batch_size
    rows = max(mbs, cfg.rollout.chunk_size // mbs * mbs)  # the trainer's rows per generate call
    kv = 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * d * rows * row
    return stage_params(dims, 1, 1, 0) * d + kv


# ---- what fixes it --------------------------------------------------------------------------------------------
def with_overrides(cfg: RunConfig, overrides: dict[str, object]) -> RunConfig:
    """A copy of `cfg` with dotted keys set (values already of the right type)."""
    out = copy.deepcopy(cfg)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        target = out
        for part in parents:
            target = getattr(target, part)
        setattr(target, last, value)
    return out


def fixes(cfg: RunConfig, plan: Plan, **plan_kwargs) -> list[tuple[dict[str, object], Plan]]:
    """Config changes (single knobs, then the two usual ones together) under which every rank fits, each with
    its plan; none when the run already fits."""
    if not plan.over():
        return []
    sp, t = cfg.student.parallel, cfg.train
    candidates: list[dict[str, object]] = []
    if t.recompute != "full":
        candidates.append({"train.recompute": "full"})
    if cfg.student.attention == "megatron" and t.recompute == "none":
        candidates.append({"train.recompute": "selective"})
    if plan.micro_batch_tokens > plan.row_length:
        candidates.append({"train.max_tokens_per_micro_batch": plan.row_length})
        if t.recompute != "full":
            candidates.append({"train.recompute": "full", "train.max_tokens_per_micro_batch": plan.row_length})
    for key in ("tp", "pp"):
        candidates.append({f"student.parallel.{key}": getattr(sp, key) * 2})
    if cfg.rollout.engine == "sglang":
        candidates.append({"rollout.sglang_mem_fraction": round(cfg.rollout.sglang_mem_fraction - 0.1, 2)})
    found = []
    for overrides in candidates:
        changed = with_overrides(cfg, overrides)
        if _min_world(changed) > plan.world_size:
            continue
        try:
            if "student.parallel.tp" in overrides or "student.parallel.pp" in overrides:
                dims = ModelDims.from_hf(find_model_config(cfg.student.path, plan_kwargs.get("recipe_dir")))
                dims.check_parallel(changed.student.parallel.tp, changed.student.parallel.pp)
            candidate = make_plan(changed, world_size=plan.world_size, **plan_kwargs)
        except ValueError:  # a parallel size the model cannot be split into, a fraction below 0
            continue
        if not candidate.over():
            found.append((overrides, candidate))
    return found


def _min_world(cfg: RunConfig) -> int:
    """One student replica, the dedicated frozen models' ranks and the dedicated rollout engines."""
    dedicated = sum(c.parallel.tp * c.parallel.pp * c.dp for c in frozen_models(cfg).values()
                    if c.placement == "dedicated")
    engines = cfg.rollout.engines if cfg.rollout.placement == "dedicated" else 0
    return cfg.student.parallel.tp * cfg.student.parallel.pp + dedicated + engines


# ---- reports --------------------------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / GiB:.1f}"


PHASES = ("rollout", "scoring", "loss", "backward", "update")
RESIDENT = ("weights", "grads", "optimizer")


def table(plan: Plan) -> str:
    """Per kind of rank: its resident terms and each phase's total (GiB), as a markdown table."""
    header = ["role", "ranks", "n", *RESIDENT, *PHASES, "peak GiB", "fits"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in plan.ranks:
        resident = {t.name: t.bytes for t in r.phases[r.peak_phase] if t.name in RESIDENT}
        cells = [r.role, r.where, str(r.count), *(gib(resident[n]) if n in resident else "" for n in RESIDENT),
                 *(gib(r.total(p)) if p in r.phases else "" for p in PHASES), gib(r.peak),
                 "yes" if r.peak <= plan.usable else "**no**"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def biggest_terms(rank: RankPlan, n: int = 3) -> list[Term]:
    return sorted((t for t in rank.phases[rank.peak_phase] if t.name not in RESIDENT), key=lambda t: -t.bytes)[:n]


def report(cfg: RunConfig, plan: Plan, **plan_kwargs) -> str:
    """The table, the settings it assumes, and for each rank over budget its biggest terms, the knobs that change
    them, and the config changes under which everything fits."""
    out = [f"memory plan: {plan.world_size} ranks, GPUs of {gib(plan.budget)} GiB, {plan.margin:.0%} kept free "
           f"(usable {gib(plan.usable)} GiB); micro-batches of {plan.micro_batch_tokens} tokens (rows of up to "
           f"{plan.row_length}), recompute {cfg.train.recompute}, student {cfg.student.dtype}", "", table(plan)]
    out += [f"note: {n}" for n in plan.notes]
    out.append("")
    for r in plan.ranks:
        terms = ", ".join(f"{t.name} {gib(t.bytes)}" for t in biggest_terms(r))
        out.append(f"{r.role} ({r.where}): peak in its {r.peak_phase} phase, {gib(r.peak)} GiB: resident state and "
                   f"{terms} GiB")
    over = plan.over()
    if not over:
        out.append(f"\nfits: peak {gib(plan.peak)} GiB of {gib(plan.usable)} usable")
        return "\n".join(out)
    for r in over:
        terms = sorted(r.phases[r.peak_phase], key=lambda t: -t.bytes)[:3]
        out.append(f"\nOVER BUDGET: {r.role} ({r.where}) peaks at {gib(r.peak)} GiB in its {r.peak_phase} phase, "
                   f"over the usable {gib(plan.usable)} GiB. Biggest terms:")
        out += [f"  {t.name} {gib(t.bytes)} GiB" + (f" (knobs: {t.knobs})" if t.knobs else "") for t in terms]
    found = fixes(cfg, plan, **plan_kwargs)
    if found:
        out.append("\nfits with:")
        out += [f"  {' '.join(f'{k}={v}' for k, v in o.items())}  (peak {gib(p.peak)} GiB)" for o, p in found]
    else:
        out.append("\nnone of the usual changes fits alone (recompute, a token budget of one row, tp or pp x2, a "
                   "smaller SGLang fraction): combine them, or use more GPUs")
    return "\n".join(out)


def startup_lines(cfg: RunConfig, world_size: int, gpu_memory_bytes: int) -> list[str]:
    """What the trainer logs at its start on a GPU: the estimated peak, and a warning for each kind of rank the
    estimate puts over the GPU (less the default margin)."""
    try:
        plan = make_plan(cfg, world_size=world_size, gpu_memory_gb=gpu_memory_bytes / GiB)
    except ValueError as e:  # an architecture the planner cannot count: the run itself decides
        return [f"memory plan: no estimate ({e})"]
    lines = [f"memory plan: estimated peak {gib(plan.peak)} GiB per GPU of {gib(plan.budget)} GiB "
             f"(micro-batches of {plan.micro_batch_tokens} tokens, recompute {cfg.train.recompute})"]
    for r in plan.over():
        terms = ", ".join(f"{t.name} {gib(t.bytes)}" for t in biggest_terms(r))
        lines.append(f"WARNING: memory plan: {r.role} ({r.where}) may need {gib(r.peak)} GiB in its {r.peak_phase} "
                     f"phase, over {gib(plan.usable)} GiB ({terms} GiB); `python tools/plan.py --config ...` names "
                     "the settings that fit")
    return lines
