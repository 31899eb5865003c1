"""The rollout-engine interface, shared by the transformers engine (CPU/GPU) and the SGLang engine (GPU)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal, Protocol

import torch

WeightStream = Iterable[tuple[str, torch.Tensor]]  # (HF name, full tensor), from models.export


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"sampling temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"sampling top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"sampling top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class Sample:
    """One generated response. `logprobs[i]` is the engine's log-prob of `response_ids[i]` under the
    distribution it actually sampled from (after temperature, top-k and top-p; for greedy, temperature 1)."""

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]
    meta: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        """One sample per prompt, in prompt order."""

    def generate_iter(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[int, Sample]]:
        """Every prompt's sample once, as (row index, sample), as soon as it is finished: in any order (SGLang
        submits all prompts at once), or in prompt order, chunk by chunk (the transformers engine)."""

    def sync_weights(self, weights: WeightStream) -> None: ...

    def sleep(self) -> None:
        """Release accelerator memory for training: the KV cache first, then the weights."""

    def wake_weights(self) -> None:
        """Regain memory for the weights, before a weight sync."""

    def wake_cache(self) -> None:
        """Regain the KV cache, after the weight sync and before generation."""

    def shutdown(self) -> None: ...
