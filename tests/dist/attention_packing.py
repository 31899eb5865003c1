"""SDPAttention and packed micro-batches in a real GPTModel (the tiny Qwen3: qk-norm, GQA, head_dim != h/heads,
HF weights), at TP = the world size. Each check writes its measured maxima; rank 0 writes the JSON.

- parity: SDPAttention against megatron's DotProductAttention: logits, the gradient of every parameter;
- packing: rows of very different lengths packed into one sequence (and padded to a fixed length) against the same
  rows right-padded: per-token log-probs and the gradient of a masked sum of them; the log-prob of each row's first
  token; megatron's attention refusing a packed micro-batch;
- memory: peak memory that a forward (--forward-only: under no_grad, as for scoring) or a forward + backward at
  --memory-tokens tokens adds, with each attention (RSS on CPU, the allocator's peak on CUDA).
"""

import argparse
import json
import warnings

warnings.filterwarnings("ignore")

import torch
import torch.distributed as dist

from megatron_gopd.runtime.distributed import device, init_distributed

init_distributed()

from bench.common import proc_status_kib, reset_peak_rss
from megatron_gopd.models.architectures import ModelDims
from megatron_gopd.models.builder import HFWeights, build_model, load_hf_weights
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from megatron_gopd.models.packing import pack_rows, packed_seq_params, unpack
from megatron_gopd.models.parallel_model import ParallelModel
from megatron_gopd.runtime.layout import ParallelShape, build_layout
from tests.tiny import tiny_hf_model

parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
parser.add_argument("--checks", default="parity,packing")
parser.add_argument("--memory-tokens", type=int, default=4096)
parser.add_argument("--forward-only", action="store_true")
parser.add_argument("--pp", type=int, default=1, help="pipeline stages (TP = the rest of the world)")
args = parser.parse_args()

layout = build_layout(ParallelShape(tp=dist.get_world_size() // args.pp, pp=args.pp))
pgc = layout.student.pgc
hf = tiny_hf_model("qwen3", seed=3)
dims = ModelDims.from_hf(hf.config)
weights = HFWeights(hf.state_dict())
results = {}


def model(attention: str) -> ParallelModel:
    gpt = build_model(dims, pgc, seed=11, attention=attention)
    load_hf_weights(gpt, dims, weights)
    return ParallelModel(gpt, dims)


def max_over_ranks(value: float) -> float:
    t = torch.tensor(float(value))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def forward_backward(m: ParallelModel, micro_batch: dict, weight_key: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Log-probs and logits (this rank's vocab shard; empty before the last pipeline stage) of one micro-batch, and
    the gradients of sum(log-probs * micro_batch[weight_key]) by parameter name."""
    m.gpt.zero_grad(set_to_none=True)

    def loss_fn(mb, lp, ent, logits):
        return (lp * mb[weight_key]).sum(), {"lp": lp.detach(), "logits": logits.detach()}

    outputs = m.forward_backward([micro_batch], loss_fn, temperature=1.0, forward_only=False, with_entropy=False)
    out = outputs[0] if outputs else {"lp": torch.zeros(0), "logits": torch.zeros(0)}
    grads = {n: p.grad.clone() for n, p in m.gpt.named_parameters()}
    return out["lp"], out["logits"], grads


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def grad_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


if "parity" in args.checks:
    g = torch.Generator().manual_seed(5)
    # weights summing to 1, as a loss normalised by its token count has
    batch = {"tokens": torch.randint(0, dims.vocab_size, (2, 48), generator=g),
             "weight": torch.rand(2, 48, generator=g) / 48}
    lp_m, logits_m, grads_m = forward_backward(model("megatron"), batch, "weight")
    lp_s, logits_s, grads_s = forward_backward(model("sdpa"), batch, "weight")
    results["parity"] = {
        "logits_max_diff": max_over_ranks(max_diff(logits_s, logits_m)),
        "logprobs_max_diff": max_over_ranks(max_diff(lp_s, lp_m)),
        "grad_max_diff": max_over_ranks(grad_diff(grads_s, grads_m)),
        "grad_max_abs": max_over_ranks(max(g.abs().max().item() for g in grads_m.values())),
    }

if "packing" in args.checks:
    lengths = [7, 61, 3, 120, 29]
    g = torch.Generator().manual_seed(6)
    rows, seq = len(lengths), max(lengths)
    tokens = torch.randint(0, dims.vocab_size, (rows, seq), generator=g)
    real = torch.arange(seq) < torch.tensor(lengths)[:, None]
    # a "response" that starts after a short prompt in each row, weighted at random: the masked sum of log-probs
    prompt = torch.tensor([2, 5, 1, 9, 4])[:, None]
    mask = (real & (torch.arange(seq) >= prompt)).float()
    batch = {"tokens": torch.where(real, tokens, 0), "response_mask": mask,
             "weight": mask * torch.rand(rows, seq, generator=g) / mask.sum(), "row_id": torch.arange(rows)}
    sdpa = model("sdpa")
    lp_u, _, grads_u = forward_backward(sdpa, batch, "weight")
    last_stage = sdpa.is_last_stage
    entry = {"logprobs_max_abs": max_over_ranks(lp_u[real].abs().max().item() if last_stage else 0.0)}
    for name, pad_to in (("packed", None), ("packed_padded", sum(lengths) + 13)):
        packed = pack_rows(batch, lengths, pad_to=pad_to)
        lp_p, _, grads_p = forward_backward(sdpa, packed, "weight")
        per_row = unpack(lp_p, packed["cu_seqlens"]) if last_stage else []
        entry[name] = {
            "grad_max_diff": max_over_ranks(grad_diff(grads_p, grads_u)),
            "logprobs_max_diff": max_over_ranks(max((max_diff(r, lp_u[i, :n]) for i, (r, n) in
                                                     enumerate(zip(per_row, lengths))), default=0.0)),
            "logprobs_tokens": max_over_ranks(lp_p.shape[-1] if last_stage else 0),
            # the rows' first tokens: never scored against the row before
            "first_token_logprobs_max_abs": max_over_ranks(max((r[0].abs().item() for r in per_row), default=0.0)),
        }
    # RoPE as megatron's Attention applies it to a packed sequence (the THD path), against each row on its own:
    # positions must restart per row. (Confined attention hides an offset, RoPE being relative, so the log-probs
    # above cannot show it.)
    for name, pad_to in (("packed", None), ("packed_padded", sum(lengths) + 13)):
        total = pad_to or sum(lengths)
        params = packed_seq_params(pack_rows(batch, lengths)["cu_seqlens"], total, device())
        rope, config = sdpa.gpt.rotary_pos_emb, sdpa.gpt.config
        freqs = rope(rope.get_rotary_seq_len(None, None, None, config, params), packed_seq=True)
        x = torch.randn(total, 2, dims.head_dim, generator=g).to(device())
        packed_x = apply_rotary_pos_emb(x, freqs, config, cu_seqlens=params.cu_seqlens_q, cp_group=pgc.cp)
        bounds = params.cu_seqlens_q.tolist()
        alone = torch.cat([apply_rotary_pos_emb(x[a:b, None], rope(b - a), config, cp_group=pgc.cp)[:, 0]
                           for a, b in zip(bounds[:-1], bounds[1:])])
        entry[name]["rope_vs_rows_alone_max_diff"] = (packed_x - alone).abs().max().item()
    try:
        model("megatron").token_logprobs([pack_rows(batch, lengths)])
        entry["megatron_refuses_packed"] = None
    except ValueError as e:
        entry["megatron_refuses_packed"] = str(e)
    results["packing"] = entry

if "memory" in args.checks:
    s = args.memory_tokens
    tokens = torch.randint(0, dims.vocab_size, (1, s), generator=torch.Generator().manual_seed(7))
    batch = {"tokens": tokens, "weight": torch.ones(1, s)}
    on_cuda = device().type == "cuda"
    entry = {"tokens": s, "score_matrix_one_head_mib": s * s * 4 / 2**20,
             "heads_per_rank": dims.num_heads // pgc.tp.size(), "device": device().type}
    for attention in ("sdpa", "megatron"):  # sdpa first: nothing of megatron's can linger in its measurement
        m = model(attention)
        forward_backward(m, {"tokens": tokens[:, :64], "weight": batch["weight"][:, :64]}, "weight")  # warm-up
        if on_cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            before = reset_peak_rss() * 1024
        if args.forward_only:
            m.token_logprobs([batch])
        else:
            forward_backward(m, batch, "weight")
        peak = torch.cuda.max_memory_allocated() if on_cuda else proc_status_kib("VmHWM") * 1024
        entry[f"{attention}_peak_extra_mib"] = max_over_ranks((peak - before) / 2**20)
        del m
    results["memory"] = entry

if dist.get_rank() == 0:
    with open(args.out, "w") as f:
        json.dump(results, f)
dist.destroy_process_group()
