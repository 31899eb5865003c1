"""Everything a run holds, built from its config: the role layout, the student with its optimizer, the frozen
models, the rollout engine, the data, the logger, and the state of a resumed run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from megatron_gopd import checkpoint
from megatron_gopd.algo.gopd import merge_metrics, reduce_metrics
from megatron_gopd.algo.logprobs import full_vocab_gopd_kl
from megatron_gopd.config import RunConfig, save_resolved
from megatron_gopd.data.prompts import PromptItem, PromptSampler, load_prompts
from megatron_gopd.eval.harness import reference_of, verifier_kind
from megatron_gopd.eval.verifiers import verify_batch
from megatron_gopd.logger import RunLogger
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import DTYPES, build_model
from megatron_gopd.models.parallel_model import TrainableModel
from megatron_gopd.rollout.base import Sample, SamplingParams
from megatron_gopd.rollout.colocated import ColocatedRollout
from megatron_gopd.runtime.distributed import device
from megatron_gopd.runtime.layout import ParallelShape, RoleLayout, build_layout
from megatron_gopd.teachers.frozen import FrozenModel, check_same_tokenizer
from megatron_gopd.teachers.service import FrozenScorer, serve_frozen_model
from megatron_gopd.teachers.sglang_http import SGLangHTTPModel


def frozen_model_specs(cfg: RunConfig) -> dict[str, tuple[str, object]]:
    """name -> (checkpoint path, its config section), for every frozen model the run uses."""
    specs = {t.name: (t.path, t) for t in cfg.teachers}
    if cfg.uses_reference():
        specs["reference"] = (cfg.reference.path or cfg.student.path, cfg.reference)
    return specs


def make_layout(cfg: RunConfig) -> RoleLayout:
    """The student takes the ranks the dedicated frozen models leave; colocated models share its groups."""
    specs = frozen_model_specs(cfg)
    dedicated = {name: ParallelShape(c.parallel.tp, c.parallel.pp, c.dp, c.parallel.ep, c.parallel.etp)
                 for name, (_, c) in specs.items() if c.placement == "dedicated"}
    sp = cfg.student.parallel
    dp = (dist.get_world_size() - sum(s.size for s in dedicated.values())) // (sp.tp * sp.pp)
    student = ParallelShape(sp.tp, sp.pp, dp, sp.ep, sp.etp)
    on_ranks = [name for name, (_, c) in specs.items() if c.placement != "sglang"]  # servers hold no ranks
    return build_layout(student, {name: (dedicated.get(name, student), name in dedicated) for name in on_ranks},
                        timeout_s=cfg.faults.exchange_timeout_s)


@dataclass
class Run:
    config: RunConfig
    layout: RoleLayout
    student: TrainableModel
    rollout: ColocatedRollout
    scorer: FrozenScorer
    colocated: dict[str, FrozenModel]
    dataset: object
    sampler: PromptSampler
    eval_items: list[PromptItem]
    tokenizer: object
    logger: RunLogger
    start_step: int = 0
    trainer_state: dict = field(default_factory=dict)

    @property
    def dp_rank(self) -> int:
        return self.student.pgc.dp.rank()

    @property
    def dp_size(self) -> int:
        return self.student.pgc.dp.size()

    @property
    def student_world(self):
        return self.layout.student.world

    @property
    def teacher_names(self) -> list[str]:
        return [t.name for t in self.config.teachers]

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.config.train.output_dir) / "checkpoints"

    @property
    def student_hf_dir(self) -> Path:
        return Path(self.config.student.path) / "hf"

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    @property
    def sampling(self) -> SamplingParams:
        r = self.config.rollout
        stops = tuple(sorted({self.tokenizer.eos_token_id} - {None}))
        return SamplingParams(r.temperature, r.top_p, r.top_k, r.max_new_tokens, stops)

    def dataset_sample(self, item: PromptItem) -> Sample:
        """An SFT example: the row's response column, tokenised and ended with EOS."""
        text = item.extra.get(self.config.data.response_key)
        if not isinstance(text, str) or not text:
            raise ValueError(f"{item.uid}: SFT needs a non-empty {self.config.data.response_key!r} column")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        return Sample(item.prompt_ids, ids, [0.0] * len(ids), "stop")

    def verify(self, items: list[PromptItem], responses: list[list[int]]) -> list[float]:
        """Binary rewards, computed on the replica's leader (code runs sandboxed) and shared with its group."""
        rewards = [None]
        if self.rollout.is_leader:
            kinds = [verifier_kind(i) for i in items]
            results = verify_batch(kinds, [self.decode(ids) for ids in responses], [reference_of(i) for i in items])
            rewards = [[float(x.correct) for x in results]]
        mp = self.student.pgc.mp
        if mp.size() > 1:
            dist.broadcast_object_list(rewards, src=dist.get_global_rank(mp, 0), group=mp)
        return rewards[0]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def teacher_of(self, item: PromptItem) -> str | None:
        if self.config.algo.name != "gopd":
            return None
        return self.config.teacher_for(item.domain)

    def frozen_owners(self, item: PromptItem) -> list[str]:
        """The frozen models that must score this sample."""
        owners = [self.teacher_of(item)] if self.config.algo.name == "gopd" else []
        return [o for o in owners if o] + (["reference"] if self.config.uses_reference() else [])

    def full_vocab_kl(self, mb, student_logits: torch.Tensor) -> torch.Tensor:
        """Exact per-token KL to the G-OPD target, from colocated teachers' logits on the same vocab shards.

        Called inside the student's loss function: `mb` and the logits are on the model's device."""
        cfg, tokens = self.config, mb["tokens"]
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)
        for model in self.colocated.values():  # the scorer parks them in host memory after scoring (GPU)
            model.onload()
        with torch.no_grad():
            teacher_logits = torch.empty_like(student_logits)
            for t, name in enumerate(self.teacher_names):
                rows = mb["teacher_index"] == t
                if rows.any():
                    teacher_logits[rows] = self.colocated[name].gpt(tokens[rows], positions[rows], None)
            ref_logits = self.colocated["reference"].gpt(tokens, positions, None) if "reference" in self.colocated else None
        kl = full_vocab_gopd_kl(
            student_logits[:, :-1], teacher_logits[:, :-1], None if ref_logits is None else ref_logits[:, :-1],
            cfg.algo.lam, self.student.pgc.tp, vocab_size=self.student.dims.vocab_size,
            temperature=cfg.rollout.temperature,
        )
        return torch.nn.functional.pad(kl, (1, 0))  # aligned with the tokens, like the log-probs

    def last_stage_metrics(self, outputs: list[dict]) -> dict[str, float]:
        """Reduces the loss function's metrics over DP on the last pipeline stage and shares them with stage 0."""
        pgc = self.student.pgc
        result = [reduce_metrics(merge_metrics(*outputs), pgc.dp) if outputs else None]
        if pgc.pp.size() > 1:
            dist.broadcast_object_list(result, src=dist.get_global_rank(pgc.pp, pgc.pp.size() - 1), group=pgc.pp)
        return result[0]

    def shutdown(self) -> None:
        self.scorer.shutdown()
        self.rollout.sleep()
        self.logger.close()


def build_run(cfg: RunConfig) -> Run | None:
    """Builds the run on this rank. Dedicated frozen-model ranks serve until the student is done, then get None."""
    layout = make_layout(cfg)
    role = layout.role_of(dist.get_rank())
    specs = frozen_model_specs(cfg)
    if role != "student":  # a dedicated teacher or reference: serve, then leave
        path, section = specs[role]
        model = FrozenModel(role, path, layout.frozen[role], dtype=section.dtype)
        signal_ignore_sigterm()
        serve_frozen_model(model, layout, layout.frozen[role], temperature=cfg.rollout.temperature)
        return None

    if dist.get_rank() != 0:
        datasets.disable_progress_bars()
    check_same_tokenizer({"student": cfg.student.path, **{name: path for name, (path, _) in specs.items()}})
    tokenizer = AutoTokenizer.from_pretrained(Path(cfg.student.path) / "hf")
    domains = [d for t in cfg.teachers for d in t.domains] if cfg.algo.name == "gopd" else None
    dataset = load_prompts(cfg.data.train, tokenizer, max_prompt_len=cfg.data.max_prompt_len, known_domains=domains,
                           default_domain_ok=cfg.data.default_teacher is not None, on_bad_row=cfg.data.on_bad_row)
    eval_items = []
    if cfg.data.eval:
        eval_set = load_prompts(cfg.data.eval, tokenizer, max_prompt_len=cfg.data.max_prompt_len,
                                on_bad_row=cfg.data.on_bad_row, split="test")
        eval_items = eval_set.take(range(min(len(eval_set), cfg.eval.max_prompts)))

    pgc = layout.student.pgc
    dims = ModelDims.from_hf(Path(cfg.student.path) / "hf")
    gpt = build_model(dims, pgc, dtype=DTYPES[cfg.student.dtype], seed=cfg.train.seed, fp8=cfg.student.fp8,
                      fp8_recipe=cfg.student.fp8_recipe, moe_aux_loss_coef=cfg.student.moe_aux_loss_coef)
    checkpoint.load_model(cfg.student.path, gpt, group=layout.student.world)
    student = TrainableModel(gpt, dims, cfg.optim, layout.student.world, total_steps=cfg.train.steps)
    colocated = {name: FrozenModel(name, path, layout.frozen[name], dtype=section.dtype)
                 for name, (path, section) in specs.items() if section.placement == "colocated"}
    owners = {name: colocated.get(name) for name in specs}
    owners.update({name: SGLangHTTPModel(name, section.url, timeout_s=cfg.faults.exchange_timeout_s)
                   for name, (_, section) in specs.items() if section.placement == "sglang"})
    scorer = FrozenScorer(layout, owners, temperature=cfg.rollout.temperature, timeout_s=cfg.faults.exchange_timeout_s)
    rollout = ColocatedRollout(_make_engine(cfg, pgc.mp.rank() == 0), gpt, dims,
                               bucket_bytes=cfg.rollout.sync_bucket_mb << 20)
    sampler = PromptSampler(len(dataset), cfg.data.prompts_per_step, seed=cfg.train.seed, dp_rank=pgc.dp.rank(),
                            dp_size=pgc.dp.size())

    start_step, state = 0, {}
    root = Path(cfg.train.output_dir) / "checkpoints"
    if cfg.train.resume != "never":
        loaded = checkpoint.load_training_checkpoint(root, student, cfg.train.resume, group=layout.student.world)
        if loaded is not None:
            state = loaded[0]
            start_step = state["step"]
            sampler.load_state_dict(state["sampler"])
    is_rank0 = dist.get_rank() == 0
    if is_rank0:
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, Path(cfg.train.output_dir) / "config.yaml")
    logger = RunLogger(cfg.train.output_dir, enabled=is_rank0, total_steps=cfg.train.steps, start_step=start_step,
                       tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb, wandb_project=cfg.log.wandb_project,
                       progress=cfg.log.progress)
    if is_rank0:
        logger.write(f"data: {dataset.report.summary()}")
        if start_step:
            logger.write(f"resumed from step {start_step}")
    return Run(cfg, layout, student, rollout, scorer, colocated, dataset, sampler, eval_items, tokenizer, logger,
               start_step, state)


def _make_engine(cfg: RunConfig, is_leader: bool):
    if not is_leader:
        return None
    hf_dir = str(Path(cfg.student.path) / "hf")
    if cfg.rollout.engine == "sglang":
        from megatron_gopd.rollout.sglang_engine import SGLangRolloutEngine

        return SGLangRolloutEngine(hf_dir, dtype="bfloat16" if cfg.student.dtype == "bf16" else "float32",
                                   mem_fraction_static=cfg.rollout.sglang_mem_fraction, seed=cfg.train.seed,
                                   bucket_bytes=cfg.rollout.sync_bucket_mb << 20)
    from megatron_gopd.rollout.hf_engine import HFRolloutEngine

    return HFRolloutEngine(hf_dir, dtype=DTYPES[cfg.student.dtype], device=device())


def signal_ignore_sigterm() -> None:
    """A dedicated frozen rank keeps serving on SIGTERM until the student, which checkpoints first, ends the run."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
