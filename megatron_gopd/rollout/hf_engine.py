"""The transformers rollout engine: the default on CPU, usable on GPU.

The model is built from the student's HF config (no hub) and receives the student's weights in place from the
streaming exporter. Decoding is our own short loop over the model's KV cache rather than `generate()`: we need
the log-prob of each sampled token under the exact processed distribution it was drawn from, a per-call
generator for reproducible sampling, and none of generate()'s per-step overhead.
"""

from __future__ import annotations

import inspect
from typing import Iterator

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

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


class HFRolloutEngine:
    def __init__(self, hf_config_dir: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_batch_size: int = 64):
        config = AutoConfig.from_pretrained(hf_config_dir)
        self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self._params = hub_parameters(self.model)  # the exporter's (hub) names: per-expert views of fused MoE tensors
        # transformers renamed the KV-cache argument (past_key_values -> cache) in 5.x
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"

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

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams, generator) -> list[Sample]:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("cannot generate from an empty prompt")
        batch, longest = len(prompts), max(len(p) for p in prompts)
        # Left-pad so that every row's next token is at the last position. The mask is allocated once for the
        # whole generation and viewed, not regrown each step; without padding none is passed (causal suffices).
        input_ids = torch.zeros(batch, longest, dtype=torch.long, device=self.device)
        mask = torch.ones(batch, longest + params.max_new_tokens, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            input_ids[i, longest - len(p):] = torch.tensor(p, device=self.device)
            mask[i, : longest - len(p)] = 0
        padded = any(len(p) < longest for p in prompts)
        positions = (mask[:, :longest].cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(params.stop_token_ids or [-1], device=self.device)
        cache = DynamicCache()
        tokens, logprobs = [], []
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        step_ids, step_pos = input_ids, positions
        for step in range(params.max_new_tokens):
            attention = mask[:, : longest + step] if padded else None
            logits = self.model(input_ids=step_ids, attention_mask=attention, position_ids=step_pos, use_cache=True,
                                logits_to_keep=1, **{self._cache_arg: cache}).logits[:, -1]
            token, token_lp = sample_next(logits, params, generator)
            tokens.append(token)
            logprobs.append(token_lp)
            finished |= torch.isin(token, stop)
            if finished.all():
                break
            step_ids = token[:, None]
            step_pos = step_pos[:, -1:] + 1
        tokens = torch.stack(tokens, 1).tolist()
        logprobs = torch.stack(logprobs, 1).tolist()
        samples = []
        stop_ids = set(params.stop_token_ids)
        for prompt, row, row_lp in zip(prompts, tokens, logprobs):
            end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), None)
            samples.append(Sample(list(prompt), row[:end], row_lp[:end], "stop" if end else "length"))
        return samples

    def sleep(self) -> None:
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_weights(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)

    def wake_cache(self) -> None:
        """The KV cache is allocated per generate call."""

    def shutdown(self) -> None:
        del self.model, self._params
