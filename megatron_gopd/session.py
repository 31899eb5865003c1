"""Everything a run holds, built from its config: the role layout, the student with its optimizer, the objective,
the frozen models' scoring, the rollout engine, the data and the logger (checked first by `preflight.check_run`)."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
from megatron.core.optimizer import OptimizerConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from megatron_gopd import checkpoint, memory_plan
from megatron_gopd.algo.objectives import Objective, RunParts, objective_class
from megatron_gopd.batching import Batching
from megatron_gopd.config import RunConfig, resolved, save_resolved
from megatron_gopd.data.prompts import PromptDataset, PromptItem, PromptSampler, load_prompts
from megatron_gopd.eval.harness import verify_items
from megatron_gopd.logger import RunLogger
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import DTYPES, build_model
from megatron_gopd.models.parallel_model import LRSchedule, TrainableModel, adam
from megatron_gopd.preflight import frozen_models
from megatron_gopd.rollout.base import SamplingParams
from megatron_gopd.rollout.build import build_rollout, make_engine
from megatron_gopd.rollout.colocated import ColocatedRollout
from megatron_gopd.rollout.dedicated import DedicatedRollout, serve_rollout
from megatron_gopd.runtime.distributed import computed_on
from megatron_gopd.runtime.layout import ParallelShape, RoleLayout, build_layout
from megatron_gopd.teachers.frozen import FrozenModel, check_same_tokenizer
from megatron_gopd.teachers.service import (
    ColocatedScorer,
    DedicatedScorer,
    Scoring,
    ServerScorer,
    serve_frozen_model,
)
from megatron_gopd.teachers.sglang_http import SGLangHTTPModel


def make_layout(cfg: RunConfig) -> RoleLayout:
    """The student takes the ranks the dedicated frozen models leave; colocated models share its groups."""
    models = frozen_models(cfg)
    dedicated = {name: ParallelShape(s.parallel.tp, s.parallel.pp, s.dp, s.parallel.ep, s.parallel.etp)
                 for name, s in models.items() if s.placement == "dedicated"}
    sp, engines = cfg.student.parallel, cfg.rollout.engines if cfg.rollout.placement == "dedicated" else 0
    dp = (dist.get_world_size() - sum(s.size for s in dedicated.values()) - engines) // (sp.tp * sp.pp)
    student = ParallelShape(sp.tp, sp.pp, dp, sp.ep, sp.etp)
    on_ranks = [name for name, s in models.items() if s.placement != "sglang"]  # servers hold no ranks
    return build_layout(student, {name: (dedicated.get(name, student), name in dedicated) for name in on_ranks},
                        timeout_s=cfg.faults.exchange_timeout_s, rollout_engines=engines)


def batching(cfg: RunConfig) -> Batching:
    t = cfg.train
    return Batching(t.micro_batch_size, t.max_tokens_per_micro_batch, t.pack_sequences)


@dataclass
class Session:
    config: RunConfig
    layout: RoleLayout
    student: TrainableModel
    objective: Objective
    scoring: Scoring
    rollout: ColocatedRollout | DedicatedRollout
    dataset: PromptDataset
    sampler: PromptSampler
    eval_items: list[PromptItem]
    tokenizer: PreTrainedTokenizerBase
    logger: RunLogger

    @property
    def dp(self) -> dist.ProcessGroup:
        return self.student.pgc.dp

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    @property
    def sampling(self) -> SamplingParams:
        r = self.config.rollout
        stops = tuple(sorted({self.tokenizer.eos_token_id} - {None}))
        return SamplingParams(r.temperature, r.top_p, r.top_k, r.max_new_tokens, stops)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def checkpointer(self, states: dict[str, checkpoint.Stateful]) -> checkpoint.TrainingCheckpointer:
        cfg = self.config
        return checkpoint.TrainingCheckpointer(
            Path(cfg.train.output_dir) / "checkpoints", self.student,
            {**states, "data": self.dataset},
            group=self.layout.student.world, keep_last=cfg.checkpoint.keep_last,
            hf_dir=Path(cfg.student.path) / "hf", fully_reshardable=cfg.checkpoint.fully_reshardable)

    def shutdown(self) -> None:
        self.scoring.shutdown()
        self.rollout.shutdown()
        self.logger.close()


def build_session(cfg: RunConfig) -> Session | None:
    """Builds the run on this rank. Dedicated frozen-model ranks serve until the student is done, then get None."""
    layout = make_layout(cfg)
    role = layout.role_of(dist.get_rank())
    models = frozen_models(cfg)
    student_batching = batching(cfg)
    if role == "rollout":  # a dedicated rollout engine: serve, then leave
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        serve_rollout(make_engine(cfg), layout, chunk_rows=cfg.rollout.chunk_size)
        return None
    if role != "student":  # a dedicated teacher or reference: serve, then leave
        section = models[role]
        model = FrozenModel(role, section.path or cfg.student.path, layout.frozen[role], dtype=section.dtype,
                            batching=student_batching)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the student, which checkpoints first, ends the run
        serve_frozen_model(model, layout, layout.frozen[role], temperature=cfg.rollout.temperature)
        return None

    if dist.get_rank() != 0:
        datasets.disable_progress_bars()
    elif torch.cuda.is_available():  # before any model takes memory
        for line in memory_plan.startup_lines(cfg, dist.get_world_size(), torch.cuda.mem_get_info()[1]):
            print(line, flush=True)
    check_same_tokenizer({"student": cfg.student.path, **{name: s.path or cfg.student.path
                                                           for name, s in models.items()}})
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.student.path) / "hf")
    d = cfg.data
    kind = objective_class(cfg)
    known = [domain for t in cfg.teachers for domain in t.domains] if kind.routes_by_domain else None
    dataset = load_prompts(d.train, tokenizer, max_prompt_len=d.max_prompt_len, known_domains=known,
                           default_domain_ok=d.default_teacher is not None, on_bad_row=d.on_bad_row,
                           chat_template_kwargs=d.chat_template_kwargs)
    eval_items = []
    if d.eval:
        eval_set = load_prompts(d.eval, tokenizer, max_prompt_len=d.max_prompt_len, on_bad_row=d.on_bad_row,
                                split="test", chat_template_kwargs=d.chat_template_kwargs)
        eval_items = eval_set.take(range(min(len(eval_set), cfg.eval.max_prompts)))

    pgc = layout.student.pgc
    dims = ModelDims.from_hf(Path(cfg.student.path) / "hf")
    gpt = build_model(dims, pgc, dtype=DTYPES[cfg.student.dtype], seed=cfg.train.seed, fp8=cfg.student.fp8,
                      fp8_recipe=cfg.student.fp8_recipe, attention=cfg.student.attention,
                      moe_aux_loss_coef=cfg.student.moe_aux_loss_coef, recompute=cfg.train.recompute)
    checkpoint.load_model(cfg.student.path, gpt, group=layout.student.world)
    student = TrainableModel(gpt, dims, optimizer_config(cfg), layout.student.world, schedule=lr_schedule(cfg))
    colocated = {name: FrozenModel(name, s.path or cfg.student.path, layout.frozen[name], dtype=s.dtype,
                                   batching=student_batching)
                 for name, s in models.items() if s.placement == "colocated"}
    timeout = cfg.faults.exchange_timeout_s
    scoring = Scoring({name: ColocatedScorer(colocated[name], temperature=cfg.rollout.temperature)
                       if s.placement == "colocated" else DedicatedScorer(name, layout, timeout_s=timeout)
                       if s.placement == "dedicated" else
                       ServerScorer(SGLangHTTPModel(name, s.url, timeout_s=timeout, retries=cfg.faults.http_retries),
                                    layout, timeout_s=timeout)
                       for name, s in models.items()})
    sampler = PromptSampler(len(dataset), d.prompts_per_step, seed=cfg.train.seed, dp_rank=pgc.dp.rank(),
                            dp_size=pgc.dp.size())
    is_rank0 = dist.get_rank() == 0
    if is_rank0:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, Path(cfg.train.output_dir) / "config.yaml")
    logger = RunLogger(cfg.train.output_dir, enabled=is_rank0, total_steps=cfg.train.steps,
                       tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                       progress=cfg.log.progress, config=resolved(cfg))
    logger.write(f"data: {dataset.report.summary()}")

    def verify(items: list[PromptItem], responses: list[list[int]]) -> list[float]:
        """Binary rewards from the replica's leader (code runs sandboxed once), shared with its group."""
        texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in responses]
        return computed_on(pgc.mp, lambda: [float(r.correct) for r in verify_items(items, texts)])

    objective = kind(cfg, RunParts(tokenizer, verify, colocated, dims.vocab_size, pgc.tp))
    return Session(cfg, layout, student, objective, scoring, build_rollout(cfg, student, gpt, dims, layout), dataset,
                   sampler, eval_items, tokenizer, logger)


def optimizer_config(cfg: RunConfig) -> OptimizerConfig:
    o = cfg.optim
    return adam(o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
                adam_eps=o.adam_eps, clip_grad=o.clip_grad, use_distributed_optimizer=o.distributed_optimizer)


def lr_schedule(cfg: RunConfig) -> LRSchedule:
    o = cfg.optim
    return LRSchedule(o.warmup_steps, o.decay_steps or cfg.train.steps, o.decay_style)
