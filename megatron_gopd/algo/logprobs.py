"""Vocab-parallel, chunked per-token statistics of TP-sharded logits.

Shapes: a logits shard is [batch, seq, Vp/tp] (any float dtype). Shard r of a TP group of size n holds columns
[r*Vp/n, (r+1)*Vp/n) of the padded vocabulary Vp; columns at or beyond the true `vocab_size` are Megatron's padding
and are treated as -inf logits (they get zero probability and zero gradient).

Why hand-written: megatron-core's `vocab_parallel_cross_entropy` keeps the whole fp32 softmax alive for backward and
gives no entropy or KL. Here each function is an autograd.Function that walks the flattened tokens in chunks,
computes in fp32 per chunk only, saves the logits reference plus a few fp32 numbers per token, and recomputes the
chunk's softmax in backward. Extra memory is therefore 2-3 chunk-sized fp32 buffers, reused by every chunk (plus
the logits gradient itself, which autograd needs anyway). Each chunk costs two small all-reduces over the TP group (max, then
sums); backward needs none, because the global normalisers are saved.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist

# Default fp32 bytes of one chunk's [tokens, V/tp] slab (512 tokens of a 32k vocabulary). Measured on 2 loaded CPU
# cores: 256 to 1024 tokens of 32k run alike and well ahead of naive, while small chunks (32 tokens) lose several-fold
# to thread-pool barriers; on GPU it keeps every kernel large. Peak extra memory is 2-3 such slabs.
DEFAULT_CHUNK_BYTES = 64 * 2**20


class _Shard:
    """Where this rank's logits columns sit in the true vocabulary, and how tokens are chunked."""

    def __init__(self, logits: torch.Tensor, tp_group, vocab_size: int, chunk_tokens: int | None):
        self.group = tp_group if tp_group is not None and dist.get_world_size(tp_group) > 1 else None
        tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
        tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
        local_vocab = logits.shape[-1]
        if not 0 < vocab_size <= local_vocab * tp_size:
            raise ValueError(
                f"vocab_size={vocab_size} must be in [1, padded vocab {local_vocab * tp_size}] "
                f"(logits shard width {local_vocab} x tp {tp_size})"
            )
        self.start = tp_rank * local_vocab
        # Columns [0, n_valid) of the shard are real tokens; the rest is padding (possibly the whole shard).
        self.n_valid = max(0, min(local_vocab, vocab_size - self.start))
        if chunk_tokens is None:
            chunk_tokens = max(1, DEFAULT_CHUNK_BYTES // (4 * local_vocab))
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.chunk_tokens = chunk_tokens

    def chunks(self, n_tokens: int) -> Iterator[slice]:
        for lo in range(0, n_tokens, self.chunk_tokens):
            yield slice(lo, min(lo + self.chunk_tokens, n_tokens))

    def real(self, flat_logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """The chunk's real-vocabulary columns, a view in the logits' dtype."""
        return flat_logits[rows, : self.n_valid]

    @staticmethod
    def row_max(x: torch.Tensor) -> torch.Tensor:
        """fp32 max over the last dim; -inf for a shard of pure padding (no columns)."""
        return x.amax(dim=-1).float() if x.shape[-1] else x.new_full(x.shape[:1], -math.inf, dtype=torch.float32)

    def global_max(self, *local_maxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Row maxima over the whole vocabulary, one all-reduce for all of them."""
        m = torch.stack(local_maxes, dim=-1)
        if self.group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        return m.unbind(-1)

    def global_sum(self, packed: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(packed, group=self.group)
        return packed

    def local_target_index(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(index into the shard's real columns, clamped to be safe; mask of targets that live on this shard)."""
        local = targets - self.start
        on_shard = (local >= 0) & (local < self.n_valid)
        return local.clamp(0, max(self.n_valid - 1, 0)), on_shard


def _workspace(shard: _Shard, flat: torch.Tensor, count: int) -> list[torch.Tensor]:
    """`count` fp32 [chunk_tokens, V_real] buffers reused by every chunk of one call. Fresh chunk-sized tensors would
    cost a page-faulting allocation per chunk on CPU (big blocks go straight back to the OS), which dominates the
    elementwise work; on GPU the caching allocator makes this a no-op either way."""
    rows = min(shard.chunk_tokens, flat.shape[0])
    return [flat.new_empty((rows, shard.n_valid), dtype=torch.float32) for _ in range(count)]


def _scaled_minus(raw: torch.Tensor, scale: float, row_offset: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """fp32 `raw * scale - row_offset[:, None]` in one pass into `buf` (mixed dtypes promote to fp32)."""
    return torch.add(-row_offset.unsqueeze(-1), raw, alpha=scale, out=buf[: raw.shape[0]])


def _scaled(raw: torch.Tensor, scale: float, buf: torch.Tensor) -> torch.Tensor:
    """fp32 `raw * scale` into `buf`; bf16 is upcast first, as bf16 * float would compute in bf16."""
    out = buf[: raw.shape[0]]
    return torch.mul(raw, scale, out=out) if raw.dtype == torch.float32 else out.copy_(raw).mul_(scale)


def _check_inputs(logits: torch.Tensor, name: str, temperature: float) -> None:
    if logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(
            f"{name} must be a floating tensor [..., vocab_shard], got {tuple(logits.shape)} {logits.dtype}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _rows(t: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if t is None else t[rows]


def _flatten(logits: torch.Tensor) -> torch.Tensor:
    # A view for contiguous logits (Megatron's GPTModel returns them contiguous); otherwise one copy in their dtype.
    return logits.reshape(-1, logits.shape[-1])


def _logprob_entropy_chunk(shard: _Shard, raw, targets, inv_t: float, with_entropy: bool, work):
    """(log-prob, log-normaliser, entropy or None) of one chunk's tokens, [tokens] fp32 each."""
    (m,) = shard.global_max(shard.row_max(raw) * inv_t)  # max commutes with the positive scaling
    shifted = _scaled_minus(raw, inv_t, m, work[0])
    exp = torch.exp(shifted, out=work[1][: raw.shape[0]])
    idx, on_shard = shard.local_target_index(targets)
    target = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1) if shard.n_valid else torch.zeros_like(m)
    stats = [exp.sum(-1), target.masked_fill(~on_shard, 0.0)]
    if with_entropy:
        # sum_j e_j * s_j as a batched dot product: no [tokens, V] temporary.
        stats.append(torch.bmm(exp.unsqueeze(1), shifted.unsqueeze(-1)).view(-1))
    sum_exp, target, *dot = shard.global_sum(torch.stack(stats, dim=-1)).unbind(-1)
    log_z = sum_exp.log()
    return target - log_z, m + log_z, log_z - dot[0] / sum_exp if with_entropy else None


def _logprob_entropy_grad_chunk(shard: _Shard, raw, targets, inv_t: float, lse, a, b, target_grad, out, work):
    """Writes p_j (a + b log p_j) + 1[j=t] target_grad into the chunk's gradient `out`; b None: no entropy term."""
    log_p = _scaled_minus(raw, inv_t, lse, work[0])
    p = torch.exp(log_p, out=work[1][: raw.shape[0]])
    coef = a.unsqueeze(-1) if b is None else log_p.mul_(b.unsqueeze(-1)).add_(a.unsqueeze(-1))
    torch.mul(p, coef, out=out)
    if target_grad is not None:
        idx, on_shard = shard.local_target_index(targets)
        idx, on_shard = idx.unsqueeze(-1), on_shard.unsqueeze(-1)
        # Overwrite the target column with its value computed in fp32: adding into a bf16 `out` would round twice.
        exact = p.gather(-1, idx) * coef.expand_as(p).gather(-1, idx) + target_grad.unsqueeze(-1)
        out.scatter_(-1, idx, torch.where(on_shard, exact, out.gather(-1, idx).float()).to(out.dtype))


class _TokenLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, shard: _Shard, temperature: float, with_entropy: bool):
        flat, flat_targets = _flatten(logits), targets.reshape(-1)
        n, inv_t = flat.shape[0], 1.0 / temperature
        logprobs = flat.new_empty(n, dtype=torch.float32)
        entropy = torch.empty_like(logprobs) if with_entropy else None
        lse = torch.empty_like(logprobs)
        work = _workspace(shard, flat, 2)
        for rows in shard.chunks(n):
            logprobs[rows], lse[rows], chunk_entropy = _logprob_entropy_chunk(
                shard, shard.real(flat, rows), flat_targets[rows], inv_t, with_entropy, work
            )
            if with_entropy:
                entropy[rows] = chunk_entropy
        ctx.shard, ctx.temperature, ctx.logits_shape = shard, temperature, logits.shape
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(flat, flat_targets, lse, entropy if with_entropy else lse.new_empty(0))
        shape = targets.shape
        return logprobs.view(shape), entropy.view(shape) if with_entropy else None

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs, grad_entropy):
        flat, flat_targets, lse, entropy = ctx.saved_tensors
        shard, inv_t = ctx.shard, 1.0 / ctx.temperature
        grad = flat.new_empty(flat.shape)  # contiguous, whatever the logits' strides
        grad[:, shard.n_valid :].zero_()
        if grad_logprobs is None and grad_entropy is None or not shard.n_valid:
            return grad.zero_().view(ctx.logits_shape), None, None, None, None
        # With x = logits / T:  d logp_t / dx_j = 1[j=t] - p_j  and  dH / dx_j = -p_j (log p_j + H), so
        # d/dlogits_j = p_j (a + b log p_j) + 1[j=t] g_lp / T,  a = -(g_lp + g_H H) / T,  b = -g_H / T.
        g_lp = grad_logprobs.reshape(-1).float() if grad_logprobs is not None else torch.zeros_like(lse)
        a, b = g_lp * -inv_t, None
        if grad_entropy is not None:
            g_h = grad_entropy.reshape(-1).float()
            a, b = a - g_h * entropy * inv_t, g_h * -inv_t
        target_grad = g_lp * inv_t if grad_logprobs is not None else None
        work = _workspace(shard, flat, 2)
        for rows in shard.chunks(flat.shape[0]):
            _logprob_entropy_grad_chunk(
                shard, shard.real(flat, rows), flat_targets[rows], inv_t, lse[rows], a[rows],
                _rows(b, rows), _rows(target_grad, rows), grad[rows, : shard.n_valid], work,
            )
        return grad.view(ctx.logits_shape), None, None, None, None


def token_logprobs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    tp_group: dist.ProcessGroup | None = None,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of each target token and the entropy of the full next-token distribution, under softmax(logits / T).

    logits: this rank's vocab shard [batch, seq, Vp/tp] (the full [.., V] when `tp_group` is None or of size 1).
    targets: [batch, seq] int64 token ids in [0, vocab_size) (global ids, identical on every TP rank).
    vocab_size: the true vocabulary size; padded columns are excluded. chunk_tokens: tokens per chunk (default:
    DEFAULT_CHUNK_BYTES of fp32 per chunk). Returns fp32 [batch, seq] log-probs and entropy (None unless
    `with_entropy`); both are differentiable w.r.t. `logits`, whose gradient arrives in the logits' dtype.
    """
    _check_inputs(logits, "logits", temperature)
    if targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal the logits shape without vocab {tuple(logits.shape[:-1])}"
        )
    if targets.numel() and (targets.min() < 0 or targets.max() >= vocab_size):
        raise ValueError(
            f"targets must be token ids in [0, vocab_size={vocab_size}), got range "
            f"[{int(targets.min())}, {int(targets.max())}] (mask ignored positions with a valid id, e.g. pad)"
        )
    shard = _Shard(logits, tp_group, vocab_size, chunk_tokens)
    return _TokenLogprobEntropy.apply(logits, targets, shard, float(temperature), with_entropy)


def _target_logits(shard, flat_t, flat_r, rows, lam, inv_t, buf) -> torch.Tensor:
    """fp32 u = lam * teacher/T + (1 - lam) * ref/T into `buf`, so that the target is q = softmax(u): the per-model
    log-normalisers are constant along the vocabulary and drop out of softmax(lam z_T + (1 - lam) z_ref)."""
    u = _scaled(shard.real(flat_t, rows), lam * inv_t, buf)
    return u if flat_r is None else u.add_(shard.real(flat_r, rows), alpha=(1.0 - lam) * inv_t)


def _kl_chunk(shard: _Shard, flat_s, flat_t, flat_r, rows: slice, lam: float, inv_t: float, work):
    """(KL, lse of x, lse of u) of one chunk's tokens; x = student / T, q = softmax(u) is the target."""
    raw, u = shard.real(flat_s, rows), _target_logits(shard, flat_t, flat_r, rows, lam, inv_t, work[0])
    m_s, m_u = shard.global_max(shard.row_max(raw) * inv_t, shard.row_max(u))
    # Max-shifted x and u: smaller magnitudes, less cancellation in the KL sum.
    x = _scaled_minus(raw, inv_t, m_s, work[1])
    u = u.sub_(m_u.unsqueeze(-1))
    exps = work[2][: raw.shape[0]]
    sum_u = torch.exp(u, out=exps).sum(-1)
    exp_s = torch.exp(x, out=exps)
    diff = x.sub_(u)
    dot = torch.bmm(exp_s.unsqueeze(1), diff.unsqueeze(-1)).view(-1)  # sum_j e_j (x_j - u_j), no temporary
    sum_s, sum_u, dot = shard.global_sum(torch.stack([exp_s.sum(-1), sum_u, dot], -1)).unbind(-1)
    log_z_s, log_z_u = sum_s.log(), sum_u.log()
    # KL(p || q) = sum_j p_j (x_j - u_j) - log Z_x + log Z_u, where log q = u - lse(u).
    return dot / sum_s - log_z_s + log_z_u, m_s + log_z_s, m_u + log_z_u


def _kl_grad_chunk(
    shard: _Shard, flat_s, flat_t, flat_r, rows: slice, lam: float, inv_t: float, lse_s, offset, g, out, work
) -> None:
    """Writes g p_j (x_j - u_j - offset) into `out`, with offset = lse(x) - lse(u) + KL."""
    raw = shard.real(flat_s, rows)
    p = _scaled_minus(raw, inv_t, lse_s, work[0]).exp_()
    u = _target_logits(shard, flat_t, flat_r, rows, lam, inv_t, work[2])
    log_ratio = _scaled_minus(raw, inv_t, offset, work[1]).sub_(u)
    log_ratio.mul_(g.unsqueeze(-1))
    torch.mul(p, log_ratio, out=out)


class _FullVocabGopdKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, ref, shard: _Shard, lam: float, temperature: float):
        flat_s, flat_t = _flatten(student), _flatten(teacher)
        flat_r = _flatten(ref) if ref is not None else None
        n, inv_t = flat_s.shape[0], 1.0 / temperature
        kl = flat_s.new_empty(n, dtype=torch.float32)
        lse_s, lse_u = torch.empty_like(kl), torch.empty_like(kl)
        work = _workspace(shard, flat_s, 3)
        for rows in shard.chunks(n):
            kl[rows], lse_s[rows], lse_u[rows] = _kl_chunk(shard, flat_s, flat_t, flat_r, rows, lam, inv_t, work)
        ctx.shard, ctx.lam, ctx.temperature, ctx.shape = shard, lam, temperature, student.shape
        ctx.has_ref = ref is not None
        ctx.save_for_backward(flat_s, flat_t, flat_r if ref is not None else kl.new_empty(0), lse_s, lse_u, kl)
        return kl.view(student.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_kl):
        flat_s, flat_t, flat_r, lse_s, lse_u, kl = ctx.saved_tensors
        shard, inv_t = ctx.shard, 1.0 / ctx.temperature
        flat_r = flat_r if ctx.has_ref else None
        grad = flat_s.new_empty(flat_s.shape)
        grad[:, shard.n_valid :].zero_()
        g = grad_kl.reshape(-1).float() * inv_t
        # dKL/dx_j = p_j (log p_j - log q_j - KL) = p_j (x_j - u_j + lse(u) - lse(x) - KL).
        offset = lse_s - lse_u + kl
        work = _workspace(shard, flat_s, 3)
        for rows in shard.chunks(flat_s.shape[0]) if shard.n_valid else ():
            _kl_grad_chunk(
                shard, flat_s, flat_t, flat_r, rows, ctx.lam, inv_t, lse_s[rows], offset[rows], g[rows],
                grad[rows, : shard.n_valid], work,
            )
        return grad.view(ctx.shape), None, None, None, None, None


def full_vocab_gopd_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    ref_logits: torch.Tensor | None,
    lam: float,
    tp_group: dist.ProcessGroup | None = None,
    *,
    vocab_size: int,
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Exact per-token KL(pi_theta || pi_lam): pi_lam = softmax(lam * z_T + (1 - lam) * z_ref), z = log_softmax(logits/T).

    All three logits are shards on the same vocabulary partition ([batch, seq, Vp/tp], same shape). pi_lam is the
    G-OPD optimum, so minimising this per token reaches the same fixed point as the sampled-token estimator, with
    no sampling variance. `ref_logits` may be None only when lam == 1 (then the target is the teacher itself).
    Returns fp32 [batch, seq], differentiable w.r.t. `student_logits` only.
    """
    _check_inputs(student_logits, "student_logits", temperature)
    if ref_logits is None and lam != 1.0:
        raise ValueError(f"ref_logits is None but lam={lam}: the reference only cancels at lam == 1")
    for name, other in (("teacher_logits", teacher_logits), ("ref_logits", ref_logits)):
        if other is not None and other.shape != student_logits.shape:
            raise ValueError(f"{name} shape {tuple(other.shape)} != student_logits shape {tuple(student_logits.shape)}")
    shard = _Shard(student_logits, tp_group, vocab_size, chunk_tokens)
    return _FullVocabGopdKL.apply(
        student_logits, teacher_logits.detach(), ref_logits.detach() if ref_logits is not None else None,
        shard, float(lam), float(temperature),
    )
