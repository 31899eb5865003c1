"""The transformers rollout engine: the default on CPU, usable on GPU.

The model is built from the student's HF config (no hub) and receives the student's weights in place from the
streaming exporter. Decoding is our own short loop over the model's KV cache rather than `generate()`: we need
the log-prob of each sampled token under the exact processed distribution it was drawn from, a per-call
generator for reproducible sampling, and none of generate()'s per-step overhead.

With `compile=True` the decode step runs over a transformers StaticCache under `torch.compile` (the prefill stays
eager: its length varies). A compiled step serves one shape bucket (shape_bucket: batch and cache length padded to
powers of two), so that a run compiles a handful of graphs, not one per chunk; its attention
is torch's grouped-query sdpa (sdpa_grouped_decode). Compiled kernels round differently from eager ones, so the
log-probs agree with the eager engine's to float tolerance. Sampling stays eager and on the real rows only, so the
generator's stream, and the tokens, do not depend on the padding.

On the CPU a small model's compiled step spent as long in Python around its kernels as in them (bench_rollout):
inductor's C++ wrapper launches the kernels from C++, and after the first decode step of a generate call (which
evaluates dynamo's guards, and recompiles where they fail, e.g. after torch._dynamo.reset()) the steps skip them
(set_stance skip_guard_eval_unsafe): they pass what the first step's guards checked, tensors of the same shapes and
dtypes, the same model and the same cache. A bucket without a graph of its own (past dynamo's recompile limit) keeps
its guards.
"""

from __future__ import annotations

import contextlib
import inspect
import time
import warnings
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from megatron_gopd.models.hf_io import hub_parameters
from megatron_gopd.rollout.base import Sample, SamplingParams, WeightStream
from megatron_gopd.runtime.cpu_compat import plain_torch


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """log-probs [batch, vocab] of the distribution we sample from: temperature, then top-k, then top-p."""
    logits = logits.float()
    if params.temperature > 0:
        logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one token per row from the processed distribution; returns (tokens, their log-probs)."""
    if params.temperature == 0:
        lp = torch.log_softmax(logits.float(), -1)
        token = lp.argmax(-1)
    else:
        lp = processed_logprobs(logits, params)
        token = torch.multinomial(lp.exp(), 1, generator=generator).squeeze(-1)
    return token, lp.gather(-1, token[:, None]).squeeze(-1)


def sdpa_grouped_decode(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' sdpa attention, except that a one-token step with a mask (decoding over a static cache) runs
    torch's grouped-query attention in the kernel: under torch.compile transformers would repeat the keys and values
    of the whole cache for every query head, a copy of the cache per layer per token."""
    if query.shape[2] > 1 or attention_mask is None or getattr(module, "num_key_value_groups", 1) == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


GROUPED_DECODE = "sdpa_grouped_decode"
AttentionInterface.register(GROUPED_DECODE, sdpa_grouped_decode)
AttentionMaskInterface.register(GROUPED_DECODE, sdpa_mask)

MIN_CACHE = 32  # compiled decoding: the shortest static cache


def _without_guards():
    """Compiled frames run the graph their inputs last matched, without evaluating its guards (see the module's
    docstring for when that is safe); a call that would need a new graph raises RuntimeError instead."""
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def shape_bucket(batch: int, length: int, max_batch_size: int) -> tuple[int, int]:
    """The (rows, cache length) a compiled decode step runs at: the batch and the length padded to powers of two
    (rows at most max_batch_size, the cache at least MIN_CACHE). Each bucket is a graph of its own, and past dynamo's
    recompile limit (8) a step would fall back to eager: with powers of two a run's prompts, whose lengths vary
    under data.max_prompt_len, fall in one or two length buckets, at the price of attending over up to 2x the
    cache."""
    rows = min(1 << (batch - 1).bit_length(), max(batch, max_batch_size))
    return rows, max(MIN_CACHE, 1 << (length - 1).bit_length())


class HFRolloutEngine:
    def __init__(self, hf_config_dir: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_batch_size: int = 64, compile: bool = False):
        config = AutoConfig.from_pretrained(hf_config_dir)
        self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self._params = hub_parameters(self.model)  # the exporter's (hub) names: per-expert views of fused MoE tensors
        # transformers renamed the KV-cache argument (past_key_values -> cache) in 5.x
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        # The parameters are inputs of the compiled graphs (not frozen constants), so in-place weight syncs reach them.
        options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
        self._compiled_step = torch.compile(self._step, dynamic=False, options=options) if compile else None
        self._compiled_buckets: dict[tuple[int, int], bool] = {}  # shape bucket -> whether it has a graph of its own
        if compile and self.model.config._attn_implementation == "sdpa":
            self.model.set_attn_implementation(GROUPED_DECODE)
        self._static_caches: dict[tuple[int, int], StaticCache] = {}  # per shape bucket, reused call after call
        self.compile_seconds = 0.0  # wall time of the decode steps that compiled a new shape bucket

    @classmethod
    def from_pretrained(cls, hf_dir: str, **kwargs) -> "HFRolloutEngine":
        """An engine holding the weights of a HF checkpoint directory (safetensors), read tensor by tensor."""
        from megatron_gopd.models.hf_io import HFWeights

        engine = cls(hf_dir, **kwargs)
        weights = HFWeights(hf_dir)
        engine.sync_weights((name, weights[name]) for name in weights.names())
        return engine

    @torch.no_grad()
    def sync_weights(self, weights: WeightStream) -> None:
        """Copies the exported tensors into the existing parameters (no reallocation)."""
        seen = set()
        for name, tensor in weights:
            if name not in self._params:
                raise KeyError(f"weight {name!r} from the student has no counterpart in the rollout model")
            self._params[name].data.copy_(tensor)
            seen.add(name)
        missing = set(self._params) - seen
        if self.model.config.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing:
            raise KeyError(f"weight sync did not provide {sorted(missing)[:5]} ({len(missing)} tensors)")

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        return [sample for _, sample in self.generate_iter(prompts, params)]

    def generate_iter(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[int, Sample]]:
        """(row, sample) in prompt order, a batch of `max_batch_size` rows at a time (one generator per call)."""
        generator = torch.Generator(device=self.device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        for start in range(0, len(prompts), self.max_batch_size):
            with plain_torch():
                batch = self._generate_batch(prompts[start:start + self.max_batch_size], params, generator)
            yield from enumerate(batch, start)

    def _step(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """The next-token logits [rows, vocab] of the last position."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=True, logits_to_keep=1, **{self._cache_arg: cache}).logits[:, -1]

    def _static_cache(self, rows: int, length: int) -> StaticCache:
        """The bucket's cache, emptied; after a sleep a new one, which the eager prefill allocates (allocation must
        stay out of the graph)."""
        bucket = (rows, length)
        cache = self._static_caches.get(bucket)
        if cache is None:
            cache = self._static_caches[bucket] = StaticCache(config=self.model.config, max_cache_len=length)
            if bucket not in self._compiled_buckets:
                self._compiled_buckets[bucket] = self._compile_bucket(rows, length, cache)
        cache.reset()
        return cache

    def _compile_bucket(self, rows: int, length: int, cache: StaticCache) -> bool:
        """Compiles a new bucket's decode step (timed), on dummy tokens after an eager one-token prefill that
        allocates the cache. Returns whether the bucket has a graph of its own, which its decode steps then run
        without the guards."""
        ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        mask = torch.ones(rows, length, dtype=torch.long, device=self.device)
        self._step(ids, mask[:, :1], ids, cache)
        start = time.perf_counter()
        self._compiled_step(ids, mask, ids + 1, cache)
        self.compile_seconds += time.perf_counter() - start
        try:  # the same call again, without the guards: it fails only where no graph matches (an eager step)
            with _without_guards():
                self._compiled_step(ids, mask, ids + 1, cache)
            return True
        except RuntimeError:
            warnings.warn(f"rollout: the decode step of the bucket of {rows} rows x {length} cache positions has no "
                          "compiled graph (torch._dynamo.config.recompile_limit reached); it runs eagerly", stacklevel=3)
            return False

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, generator) -> list[Sample]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("cannot generate from an empty prompt")
        batch, longest = len(prompts), max(len(p) for p in prompts)
        compiled = self._compiled_step is not None
        rows, length = (shape_bucket(batch, longest + params.max_new_tokens, self.max_batch_size) if compiled
                        else (batch, longest + params.max_new_tokens))
        # Left-pad so that every row's next token is at the last position. The mask is allocated once for the
        # whole generation (eager: viewed, not regrown each step; without padding none is passed, causal suffices).
        # Rows past the batch (a compiled bucket's padding) decode a one-token prompt and are never sampled.
        input_ids = torch.zeros(rows, longest, dtype=torch.long, device=self.device)
        mask = torch.ones(rows, length, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            input_ids[i, longest - len(p):] = torch.tensor(p, device=self.device)
            mask[i, : longest - len(p)] = 0
        mask[batch:, : longest - 1] = 0
        padded = any(len(p) < longest for p in prompts)
        positions = (mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
        if compiled:  # static shapes: the whole mask every step (the cache's causal mask hides the slots ahead)
            cache, decode, attention = self._static_cache(rows, length), self._compiled_step, mask
        else:
            cache, decode, attention = DynamicCache(), self._step, None
        stop = torch.tensor(params.stop_token_ids or [-1], device=self.device)
        next_ids = torch.zeros(rows, 1, dtype=torch.long, device=self.device)
        tokens, logprobs = [], []
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        logits = self._step(input_ids, mask[:, :longest] if padded or compiled else None, positions, cache)
        guard_free = self._compiled_buckets.get((rows, length), False)
        with contextlib.ExitStack() as unguarded:
            for step in range(params.max_new_tokens):
                token, token_lp = sample_next(logits[:batch], params, generator)
                tokens.append(token)
                logprobs.append(token_lp)
                finished |= torch.isin(token, stop)
                if finished.all() or step == params.max_new_tokens - 1:
                    break
                next_ids[:batch, 0] = token
                if not compiled:
                    attention = mask[:, : longest + step + 1] if padded else None
                logits = decode(next_ids, attention, positions[:, -1:] + step + 1, cache)
                if guard_free and step == 0:  # the call's first step passed the guards; the others pass the same
                    unguarded.enter_context(_without_guards())
        tokens = torch.stack(tokens, 1).tolist()
        logprobs = torch.stack(logprobs, 1).tolist()
        samples = []
        stop_ids = set(params.stop_token_ids)
        for prompt, row, row_lp in zip(prompts, tokens, logprobs):
            end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), None)
            samples.append(Sample(list(prompt), row[:end], row_lp[:end], "stop" if end else "length"))
        return samples

    def sleep(self) -> None:
        self._static_caches.clear()  # the KV caches go first; a compiled step's graphs stay
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_weights(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)

    def wake_cache(self) -> None:
        """The KV cache is allocated per generate call (compiled: per shape bucket, at its first call)."""

    def shutdown(self) -> None:
        del self.model, self._params
