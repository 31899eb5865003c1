"""The training objectives: G-OPD (the paper's; sampled, or exact over the full vocabulary), GRPO and SFT.

An objective says which frozen models score a row and what a row brings to the student's micro-batches from their
scores, what a step computes from all its rows before the update, and the loss of a micro-batch. The trainer asks
it and never tests which one it is. A new objective is one class here and its name in `AlgoConfig.name`.

Micro-batches reach `loss` laid out as batching.py says, with `loss_mask` (the response tokens of the rows that
passed the trainer's NaN guard), `rollout_lp`, `old_lp` when pi_old was recomputed before the update (else the
update's own forward, detached, is pi_old, or the rollout's log-probs with algo.old_logprobs=rollout), and what
`inputs` and `prepare` added.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Hashable

import torch

from megatron_gopd.algo.logprobs import full_vocab_gopd_kl
from megatron_gopd.algo.losses import PolicyLossConfig, aggregate_loss, gopd_advantages, policy_loss
from megatron_gopd.batching import MicroBatch, spread
from megatron_gopd.config import ConfigError, FrozenModelConfig, RunConfig
from megatron_gopd.data.prompts import PromptItem
from megatron_gopd.metrics import Metrics, Stat, mismatch_metrics
from megatron_gopd.rollout.base import Sample

Scores = dict[str, torch.Tensor]  # frozen model name -> a row's log-probs


@dataclass
class RunParts:
    """What of the run an objective may use beyond the config (each takes what it needs)."""

    tokenizer: object
    verify: Callable[[list[PromptItem], list[list[int]]], list[float]]  # binary rewards of responses, per row
    colocated: dict[str, object]  # the colocated frozen models (teachers.frozen.FrozenModel), by name
    vocab_size: int
    tp_group: object


class Objective:
    name: ClassVar[str]
    on_policy: ClassVar[bool] = True  # samples come from the student's rollout (SFT: from the dataset)
    routes_by_domain: ClassVar[bool] = False  # every prompt's domain must have a teacher

    def __init__(self, cfg: RunConfig, parts: RunParts):
        self.cfg = cfg
        a = cfg.algo
        self.policy = PolicyLossConfig(a.clip_low, a.clip_high, a.dual_clip, a.tis_cap, a.aggregation)
        self.old_from = resolved_old_logprobs(cfg)

    # ---- the run's shape --------------------------------------------------------------------------------------
    @classmethod
    def frozen_models(cls, cfg: RunConfig) -> dict[str, FrozenModelConfig]:
        """name -> config section of every frozen model the objective needs (they are placed and loaded)."""
        return {}

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Rules of the config that only this objective has (ConfigError naming the key)."""

    # ---- a row --------------------------------------------------------------------------------------------------
    def scorers(self, item: PromptItem) -> list[str]:
        """The frozen models that score this row."""
        return []

    def inputs(self, item: PromptItem, scores: Scores) -> dict[str, torch.Tensor]:
        """This row's per-token inputs of the loss ([its length] each), from its scores."""
        return {}

    def group(self, item: PromptItem) -> Hashable:
        """Rows of different groups never share a micro-batch."""
        return None

    # ---- a step -------------------------------------------------------------------------------------------------
    def prepare(self, items: list[PromptItem], samples: list[Sample]) -> tuple[dict[str, torch.Tensor], Metrics]:
        """Before the update, from all of a replica's rows: per-row values ([rows] each, laid into the
        micro-batches) and metric partials."""
        return {}, {}

    def loss(self, mb: MicroBatch, lp: torch.Tensor, entropy: torch.Tensor | None, logits: torch.Tensor,
             denominator: float) -> tuple[torch.Tensor, Metrics]:
        """The micro-batch's share of the step's loss (`denominator`: the step's global normaliser), and metric
        partials."""
        raise NotImplementedError

    # ---- shared pieces ------------------------------------------------------------------------------------------
    def old_logprobs(self, mb: MicroBatch, lp: torch.Tensor) -> torch.Tensor:
        """pi_old of the micro-batch's tokens, as algo.old_logprobs says."""
        if self.old_from == "recompute":
            return mb["old_lp"]
        return mb["rollout_lp"] if self.old_from == "rollout" else lp.detach()

    def _policy_gradient(self, mb: MicroBatch, lp: torch.Tensor, advantages: torch.Tensor,
                         denominator: float) -> tuple[torch.Tensor, Metrics]:
        mask, old = mb["loss_mask"], self.old_logprobs(mb, lp)
        loss, metrics = policy_loss(lp, old, torch.where(mask.bool(), advantages, 0.0), mask, self.policy,
                                    rollout_lp=mb["rollout_lp"], denominator=denominator, row_ids=mb["row_ids"])
        # the rollout engine against the trainer's pi_old (or, when pi_old IS the rollout's, the update's forward)
        trainer = lp if self.old_from == "rollout" else old
        return loss, {**metrics, **mismatch_metrics(mb["rollout_lp"], trainer, mask)}


def resolved_old_logprobs(cfg: RunConfig) -> str:
    """algo.old_logprobs with auto decided: the update's forward when it is the only update of the batch."""
    choice = cfg.algo.old_logprobs
    if choice == "auto":
        return "train_forward" if cfg.algo.updates_per_batch == 1 else "recompute"
    return choice


class GOPD(Objective):
    """A_t = lam * (log pi_T - log pi_ref) - (log pi_old - log pi_ref), each row scored by its domain's teacher."""

    name = "gopd"
    routes_by_domain = True

    def __init__(self, cfg: RunConfig, parts: RunParts):
        super().__init__(cfg, parts)
        self.teachers = [t.name for t in cfg.teachers]
        self.uses_reference = "reference" in self.frozen_models(cfg)

    @classmethod
    def frozen_models(cls, cfg: RunConfig) -> dict[str, FrozenModelConfig]:
        models = {t.name: t for t in cfg.teachers}
        # the reference cancels at lam = 1 when it is the student's init: it is then never placed or run
        if not (cfg.algo.lam == 1.0 and cfg.reference.path is None):
            models["reference"] = cfg.reference
        return models

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if not cfg.teachers:
            raise ConfigError("teachers: G-OPD needs at least one teacher")
        if cfg.algo.kl_coef:
            raise ConfigError("algo.kl_coef: G-OPD's reference term is lam; kl_coef is GRPO's")

    def scorers(self, item: PromptItem) -> list[str]:
        return [self.cfg.teacher_for(item.domain)] + (["reference"] if self.uses_reference else [])

    def inputs(self, item: PromptItem, scores: Scores) -> dict[str, torch.Tensor]:
        out = {"teacher_lp": scores[self.cfg.teacher_for(item.domain)]}
        if self.uses_reference:
            out["ref_lp"] = scores["reference"]
        return out

    def prepare(self, items, samples):
        teacher = [self.teachers.index(self.cfg.teacher_for(i.domain)) for i in items]
        return {"teacher_index": torch.tensor(teacher)}, {}

    def loss(self, mb, lp, entropy, logits, denominator):
        mask, old, ref = mb["loss_mask"], self.old_logprobs(mb, lp), mb.get("ref_lp")
        advantages = gopd_advantages(torch.nan_to_num(mb["teacher_lp"]), old,
                                     None if ref is None else torch.nan_to_num(ref), self.cfg.algo.lam)
        loss, metrics = self._policy_gradient(mb, lp, advantages, denominator)
        metrics |= self._metrics(mb, mask, torch.where(mask.bool(), advantages, 0.0), old, ref)
        if entropy is not None:
            metrics["actor/entropy"] = Stat.masked_mean(entropy, mask)
        return loss, metrics

    def _metrics(self, mb, mask, advantages, old, ref) -> Metrics:
        """gopd/kl_teacher is the sampled reverse KL(pi_old || pi_T), the quantity OPD minimises; gopd/reward the
        lambda-free reward log pi_T - log pi_ref and gopd/kl_ref KL(pi_old || pi_ref), which need the reference."""
        teacher = mb["teacher_lp"].float()
        metrics = {"gopd/advantage": Stat.masked_mean(advantages, mask),
                   "gopd/kl_teacher": Stat.masked_mean(old.float() - teacher, mask)}
        if ref is not None:
            metrics["gopd/reward"] = Stat.masked_mean(teacher - ref.float(), mask)
            metrics["gopd/kl_ref"] = Stat.masked_mean(old.float() - ref.float(), mask)
        teacher_of_token = spread(mb, mb["teacher_index"])
        for t, name in enumerate(self.teachers):  # every name on every rank: the reduction needs the same keys
            rows = (teacher_of_token == t) & mask.bool()
            metrics[f"teacher/{name}/samples"] = Stat.total_of((mb["teacher_index"] == t).sum())
            metrics[f"teacher/{name}/kl"] = Stat.masked_mean(old.float() - teacher, rows)
            if ref is not None:
                metrics[f"teacher/{name}/reward"] = Stat.masked_mean(teacher - ref.float(), rows)
        return metrics


class FullVocabGOPD(GOPD):
    """The exact KL(pi || softmax(lam z_T + (1 - lam) z_ref)) over the whole vocabulary, from the colocated
    teachers' logits on the student's own TP shards, computed inside the loss: no scoring pass before it. Each
    micro-batch holds one teacher's rows, so one forward of that teacher serves it."""

    def __init__(self, cfg: RunConfig, parts: RunParts):
        super().__init__(cfg, parts)
        self.models, self.vocab_size, self.tp_group = parts.colocated, parts.vocab_size, parts.tp_group

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        if cfg.student.parallel.pp != 1:
            raise ConfigError("algo.loss: full_vocab needs student.parallel.pp == 1")
        for i, t in enumerate(cfg.teachers):
            if t.placement != "colocated":
                raise ConfigError(f"teachers[{i}].placement: algo.loss=full_vocab needs colocated models")
        if "reference" in cls.frozen_models(cfg) and cfg.reference.placement != "colocated":
            raise ConfigError("reference.placement: algo.loss=full_vocab needs colocated models")

    def scorers(self, item):
        return []

    def inputs(self, item, scores):
        return {}

    def group(self, item):
        return self.cfg.teacher_for(item.domain)

    def loss(self, mb, lp, entropy, logits, denominator):
        mask = mb["loss_mask"]
        teacher = self.models[self.teachers[int(mb["teacher_index"][0])]]
        reference = self.models.get("reference")
        for model in (teacher, reference):  # on GPU they wait in host memory between uses
            if model is not None:
                model.onload()
        teacher_logits = teacher.logits(mb)
        ref_logits = reference.logits(mb) if reference is not None else None
        # position t's logits predict token t + 1: shifted like the log-probs, entry 0 is 0
        kl = full_vocab_gopd_kl(logits[:, :-1], teacher_logits[:, :-1],
                                None if ref_logits is None else ref_logits[:, :-1], self.cfg.algo.lam, self.tp_group,
                                vocab_size=self.vocab_size, temperature=self.cfg.rollout.temperature)
        kl = torch.nn.functional.pad(kl, (1, 0))
        loss = aggregate_loss(kl, mask, self.cfg.algo.aggregation, denominator, mb["row_ids"])
        metrics = {"actor/full_vocab_kl": Stat.masked_mean(kl, mask)}
        if entropy is not None:
            metrics["actor/entropy"] = Stat.masked_mean(entropy, mask)
        return loss, metrics


class GRPO(Objective):
    """Binary verifier rewards, normalised within each prompt's group of samples, on every response token; with
    algo.kl_coef > 0, beta * KL(pi || pi_ref) (k3) to the reference."""

    name = "grpo"

    def __init__(self, cfg: RunConfig, parts: RunParts):
        super().__init__(cfg, parts)
        self.verify = parts.verify

    @classmethod
    def frozen_models(cls, cfg):
        return {"reference": cfg.reference} if cfg.algo.kl_coef > 0 else {}

    def scorers(self, item):
        return list(self.frozen_models(self.cfg))

    def inputs(self, item, scores):
        return {"ref_lp": scores["reference"]} if scores else {}

    def prepare(self, items, samples):
        rewards = torch.tensor(self.verify(items, [s.response_ids for s in samples]), dtype=torch.float64)
        groups = rewards.view(-1, self.cfg.rollout.samples_per_prompt)
        centred = groups - groups.mean(-1, keepdim=True)
        advantages = (centred / (groups.std(-1, keepdim=True, unbiased=False) + 1e-6)).view(-1).float()
        metrics = {"grpo/reward": Stat.mean_of(rewards.sum(), len(rewards))}
        for domain in sorted({i.domain for i in items}):
            mine = torch.tensor([i.domain == domain for i in items])
            metrics[f"grpo/{domain}/reward"] = Stat.mean_of(rewards[mine].sum(), mine.sum())
        return {"advantage": advantages}, metrics

    def loss(self, mb, lp, entropy, logits, denominator):
        mask = mb["loss_mask"]
        loss, metrics = self._policy_gradient(mb, lp, spread(mb, mb["advantage"]), denominator)
        if self.cfg.algo.kl_coef > 0:
            log_ratio = torch.where(mask.bool(), mb["ref_lp"] - lp, 0.0)
            k3 = log_ratio.exp() - log_ratio - 1
            loss = loss + self.cfg.algo.kl_coef * aggregate_loss(k3, mask, self.cfg.algo.aggregation, denominator,
                                                                 mb["row_ids"])
            metrics["grpo/kl_ref"] = Stat.masked_mean(k3, mask)
        if entropy is not None:
            metrics["actor/entropy"] = Stat.masked_mean(entropy, mask)
        return loss, metrics


class SFT(Objective):
    """Negative log-likelihood of the dataset's responses (off-policy distillation on teacher samples)."""

    name = "sft"
    on_policy = False

    def __init__(self, cfg: RunConfig, parts: RunParts):
        super().__init__(cfg, parts)
        self.tokenizer = parts.tokenizer

    def samples(self, items: list[PromptItem]) -> list[Sample]:
        """The rows' responses: each item's response column, tokenised and ended with EOS."""
        key, out = self.cfg.data.response_key, []
        for item in items:
            text = item.extra.get(key)
            if not isinstance(text, str) or not text:
                raise ValueError(f"{item.uid}: SFT needs a non-empty {key!r} column")
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            out.append(Sample(item.prompt_ids, ids, [0.0] * len(ids), "stop"))
        return out

    def loss(self, mb, lp, entropy, logits, denominator):
        mask = mb["loss_mask"]
        metrics = {"sft/nll": Stat.masked_mean(-lp, mask)}
        if entropy is not None:
            metrics["actor/entropy"] = Stat.masked_mean(entropy, mask)
        return aggregate_loss(-lp, mask, self.cfg.algo.aggregation, denominator, mb["row_ids"]), metrics


def objective_class(cfg: RunConfig) -> type[Objective]:
    """The one place that reads which objective the config asks for."""
    if cfg.algo.name == "gopd":
        return FullVocabGOPD if cfg.algo.loss == "full_vocab" else GOPD
    if cfg.algo.loss == "full_vocab":
        raise ConfigError("algo.loss: full_vocab is a G-OPD loss")
    return {"grpo": GRPO, "sft": SFT}[cfg.algo.name]
