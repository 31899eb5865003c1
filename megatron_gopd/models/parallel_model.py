"""A megatron GPTModel stage with its process groups: forward passes and training steps over micro-batches.

Every pass goes through megatron-core's `forward_backward_func` (1F1B when PP > 1) with the role's own
ProcessGroupCollection, so the same code runs a student, a dedicated teacher or a colocated one.

Per-token tensors are aligned with the tokens: entry t of a [batch, seq] tensor is about token t given the
tokens before it (entry 0, which has no context, is 0).

Devices: the trainer's tensors (rollout batches, old log-probs, advantages, masks, teacher scores) live on the
CPU. This class is the one boundary: `run` moves each micro-batch to the model's device as the schedule takes it,
the loss function computes there, and whatever leaves `run` (the loss function's metrics, `token_logprobs`) is
returned on the CPU. On a CPU-only machine both moves are no-ops.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from megatron_gopd.algo.logprobs import token_logprobs_and_entropy
from megatron_gopd.config import OptimConfig
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.runtime.distributed import collectives_scoped_to, device

MicroBatch = dict[str, torch.Tensor]  # "tokens" [b, s] plus any per-token inputs of the loss
# (micro-batch, logprobs [b, s], entropy [b, s] | None, logits shard [b, s, V/tp]) -> (loss, metrics)
LossFn = Callable[[MicroBatch, torch.Tensor, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, dict]]


def shifted_token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, tp_group, *, vocab_size: int, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(tokens[t] | tokens[<t]) from vocab-parallel logits, aligned with `tokens` (entry 0 is 0)."""
    # Every position is scored against the next token (the last one against the first, then dropped): slicing
    # the logits to [:, :-1] instead would copy the whole [b, s, V/tp] tensor whenever b > 1.
    lp, ent = token_logprobs_and_entropy(
        logits, torch.roll(tokens, -1, dims=1), tp_group, vocab_size=vocab_size, temperature=temperature,
        with_entropy=with_entropy,
    )
    pad = lp.new_zeros(lp.shape[0], 1)
    return torch.cat([pad, lp[:, :-1]], 1), (torch.cat([pad, ent[:, :-1]], 1) if ent is not None else None)


def to_device(mb: MicroBatch, target: torch.device) -> MicroBatch:
    """The micro-batch's tensors on `target` (the same dict's tensors, unchanged, when they are there already)."""
    return {k: v.to(target, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in mb.items()}


def to_host(obj):
    """The tensors in `obj` (dicts, lists, tuples, dataclasses such as Stat) as CPU tensors; CPU tensors are
    returned as they are. Copies from the GPU are queued without waiting and synchronised once at the end."""
    copied = []

    def move(x):
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu":
                return x
            copied.append(x)
            return x.to("cpu", non_blocking=True)  # into pinned memory: valid after the synchronize below
        if isinstance(x, dict):
            return {k: move(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return dataclasses.replace(x, **{f.name: move(getattr(x, f.name)) for f in dataclasses.fields(x)
                                             if f.init})
        return x

    out = move(obj)
    if copied:
        torch.cuda.synchronize()
    return out


@dataclass
class ParallelModel:
    """One pipeline stage of a (TP x PP)-sharded model, DP-replicated over `pgc.dp`."""

    module: torch.nn.Module  # a GPTModel, or the DDP wrapper around it
    dims: ModelDims

    @property
    def gpt(self) -> GPTModel:
        return self.module.module if isinstance(self.module, DistributedDataParallel) else self.module

    @property
    def pgc(self):
        return self.gpt.pg_collection

    @property
    def is_last_stage(self) -> bool:
        return self.pgc.pp.rank() == self.pgc.pp.size() - 1

    @property
    def experts_span_replicas(self) -> bool:
        """Whether this mixture of experts spreads a layer's experts over DP replicas (ep taken from dp). Then
        every forward is collective over those replicas (the token all-to-all), so they must run the same number
        of forwards, even a replica with nothing to do."""
        pgc = self.pgc
        return self.dims.is_moe and not set(dist.get_process_group_ranks(pgc.tp_ep)) <= set(
            dist.get_process_group_ranks(pgc.mp))

    def run(self, micro_batches: list[MicroBatch], loss_fn: LossFn, *, temperature: float, forward_only: bool,
            with_entropy: bool = True) -> list[dict]:
        """Runs megatron's schedule over the micro-batches (all of one shape). Returns, on the last pipeline
        stage, each micro-batch's metrics dict, its tensors on the CPU; elsewhere an empty list.

        Each micro-batch reaches `loss_fn` with its tensors on the model's device, as do the log-probs."""
        pgc, config = self.pgc, self.gpt.config
        batch, seq = micro_batches[0]["tokens"].shape
        target = device()

        def forward_step(data_iterator, model):
            mb = to_device(next(data_iterator), target)
            tokens = mb["tokens"]
            positions = torch.arange(seq, device=tokens.device).unsqueeze(0).expand(batch, -1)
            output = model(tokens, positions, None)

            def loss_func(logits):
                lp, ent = shifted_token_logprobs(
                    logits, tokens, pgc.tp, vocab_size=self.dims.vocab_size, temperature=temperature,
                    with_entropy=with_entropy,
                )
                return loss_fn(mb, lp, ent, logits)

            return output, loss_func

        pp = pgc.pp.size()
        schedule = get_forward_backward_func(pp_size=pp, vp_size=None)
        extra = {"p2p_communicator": P2PCommunicator(pp_group=pgc.pp, config=config)} if pp > 1 else {}
        outputs = schedule(
            forward_step_func=forward_step,
            data_iterator=iter(micro_batches),
            model=[self.module],
            num_microbatches=len(micro_batches),
            seq_length=seq,
            micro_batch_size=batch,
            forward_only=forward_only,
            pg_collection=pgc,
            **extra,
        )
        return to_host(outputs)

    @torch.no_grad()
    def token_logprobs(self, micro_batches: list[MicroBatch], *, temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-token log-probs [b, s] of each micro-batch, as fp32 CPU tensors, on every rank of the model's
        TP x PP group. When the experts span replicas (`experts_span_replicas`), every rank of the role must
        call this, with micro-batches or without."""
        self.module.eval()
        spare = 0
        if self.experts_span_replicas:
            # Match the busiest replica's forwards with one-token dummies, agreed on before any forward (every
            # stage of a replica has the same micro-batches, so the maximum over a stage's ranks is the role's).
            most = torch.tensor([len(micro_batches)])
            dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.pgc.tp_dp_cp)
            spare = int(most.item()) - len(micro_batches)
        results = self._token_logprobs(micro_batches, temperature) if micro_batches else []
        if spare:
            self._token_logprobs([{"tokens": torch.zeros(1, 1, dtype=torch.long)}] * spare, temperature)
        return results

    def _token_logprobs(self, micro_batches: list[MicroBatch], temperature: float) -> list[torch.Tensor]:
        def keep(mb, lp, ent, logits):
            return lp.new_zeros(()), {"logprobs": lp}

        outputs = self.run(micro_batches, keep, temperature=temperature, forward_only=True, with_entropy=False)
        results = [o["logprobs"] for o in outputs] if self.is_last_stage else [
            torch.empty(mb["tokens"].shape) for mb in micro_batches
        ]
        if self.pgc.pp.size() > 1:  # the last stage computed them; the other stages need them too
            last = dist.get_global_rank(self.pgc.pp, self.pgc.pp.size() - 1)
            for r in results:
                dist.broadcast(r, src=last, group=self.pgc.pp)
        return results


class TrainableModel(ParallelModel):
    """The student: megatron DDP + the (distributed) optimizer + an LR schedule."""

    def __init__(self, gpt: GPTModel, dims: ModelDims, optim: OptimConfig, role_world: dist.ProcessGroup,
                 total_steps: int):
        config, pgc = gpt.config, gpt.pg_collection
        ddp = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=optim.distributed_optimizer
            ),
            module=gpt,
            pg_collection=pgc,
        )
        super().__init__(ddp, dims)
        self.role_world = role_world
        optimizer_config = OptimizerConfig(
            optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad, use_distributed_optimizer=optim.distributed_optimizer,
            bf16=config.bf16, params_dtype=config.params_dtype,
        )
        with collectives_scoped_to(role_world):  # it all-gathers over the WORLD group
            self.optimizer = get_megatron_optimizer(
                optimizer_config, [ddp], use_gloo_process_groups=False, pg_collection=pgc
            )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps, lr_decay_steps=optim.decay_steps or max(total_steps, 1),
            lr_decay_style=optim.decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
            wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
        )
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = ddp.no_sync
        config.grad_scale_func = self.optimizer.scale_loss

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, *, temperature: float,
                   with_entropy: bool = True) -> tuple[list[dict], dict]:
        """One optimizer step over this DP rank's micro-batches.

        `loss_fn` must return each micro-batch's share of the GLOBAL loss (its sum of terms divided by the
        global normaliser). Megatron divides each micro-batch loss by the number of micro-batches and DDP
        averages over DP, so we scale that back: the gradient is then exactly the global sum's gradient.
        """
        scale = len(micro_batches) * self.pgc.dp.size()

        def scaled_loss(mb, lp, ent, logits):
            loss, metrics = loss_fn(mb, lp, ent, logits)
            return loss * scale, metrics

        self.module.train()
        self.module.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self.run(micro_batches, scaled_loss, temperature=temperature, forward_only=False,
                           with_entropy=with_entropy)
        if not self._grads_finite():  # megatron's fp32/bf16 optimizers would apply NaN/inf grads
            return outputs, {"grad_norm": math.nan, "update_ok": False, "lr": self.optimizer.param_groups[0]["lr"]}
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        return outputs, {"grad_norm": float(grad_norm or 0.0), "update_ok": bool(update_ok),
                         "lr": self.optimizer.param_groups[0]["lr"]}

    def _grads_finite(self) -> bool:
        """Checks the reduced gradients in DDP's buffers on every rank of the role, before any update."""
        bad = torch.zeros(1, device=device())  # beside the buffers: one all-reduce, one sync
        for buffer in self.module.buffers + self.module.expert_parallel_buffers:
            bad += (~torch.isfinite(buffer.grad_data)).any().float()
        dist.all_reduce(bad, group=self.role_world)
        return bad.item() == 0
