"""A megatron GPTModel stage with its process groups: forward passes and training steps over micro-batches.

Every pass goes through megatron-core's `forward_backward_func` (1F1B when PP > 1) with the role's own
ProcessGroupCollection, so the same code runs a student, a dedicated teacher or a colocated one.

Per-token tensors are aligned with the tokens: entry t of a [batch, seq] tensor is about token t given the
tokens before it (entry 0, which has no context, is 0). A micro-batch may instead be packed (models/packing.py:
its rows end to end in one sequence of batch 1, with `cu_seqlens`): each row then runs as if alone, and the entry
at each row's first token is 0.

Devices: the trainer's tensors (rollout batches, old log-probs, advantages, masks, teacher scores) live on the
CPU. This class is the one boundary: `forward_backward` moves each micro-batch to the model's device as the schedule takes it,
the loss function computes there, and whatever leaves `forward_backward` (the loss function's metrics, `token_logprobs`) is
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
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_gopd.algo.logprobs import token_logprobs_and_entropy
from megatron_gopd.metrics import merge_metrics, reduce_metrics
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.expert_load import ExpertLoad
from megatron_gopd.models.packing import ROW_BOUNDS, packed_positions, packed_seq_params, row_starts
from megatron_gopd.runtime.cpu_compat import plain_torch
from megatron_gopd.runtime.distributed import collectives_scoped_to, computed_on, device

# "tokens" [b, s] plus any per-token inputs of the loss; packed (models/packing.py): b = 1, plus "cu_seqlens"
MicroBatch = dict[str, torch.Tensor]
# (micro-batch, logprobs [b, s], entropy [b, s] | None, logits shard [b, s, V/tp]) -> (loss, metrics)
LossFn = Callable[[MicroBatch, torch.Tensor, torch.Tensor | None, torch.Tensor], tuple[torch.Tensor, dict]]


def shifted_token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, tp_group, *, vocab_size: int, temperature: float, with_entropy: bool,
    row_starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(tokens[t] | tokens[<t]) from vocab-parallel logits, aligned with `tokens` (entry 0 is 0). For a packed
    sequence, `row_starts` (each row's first index) are 0 too: never scored against the previous row's last token."""
    # Every position is scored against the next token (the last one against the first, then dropped): slicing
    # the logits to [:, :-1] instead would copy the whole [b, s, V/tp] tensor whenever b > 1.
    lp, ent = token_logprobs_and_entropy(
        logits, torch.roll(tokens, -1, dims=1), tp_group, vocab_size=vocab_size, temperature=temperature,
        with_entropy=with_entropy,
    )

    def shift(values):
        shifted = torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], 1)
        return shifted if row_starts is None else shifted.index_fill(1, row_starts, 0.0)

    return shift(lp), (shift(ent) if ent is not None else None)


def fp8_padded_length(seq: int, config) -> int:
    """Transformer Engine's FP8 GEMMs need the token count of every micro-batch in multiples of 16 (32 for
    MXFP8; megatron's get_fp8_align_size), per TP rank under sequence parallelism; other runs keep `seq`."""
    if not config.fp8:
        return seq
    from megatron.core.fp8_utils import get_fp8_align_size

    align = get_fp8_align_size(config.fp8_recipe)
    if config.sequence_parallel:
        align *= config.tensor_model_parallel_size
    return math.ceil(seq / align) * align


def pad_tokens(mb: MicroBatch, seq: int) -> MicroBatch:
    """The micro-batch with every per-token [batch, s] tensor right-padded with zeros to `seq` (masks are 0
    there, so the padding takes no part in any loss or metric; attention is causal, so no earlier token sees it)."""
    batch, length = mb["tokens"].shape
    if length == seq:
        return mb
    return {k: torch.nn.functional.pad(v, (0, seq - length)) if isinstance(v, torch.Tensor) and v.dim() >= 2
            and v.shape[:2] == (batch, length) else v for k, v in mb.items()}


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

    def forward_backward(self, micro_batches: list[MicroBatch], loss_fn: LossFn, *, temperature: float,
                         forward_only: bool, with_entropy: bool = True) -> list[dict]:
        """Runs megatron's schedule over the micro-batches (of any shapes: at PP > 1 the stages exchange each
        activation's shape). Returns, on the last pipeline stage, each micro-batch's metrics dict, its tensors on
        the CPU; elsewhere an empty list.

        Each micro-batch reaches `loss_fn` with its tensors on the model's device, as do the log-probs. A packed
        micro-batch (models/packing.py) runs each of its rows as if alone; `loss_fn` sees its [1, T] tensors."""
        pgc, config = self.pgc, self.gpt.config
        micro_batches = [pad_tokens(mb, fp8_padded_length(mb["tokens"].shape[1], config)) for mb in micro_batches]
        batch, seq = micro_batches[0]["tokens"].shape
        target = device()
        if any(ROW_BOUNDS in mb for mb in micro_batches):  # on every rank, before any stage waits for another
            self._check_packing_supported()

        def forward_step(data_iterator, model):
            host = next(data_iterator)
            mb = to_device(host, target)
            output, starts = self._forward(model, host, mb["tokens"])

            def loss_func(logits):
                lp, ent = shifted_token_logprobs(
                    logits, mb["tokens"], pgc.tp, vocab_size=self.dims.vocab_size, temperature=temperature,
                    with_entropy=with_entropy, row_starts=starts,
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

    def _forward(self, model, host: MicroBatch, tokens: torch.Tensor):
        """This stage's output for a micro-batch (`host`: its CPU tensors, `tokens` on the model's device), and the
        first index of each packed row (None unpacked)."""
        b, s = tokens.shape
        # The model's layers never name CUDA (only megatron's schedules, DDP and optimizer do): they run without the
        # CPU compatibility layer's per-call rewrite, at plain torch's speed.
        with plain_torch():
            if ROW_BOUNDS not in host:
                positions = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, -1)
                return model(tokens, positions, None), None
            packing = packed_seq_params(host[ROW_BOUNDS], s, tokens.device)
            positions = packed_positions(packing.cu_seqlens_q, s)
            return model(tokens, positions, None, packed_seq_params=packing), row_starts(packing.cu_seqlens_q, s)

    @torch.no_grad()
    def logits(self, mb: MicroBatch) -> torch.Tensor:
        """This rank's vocab shard of the logits of a micro-batch whose tensors are on the model's device (a
        single-stage model: the full-vocabulary loss reads a colocated teacher's logits inside the student's)."""
        host = {ROW_BOUNDS: mb[ROW_BOUNDS].cpu()} if ROW_BOUNDS in mb else {}
        if host:
            self._check_packing_supported()
        return self._forward(self.gpt, host, mb["tokens"])[0]

    def _check_packing_supported(self) -> None:
        if any(isinstance(m, DotProductAttention) for m in self.gpt.modules()):
            raise ValueError("packed micro-batches need attention 'sdpa' or 'te': megatron's DotProductAttention "
                             "(attention 'megatron') cannot confine attention to each packed row")

    @torch.no_grad()
    def token_logprobs(self, micro_batches: list[MicroBatch], *, temperature: float = 1.0) -> list[torch.Tensor]:
        """Per-token log-probs [b, s] of each micro-batch, as fp32 CPU tensors, on every rank of the model's
        TP x PP group. When the experts span replicas (`experts_span_replicas`), every rank of the role must
        call this, with micro-batches or without."""
        self.module.eval()
        spare = self._lockstep_spare(len(micro_batches))
        results = self._token_logprobs(micro_batches, temperature) if micro_batches else []
        if spare:
            self._token_logprobs([_lockstep_dummy()] * spare, temperature)
        return results

    def _lockstep_spare(self, count: int) -> int:
        """How many one-token dummy micro-batches this replica runs after its own so that replicas whose experts
        are shared (`experts_span_replicas`) run as many forwards as the busiest one; 0 otherwise. Agreed on
        before any forward (every stage of a replica has the same micro-batches, so the maximum over a stage's
        ranks is the role's)."""
        if not self.experts_span_replicas:
            return 0
        most = torch.tensor([count])
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.pgc.tp_dp_cp)
        return int(most.item()) - count

    def _token_logprobs(self, micro_batches: list[MicroBatch], temperature: float) -> list[torch.Tensor]:
        def keep(mb, lp, ent, logits):
            return lp.new_zeros(()), {"logprobs": lp}

        outputs = self.forward_backward(micro_batches, keep, temperature=temperature, forward_only=True,
                                        with_entropy=False)
        results = [o["logprobs"][:, :mb["tokens"].shape[1]] for o, mb in zip(outputs, micro_batches)  # no FP8 pad
                   ] if self.is_last_stage else [
            torch.empty(mb["tokens"].shape) for mb in micro_batches
        ]
        if self.pgc.pp.size() > 1:  # the last stage computed them; the other stages need them too
            last = dist.get_global_rank(self.pgc.pp, self.pgc.pp.size() - 1)
            for r in results:
                dist.broadcast(r, src=last, group=self.pgc.pp)
        return results


_LOCKSTEP = "lockstep"


def _lockstep_dummy() -> MicroBatch:
    return {"tokens": torch.zeros(1, 1, dtype=torch.long), _LOCKSTEP: torch.ones(1)}


def adam(lr: float, **settings) -> OptimizerConfig:
    """megatron's optimizer config for Adam with the distributed optimizer and no weight decay, unless `settings`
    say otherwise (megatron's own defaults differ: weight decay 0.01, no distributed optimizer)."""
    return OptimizerConfig(**{"optimizer": "adam", "lr": lr, "min_lr": 0.0, "weight_decay": 0.0,
                              "use_distributed_optimizer": True,
                              **settings})


@dataclass(frozen=True)
class LRSchedule:
    """megatron's OptimizerParamScheduler settings: linear warmup, then `decay_style` over `decay_steps`."""

    warmup_steps: int = 0
    decay_steps: int = 1
    decay_style: str = "constant"  # constant | linear | cosine


class TrainableModel(ParallelModel):
    """The student: megatron DDP + the (distributed) optimizer + an LR schedule."""

    def __init__(self, gpt: GPTModel, dims: ModelDims, optimizer: OptimizerConfig, role_world: dist.ProcessGroup,
                 schedule: LRSchedule = LRSchedule()):
        """`optimizer`: megatron's own config (lr, Adam, clipping, distributed or not); its precision flags are
        taken from the model."""
        config, pgc = gpt.config, gpt.pg_collection
        optimizer = dataclasses.replace(optimizer, bf16=config.bf16, params_dtype=config.params_dtype)
        ddp = DistributedDataParallel(
            config=config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=optimizer.use_distributed_optimizer
            ),
            module=gpt,
            pg_collection=pgc,
        )
        super().__init__(ddp, dims)
        self.role_world = role_world
        with collectives_scoped_to(role_world):  # it all-gathers over the WORLD group
            self.optimizer = get_megatron_optimizer(optimizer, [ddp], use_gloo_process_groups=False,
                                                    pg_collection=pgc)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if schedule.warmup_steps else optimizer.lr, max_lr=optimizer.lr,
            min_lr=optimizer.min_lr, lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=schedule.decay_steps,
            lr_decay_style=schedule.decay_style, start_wd=optimizer.weight_decay, end_wd=optimizer.weight_decay,
            wd_incr_steps=schedule.decay_steps, wd_incr_style="constant",
        )
        self._offloaded = False
        self.expert_load = ExpertLoad(gpt) if dims.is_moe else None
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = ddp.no_sync
        config.grad_scale_func = self.optimizer.scale_loss

    def train_step(self, micro_batches: list[MicroBatch], loss_fn: LossFn, *, temperature: float,
                   with_entropy: bool = True) -> tuple[dict[str, float], dict]:
        """One optimizer step over this DP rank's micro-batches. Returns the loss function's metrics reduced over
        the data-parallel replicas (on every rank), and the step's grad_norm, lr and whether it updated.

        `loss_fn` must return each micro-batch's share of the GLOBAL loss (its sum of terms divided by the
        global normaliser). Megatron divides each micro-batch loss by the number of micro-batches and DDP
        averages over DP, so we scale that back: the gradient is then exactly the global sum's gradient.
        """
        micro_batches = micro_batches + [_lockstep_dummy()] * self._lockstep_spare(len(micro_batches))
        scale = len(micro_batches) * self.pgc.dp.size()

        def scaled_loss(mb, lp, ent, logits):
            if _LOCKSTEP in mb:  # no loss: it only keeps a mixture of experts' replicas in step
                return lp.sum() * 0.0, {}
            loss, metrics = loss_fn(mb, lp, ent, logits)
            return loss * scale, metrics

        self.module.train()
        self.module.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self.forward_backward(micro_batches, scaled_loss, temperature=temperature, forward_only=False,
                                        with_entropy=with_entropy)
        # the last pipeline stage holds the loss outputs: reduced over DP there, then shared with the other stages
        metrics = computed_on(self.pgc.pp, lambda: reduce_metrics(merge_metrics(*outputs), self.pgc.dp),
                              src=self.pgc.pp.size() - 1)
        lr = self.optimizer.param_groups[0]["lr"]
        if not self._grads_finite():  # megatron's fp32/bf16 optimizers would apply NaN/inf grads
            return metrics, {"grad_norm": math.nan, "update_ok": False, "lr": lr}
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=1)
        return metrics, {"grad_norm": float(grad_norm or 0.0), "update_ok": bool(update_ok),
                         "lr": self.optimizer.param_groups[0]["lr"]}

    def expert_metrics(self) -> dict[str, float]:
        """A mixture of experts' tokens per expert, their imbalance and the router's aux loss since the last call
        (collective over the role: call it on every rank, once per step); nothing for a dense model."""
        return self.expert_load.metrics() if self.expert_load is not None else {}

    def release_memory(self, offload: bool) -> None:
        """Hands the GPU to the co-located rollout engine between steps: with `offload`, the optimizer state (and
        the fp32 main weights it steps) and the gradient buffers move to host; then the caching allocator returns
        every free block to the device. A no-op on CPU."""
        if device().type != "cuda":
            return
        if offload and not self._offloaded:
            self.optimizer.offload_to_cpu()
            self.module.offload_grad_buffers(empty_cache=False)
            self._offloaded = True
        torch.cuda.empty_cache()

    def reclaim_memory(self) -> None:
        """Brings back what `release_memory` offloaded, before the next update."""
        if self._offloaded:
            self.module.restore_grad_buffers()
            self.optimizer.restore_from_cpu()
            self._offloaded = False

    def _grads_finite(self) -> bool:
        """Checks the reduced gradients in DDP's buffers on every rank of the role, before any update."""
        bad = torch.zeros(1, device=device())  # beside the buffers: one all-reduce, one sync
        for buffer in self.module.buffers + self.module.expert_parallel_buffers:
            # max and min propagate NaN and reach +-inf: two reductions, where isfinite() would allocate a bool
            # copy of the whole buffer (measured: ~380 MB of temporaries at 135M parameters, the peak of a step)
            extremes = torch.stack([buffer.grad_data.amax(), buffer.grad_data.amin()])
            bad += (~torch.isfinite(extremes)).any().float()
        dist.all_reduce(bad, group=self.role_world)
        return bad.item() == 0
