"""The training loop: G-OPD, GRPO or SFT (algo/objectives.py) on a Megatron-core student. `Trainer.train` is the
whole loop; the methods below it and the modules they call say how each phase is done."""

from __future__ import annotations

import dataclasses
import signal
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_gopd.algo.losses import loss_denominator
from megatron_gopd.algo.objectives import resolved_old_logprobs
from megatron_gopd.batching import MicroBatch, Plan, assemble, lay_out, plan
from megatron_gopd.data.prompts import PromptItem
from megatron_gopd.eval.harness import generate_and_verify, summarize
from megatron_gopd.metrics import Stat, merge_metrics, reduce_metrics, response_metrics
from megatron_gopd.rollout.base import Sample
from megatron_gopd.session import Session, batching


@dataclass
class TrainerState:
    """The trainer's part of a checkpoint (the torch Stateful convention)."""

    step: int = 0  # optimizer steps taken (skipped ones included)
    consecutive_skips: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.consecutive_skips = state["step"], state["consecutive_skips"]


@dataclass
class StepBatch:
    """One DP replica's rows of a step, and the micro-batches the student's passes run over."""

    items: list[PromptItem]  # one per row
    samples: list[Sample]
    plan: Plan  # which rows each micro-batch holds
    micro_batches: list[MicroBatch]
    dropped: float = 0.0  # the fraction of the step's rows (over all replicas) the NaN guard dropped


class Trainer:
    def __init__(self, session: Session):
        self.s, self.cfg, self.objective = session, session.config, session.objective
        self.state = TrainerState()
        self.checkpointer = session.checkpointer({"trainer": self.state})
        if self.checkpointer.restore(self.cfg.train.resume):
            session.logger.write(f"resumed from step {self.state.step}")
        self.first_step = self.state.step
        self.requested = self.state.step - 1  # the last step asked of the rollout
        self.old_logprobs = resolved_old_logprobs(self.cfg) if self.objective.on_policy else None
        self.stop_requested = False
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def train(self) -> None:
        s, cfg = self.s, self.cfg
        s.logger.start(self.state.step)
        s.rollout.sync_weights(self.state.step)
        if cfg.eval.interval and cfg.eval.at_start and self.state.step == 0:
            s.logger.log(0, self.evaluate(), advance=False)
        while self.state.step < cfg.train.steps:
            with s.logger.phase("rollout"):  # each finished chunk of rows streams to its scorers at once
                batch = self.rollout(self.state.step)
            s.rollout.sleep()  # the engine's memory (SGLang) goes to training; the weight sync wakes it
            if self.old_logprobs == "recompute":
                with s.logger.phase("old_logprobs"):  # meanwhile dedicated teachers score
                    self.add_old_logprobs(batch)
            with s.logger.phase("teachers"):
                self.add_scores(batch)
            metrics = self.prepare(batch)  # the objective's per-row values, the NaN guard
            with s.logger.phase("update"):
                metrics |= self.update(batch) | s.student.expert_metrics()
            self.state.step += 1
            with s.logger.phase("weight_sync"):  # a dedicated engine may still be generating a step ahead
                s.rollout.sync_weights(self.state.step)
            if cfg.eval.interval and self.state.step % cfg.eval.interval == 0:
                with s.logger.phase("eval"):
                    metrics |= self.evaluate()
            if self.state.step == self.first_step + 1:
                metrics |= s.dataset.report.as_metrics()  # what the data loader kept and dropped, and why
            s.logger.log(self.state.step, metrics, tokens=self.tokens_per_phase(batch, metrics))
            last = self.state.step == cfg.train.steps or self._stop_agreed()
            if last or self._saves_after(self.state.step - 1):
                with s.logger.phase("checkpoint"):
                    self.checkpointer.save(self.state.step)
            if last:
                break
        s.shutdown()

    # ---- 1. rollout: samples, streamed to their scorers, laid out in micro-batches ---------------------------
    def rollout(self, step: int) -> StepBatch:
        s, cfg, objective = self.s, self.cfg, self.objective
        items = self.prompts(step)
        samples: list[Sample | None] = [None] * len(items)
        ready: dict[int, tuple[list[int], list[str]]] = {}
        for row, sample in self._samples(step, items):
            samples[row] = sample
            ready[row] = (sample.prompt_ids + sample.response_ids, objective.scorers(items[row]))
            if len(ready) >= cfg.rollout.chunk_size:
                s.scoring.submit(ready)
                ready = {}
        if ready:
            s.scoring.submit(ready)
        rows = [sample.prompt_ids + sample.response_ids for sample in samples]
        step_plan = plan([len(r) for r in rows], batching(cfg), [objective.group(i) for i in items])
        micro_batches = [assemble([rows[i] for i in mb], batching(cfg), s.pad_id, per_token={
            "response_mask": [_response_values(samples[i], [1.0] * len(samples[i].response_ids)) for i in mb],
            "rollout_lp": [_response_values(samples[i], samples[i].logprobs) for i in mb],
        }) for mb in step_plan.micro_batches]
        return StepBatch(items, samples, step_plan, micro_batches)

    def prompts(self, step: int) -> list[PromptItem]:
        """This replica's rows of `step`: its prompts, each `samples_per_prompt` times."""
        n = self.cfg.rollout.samples_per_prompt
        return [item for item in self.s.dataset.take(self.s.sampler.indices(step)) for _ in range(n)]

    def _samples(self, step: int, items: list[PromptItem]):
        """(row, sample) as they finish: from the engine, or the dataset's responses (SFT)."""
        if not self.objective.on_policy:
            return enumerate(self.objective.samples(items))
        for ahead in self._to_request(step):
            self.s.rollout.request(ahead, [item.prompt_ids for item in self.prompts(ahead)], self._sampling(ahead))
            self.requested = ahead
        return self.s.rollout.results(step)

    def _to_request(self, step: int) -> range:
        """The steps to ask the rollout for now: up to `rollout.max_staleness` ahead of this one, but never past
        the run's end or a step after which a checkpoint is written, so that nothing is in flight when it is
        (a resumed run then continues exactly)."""
        last = step
        while last - step < self.cfg.rollout.max_staleness and last + 1 < self.cfg.train.steps \
                and not self._saves_after(last):
            last += 1
        return range(max(self.requested + 1, step), last + 1)

    def _saves_after(self, step: int) -> bool:
        return (step + 1) % self.cfg.checkpoint.interval == 0 or step + 1 == self.cfg.train.steps

    def _sampling(self, step: int):
        # a seed per (run, step, replica): a resumed run draws the very same samples
        seed = zlib.crc32(f"{self.cfg.train.seed}/{step}/{self.s.dp.rank()}".encode())
        return dataclasses.replace(self.s.sampling, seed=seed)

    # ---- 2-3. log-probs of the old policy, the teachers and the reference -----------------------------------
    def add_old_logprobs(self, batch: StepBatch) -> None:
        old = self.s.student.token_logprobs(batch.micro_batches, temperature=self.cfg.rollout.temperature)
        for mb, lp in zip(batch.micro_batches, old):
            mb["old_lp"] = lp

    def add_scores(self, batch: StepBatch) -> None:
        """Each row's inputs of the loss from its scores (a teacher's, the reference's), laid out like its tokens."""
        scores = self.s.scoring.collect()
        inputs = [self.objective.inputs(item, {name: scores[name][row] for name in self.objective.scorers(item)})
                  for row, item in enumerate(batch.items)]
        for indices, mb in zip(batch.plan.micro_batches, batch.micro_batches):
            for key in inputs[indices[0]]:
                mb[key] = lay_out(mb, [inputs[i][key] for i in indices])

    # ---- 4. before the update: the objective's per-row values, and the NaN guard ----------------------------
    def prepare(self, batch: StepBatch) -> dict[str, float]:
        """A row with NaN/inf in any of its response tokens' log-probs is dropped from the step, and counted."""
        per_row, metrics = self.objective.prepare(batch.items, batch.samples)
        dropped = 0
        for indices, mb in zip(batch.plan.micro_batches, batch.micro_batches):
            for key, values in per_row.items():
                mb[key] = values[indices]
            mask = mb["response_mask"].bool()
            bad = torch.zeros_like(mask)
            for key, values in mb.items():
                if key != "response_mask" and values.is_floating_point() and values.shape == mask.shape:
                    bad |= mask & ~torch.isfinite(values)
            bad_rows = torch.zeros(len(indices) + 1, dtype=torch.bool)  # + a packed padding tail's
            bad_rows[mb["row_ids"][bad]] = True
            mb["loss_mask"] = torch.where(bad_rows[mb["row_ids"]], 0.0, mb["response_mask"])
            dropped += int(bad_rows.sum())
        batch.dropped = _sum_over(dropped, self.s.dp) / _sum_over(len(batch.items), self.s.dp)
        lengths = [len(sample.response_ids) for sample in batch.samples]
        staleness = sum(self.state.step - x.meta.get("version", self.state.step) for x in batch.samples)
        metrics = merge_metrics(metrics, response_metrics(lengths, [x.finish_reason for x in batch.samples]),
                                {"faults/dropped_samples": Stat.total_of(dropped),
                                 "rollout/staleness": Stat.mean_of(staleness, len(batch.samples)),
                                 "batching/over_budget_rows": Stat.total_of(batch.plan.over_budget),
                                 "batching/micro_batches": Stat.total_of(len(batch.micro_batches))})
        return reduce_metrics(metrics, self.s.dp)

    # ---- 5. update -------------------------------------------------------------------------------------------
    def update(self, batch: StepBatch) -> dict[str, float]:
        s, cfg = self.s, self.cfg
        if batch.dropped > cfg.faults.max_bad_sample_fraction:
            return self._skip(f"{batch.dropped:.0%} of the samples had NaN/inf log-probs")
        aggregation = cfg.algo.aggregation
        denominator = _sum_over(sum(loss_denominator(mb["loss_mask"], aggregation, mb["row_ids"])
                                    for mb in batch.micro_batches), s.dp)

        def loss_fn(mb, lp, entropy, logits):
            loss, metrics = self.objective.loss(mb, lp, entropy, logits, max(denominator, 1.0))
            metrics["loss"] = Stat.total_of(loss)  # each micro-batch's share: they sum to the global loss
            return loss, metrics

        metrics = {}
        for _ in range(cfg.algo.updates_per_batch):
            metrics, info = s.student.train_step(batch.micro_batches, loss_fn, temperature=cfg.rollout.temperature)
            if not info["update_ok"]:
                return self._skip("the gradients were not finite")
            metrics.update(grad_norm=info["grad_norm"], lr=info["lr"])
        if self.old_logprobs == "rollout" and metrics["mismatch/abs_mean"] > cfg.algo.max_rollout_mismatch:
            raise RuntimeError(f"algo.old_logprobs=rollout: the rollout engine's log-probs differ from the trainer's "
                               f"by {metrics['mismatch/abs_mean']:.2e} on average, more than algo.max_rollout_"
                               f"mismatch={cfg.algo.max_rollout_mismatch}; use algo.old_logprobs=recompute")
        self.state.consecutive_skips = 0
        return metrics

    def _skip(self, why: str) -> dict[str, float]:
        self.state.consecutive_skips += 1
        self.s.logger.write(f"skipping the update: {why} ({self.state.consecutive_skips} in a row)")
        if self.state.consecutive_skips > self.cfg.faults.max_consecutive_skips:
            raise RuntimeError(f"{self.state.consecutive_skips} consecutive steps were skipped (last: {why}); "
                               "stopping. See faults/* in metrics.jsonl")
        return {"faults/skipped_step": 1.0}

    def tokens_per_phase(self, batch: StepBatch, metrics: dict) -> dict[str, float]:
        """Tokens each phase handled, over all replicas: the logger turns them into throughput/<phase>_tokens_per_s."""
        updated = "faults/skipped_step" not in metrics
        tokens = sum(len(x.prompt_ids) + len(x.response_ids) for x in batch.samples)
        return {"rollout": _sum_over(sum(len(x.response_ids) for x in batch.samples), self.s.dp),
                "update": _sum_over(tokens * self.cfg.algo.updates_per_batch if updated else 0, self.s.dp)}

    # ---- eval, checkpoint signals ----------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Every replica's leader samples its share of the eval prompts with its engine; rank 0 logs the lot."""
        s, cfg = self.s, self.cfg
        items = s.eval_items[s.dp.rank()::s.dp.size()]
        params = dataclasses.replace(s.sampling, temperature=cfg.eval.temperature, seed=cfg.train.seed)
        records = generate_and_verify(s.rollout.leader_generate, items, s.decode, n=cfg.eval.n, params=params) \
            if s.rollout.is_leader else []
        gathered = [None] * s.dp.size()
        dist.all_gather_object(gathered, records, group=s.dp)
        return {f"eval/{k}": v for k, v in summarize([x for part in gathered for x in part]).items()}

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True
        self.s.logger.write("SIGTERM: finishing this step, writing a checkpoint, then exiting")

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([float(self.stop_requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.s.layout.student.world)
        return bool(flag.item())


def _response_values(sample: Sample, values: list[float]) -> torch.Tensor:
    """Per-token values of a row that are 0 on its prompt and `values` on its response."""
    return torch.tensor([0.0] * len(sample.prompt_ids) + list(values))


def _sum_over(value: float, group) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item()
