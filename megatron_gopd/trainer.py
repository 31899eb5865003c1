"""The G-OPD training loop (and GRPO / SFT through the same machinery). `Trainer.run` is the whole loop; the
methods below it and the modules they call say how each phase is done."""

from __future__ import annotations

import dataclasses
import signal
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_gopd import checkpoint
from megatron_gopd.algo.gopd import (
    PolicyLossConfig,
    Stat,
    aggregate_loss,
    gopd_advantages,
    gopd_metrics,
    loss_denominator,
    merge_metrics,
    policy_loss,
    reduce_metrics,
)
from megatron_gopd.data.prompts import PromptItem
from megatron_gopd.eval.harness import generate_and_verify, summarize
from megatron_gopd.rollout.base import mismatch_metrics, samples_to_batch
from megatron_gopd.session import Run


@dataclass
class StepData:
    """One DP replica's rollout of a step: micro-batches of per-token tensors, and the items they came from."""

    micro_batches: list[dict[str, torch.Tensor]]
    items: list[PromptItem]  # one per row, in row order across micro-batches
    responses: list[list[int]]
    finish_reasons: list[str]  # "stop" or "length" (hit max_new_tokens), per row
    tokens: int  # prompt + response tokens of all rows, padding excluded


class Trainer:
    def __init__(self, run: Run):
        self.run_, self.cfg = run, run.config
        self.stop_requested = False
        self.consecutive_skips = run.trainer_state.get("consecutive_skips", 0)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def run(self) -> None:
        r, cfg = self.run_, self.cfg
        r.rollout.sync_weights()
        if cfg.eval.interval and cfg.eval.at_start and r.start_step == 0:
            r.logger.log(0, self.evaluate(), advance=False)
        for step in range(r.start_step, cfg.train.steps):
            with r.logger.phase("rollout"):  # each finished micro-batch streams to its teachers at once
                data = self.rollout(step)
            r.rollout.sleep()  # the engine's memory (SGLang) goes to training; the weight sync wakes it
            with r.logger.phase("old_logprobs"):  # meanwhile the teachers score it
                self.add_old_logprobs(data)
            with r.logger.phase("teachers"):
                self.add_frozen_logprobs(data)
            metrics = self.add_advantages(data)
            with r.logger.phase("update"):
                metrics.update(self.update(data))
            with r.logger.phase("weight_sync"):
                r.rollout.sync_weights()
            if cfg.eval.interval and (step + 1) % cfg.eval.interval == 0:
                with r.logger.phase("eval"):
                    metrics.update(self.evaluate())
            if step == r.start_step:
                metrics.update(r.dataset.report.as_metrics())  # what the data loader kept and dropped, and why
            r.logger.log(step + 1, metrics, tokens=self.tokens_per_phase(data, metrics))
            last = step + 1 == cfg.train.steps or self._stop_agreed()
            if last or (step + 1) % cfg.checkpoint.interval == 0:
                with r.logger.phase("checkpoint"):
                    self.save(step + 1)
            if last:
                break
        r.shutdown()

    # ---- 1. rollout ------------------------------------------------------------------------------------------
    def rollout(self, step: int) -> StepData:
        r, cfg = self.run_, self.cfg
        items = [item for item in r.dataset.take(r.sampler.next_indices()) for _ in range(cfg.rollout.samples_per_prompt)]
        mbs = cfg.train.micro_batch_size
        chunk_rows = max(mbs, cfg.rollout.chunk_size // mbs * mbs)  # rows per generate call, whole micro-batches
        micro_batches, responses, reasons, tokens = [], [], [], 0
        for start in range(0, len(items), chunk_rows):
            chunk = items[start:start + chunk_rows]
            if cfg.algo.name == "sft":  # off-policy: the dataset holds the (teacher's) responses
                samples = [r.dataset_sample(item) for item in chunk]
            else:  # a seed per (run, step, replica, chunk): a resumed run draws the very same samples
                seed = zlib.crc32(f"{cfg.train.seed}/{step}/{r.dp_rank}/{start}".encode())
                samples = r.rollout.generate([i.prompt_ids for i in chunk], dataclasses.replace(r.sampling, seed=seed))
            for first in range(0, len(samples), mbs):
                part, owners = samples[first:first + mbs], chunk[first:first + mbs]
                lengths = [len(s.prompt_ids) + len(s.response_ids) for s in part]
                batch = samples_to_batch(part, max(lengths), r.pad_id)
                r.scorer.submit(batch["tokens"], [r.frozen_owners(item) for item in owners], lengths)
                micro_batches.append(batch)
                tokens += sum(lengths)
            responses += [s.response_ids for s in samples]
            reasons += [s.finish_reason for s in samples]
        seq = max(mb["tokens"].shape[1] for mb in micro_batches)  # one shape for megatron's schedule
        micro_batches = [{k: torch.nn.functional.pad(v, (0, seq - v.shape[1])) for k, v in mb.items()}
                         for mb in micro_batches]
        return StepData(micro_batches, items, responses, reasons, tokens)

    # ---- 2-3. log-probs of the old policy, the teachers and the reference -----------------------------------
    def add_old_logprobs(self, data: StepData) -> None:
        if self.cfg.algo.name == "sft":
            return
        old = self.run_.student.token_logprobs(data.micro_batches, temperature=self.cfg.rollout.temperature)
        for mb, lp in zip(data.micro_batches, old):
            mb["old_lp"] = lp

    def add_frozen_logprobs(self, data: StepData) -> None:
        r = self.run_
        scores = r.scorer.collect()
        row = 0
        for j, mb in enumerate(data.micro_batches):
            rows = mb["tokens"].shape[0]
            seq = mb["tokens"].shape[1]
            teachers = [r.teacher_of(item) for item in data.items[row:row + rows]]
            if teachers[0] is not None:
                mb["teacher_lp"] = torch.stack([_pad(scores[t][j][i], seq) for i, t in enumerate(teachers)])
                mb["teacher_index"] = torch.tensor([r.teacher_names.index(t) for t in teachers])
            if "reference" in scores:
                mb["ref_lp"] = _pad(scores["reference"][j], seq)
            row += rows

    # ---- 4. advantages, with the numerical guards ------------------------------------------------------------
    def add_advantages(self, data: StepData) -> dict[str, float]:
        r, cfg = self.run_, self.cfg
        parts, dropped, rows = [], 0, 0
        for mb in data.micro_batches:
            mask = mb["response_mask"].clone()
            finite = torch.ones(mask.shape[0], dtype=torch.bool)
            for key in ("rollout_lp", "old_lp", "teacher_lp", "ref_lp"):
                if key in mb:
                    finite &= torch.where(mask.bool(), torch.isfinite(mb[key]), True).all(-1)
            mask[~finite] = 0.0  # a sample with NaN/inf anywhere is dropped from the step, and counted
            dropped += int((~finite).sum())
            rows += mask.shape[0]
            mb["loss_mask"] = mask
            if cfg.algo.name == "gopd":
                ref = mb.get("ref_lp")
                mb["advantages"] = torch.where(mask.bool(), gopd_advantages(
                    torch.nan_to_num(mb["teacher_lp"]), mb["old_lp"], None if ref is None else torch.nan_to_num(ref),
                    cfg.algo.lam), 0.0)
                parts.append(gopd_metrics(mask, mb["advantages"], mb["teacher_lp"], mb["old_lp"], ref))
                parts.append(self._per_teacher_metrics(mb))
            if "old_lp" in mb:
                parts.append(mismatch_metrics(mb["rollout_lp"], mb["old_lp"], mask))
        if cfg.algo.name == "grpo":
            parts.append(self._grpo_advantages(data))
        self.step_dropped = _sum_over(dropped, r.student.pgc.dp) / _sum_over(rows, r.student.pgc.dp)
        parts.append({"faults/dropped_samples": Stat.total_of(dropped), **_response_metrics(data)})
        return reduce_metrics(merge_metrics(*parts), r.student.pgc.dp)

    def _grpo_advantages(self, data: StepData) -> dict[str, Stat]:
        """Binary verifier rewards, normalised within each prompt's group of samples, on every response token."""
        r, n = self.run_, self.cfg.rollout.samples_per_prompt
        rewards = torch.tensor(r.verify(data.items, data.responses), dtype=torch.float64)
        groups = rewards.view(-1, n)
        advantages = ((groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True, unbiased=False) + 1e-6)).view(-1)
        row, out = 0, {"grpo/reward": Stat(rewards.sum(), torch.tensor(float(len(rewards))))}
        for mb in data.micro_batches:
            rows = mb["tokens"].shape[0]
            mb["advantages"] = mb["loss_mask"] * advantages[row:row + rows, None].float()
            row += rows
        for domain in sorted({i.domain for i in data.items}):
            mine = torch.tensor([i.domain == domain for i in data.items])
            out[f"grpo/{domain}/reward"] = Stat(rewards[mine].sum(), mine.sum().double())
        return out

    def _per_teacher_metrics(self, mb) -> dict[str, Stat]:
        out = {}
        for t, name in enumerate(self.run_.teacher_names):
            rows = (mb["teacher_index"] == t)[:, None] & mb["loss_mask"].bool()
            out[f"teacher/{name}/samples"] = Stat.total_of((mb["teacher_index"] == t).sum())
            out[f"teacher/{name}/kl"] = Stat.masked_mean(mb["old_lp"] - mb["teacher_lp"], rows)
            if "ref_lp" in mb:
                out[f"teacher/{name}/reward"] = Stat.masked_mean(mb["teacher_lp"] - mb["ref_lp"], rows)
        return out

    # ---- 5. update -------------------------------------------------------------------------------------------
    def update(self, data: StepData) -> dict[str, float]:
        r, cfg = self.run_, self.cfg
        if self.step_dropped > cfg.faults.max_bad_sample_fraction:
            return self._skip(f"{self.step_dropped:.0%} of the samples had NaN/inf log-probs")
        dp = r.student.pgc.dp
        denominator = _sum_over(sum(loss_denominator(mb["loss_mask"], cfg.algo.aggregation) for mb in data.micro_batches), dp)
        loss_cfg = PolicyLossConfig(cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.dual_clip, cfg.algo.tis_cap,
                                    cfg.algo.aggregation)

        def loss_fn(mb, lp, entropy, logits):
            if cfg.algo.name == "sft":
                loss, metrics = aggregate_loss(-lp, mb["loss_mask"], cfg.algo.aggregation, denominator), {
                    "sft/nll": Stat.masked_mean(-lp, mb["loss_mask"])}
            elif cfg.algo.loss == "full_vocab":
                kl = r.full_vocab_kl(mb, logits)
                loss, metrics = aggregate_loss(kl, mb["loss_mask"], cfg.algo.aggregation, denominator), {
                    "actor/full_vocab_kl": Stat.masked_mean(kl, mb["loss_mask"])}
            else:
                loss, metrics = policy_loss(lp, mb["old_lp"], mb["advantages"], mb["loss_mask"], loss_cfg,
                                            rollout_lp=mb["rollout_lp"], denominator=denominator)
                if cfg.algo.kl_coef > 0:  # GRPO's optional KL to the reference (k3 estimator)
                    log_ratio = torch.where(mb["loss_mask"].bool(), mb["ref_lp"] - lp, 0.0)
                    k3 = log_ratio.exp() - log_ratio - 1
                    loss = loss + cfg.algo.kl_coef * aggregate_loss(k3, mb["loss_mask"], cfg.algo.aggregation, denominator)
                    metrics["grpo/kl_ref"] = Stat.masked_mean(k3, mb["loss_mask"])
            if entropy is not None:
                metrics["actor/entropy"] = Stat.masked_mean(entropy, mb["loss_mask"])
            metrics["loss"] = Stat.total_of(loss)  # each micro-batch's share: they sum to the global loss
            return loss, metrics

        metrics = {}
        for _ in range(cfg.algo.updates_per_batch):
            outputs, info = r.student.train_step(data.micro_batches, loss_fn, temperature=cfg.rollout.temperature)
            if not info["update_ok"]:
                return self._skip("the gradients were not finite")
            metrics = r.last_stage_metrics(outputs)
            metrics.update(grad_norm=info["grad_norm"], lr=info["lr"])
        self.consecutive_skips = 0
        return metrics

    def _skip(self, why: str) -> dict[str, float]:
        self.consecutive_skips += 1
        self.run_.logger.write(f"skipping the update: {why} ({self.consecutive_skips} in a row)")
        if self.consecutive_skips > self.cfg.faults.max_consecutive_skips:
            raise RuntimeError(f"{self.consecutive_skips} consecutive steps were skipped (last: {why}); stopping. "
                               "See faults/* in metrics.jsonl")
        return {"faults/skipped_step": 1.0}

    def tokens_per_phase(self, data: StepData, metrics: dict) -> dict[str, float]:
        """Tokens each phase handled, over all replicas: the logger turns them into throughput/<phase>_tokens_per_s."""
        dp, updated = self.run_.student.pgc.dp, "faults/skipped_step" not in metrics
        return {"rollout": _sum_over(sum(map(len, data.responses)), dp),
                "update": _sum_over(data.tokens * self.cfg.algo.updates_per_batch if updated else 0, dp)}

    # ---- eval, checkpoint, shutdown --------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        r, cfg = self.run_, self.cfg
        items = r.eval_items[r.dp_rank::r.dp_size]
        params = dataclasses.replace(r.sampling, temperature=cfg.eval.temperature, seed=cfg.train.seed)
        records = generate_and_verify(r.rollout.generate, items, r.decode, n=cfg.eval.n, params=params) \
            if r.rollout.is_leader else []
        gathered = [None] * r.dp_size
        dist.all_gather_object(gathered, records, group=r.student.pgc.dp)
        return {f"eval/{k}": v for k, v in summarize([x for part in gathered for x in part]).items()}

    def save(self, step: int) -> None:
        r = self.run_
        checkpoint.save_training_checkpoint(
            r.checkpoint_root, step, r.student, keep_last=self.cfg.checkpoint.keep_last, group=r.student_world,
            hf_dir=r.student_hf_dir,
            trainer_state={"step": step, "sampler": r.sampler.state_dict(),
                           "consecutive_skips": self.consecutive_skips},
        )

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True
        self.run_.logger.write("SIGTERM: finishing this step, writing a checkpoint, then exiting")

    def _stop_agreed(self) -> bool:
        flag = torch.tensor([float(self.stop_requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.run_.student_world)
        return bool(flag.item())


def _response_metrics(data: StepData) -> dict[str, Stat]:
    """Response lengths, and the fraction of responses cut off at max_new_tokens (finish reason "length")."""
    rows = torch.tensor(float(len(data.responses)), dtype=torch.float64)
    truncated = sum(reason == "length" for reason in data.finish_reasons)
    return {"rollout/truncated_frac": Stat(torch.tensor(float(truncated), dtype=torch.float64), rows),
            "rollout/response_length": Stat(torch.tensor(float(sum(map(len, data.responses))), dtype=torch.float64),
                                             rows)}


def _pad(t: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, seq - t.shape[-1]))


def _sum_over(value: float, group) -> float:
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.item()
