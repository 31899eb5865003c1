"""A frozen model served by an SGLang server (for a teacher or reference too big for the job, e.g. an MoE):
prefill-only scoring of given token ids through `POST /generate` with `return_logprob`.

UNVERIFIED against a live server until a GPU run records it (see README). Request building and response parsing
follow sglang 0.5.x's documented format and are tested on CPU against a local stand-in server. SGLang reports input
log-probs at temperature 1, so the config requires rollout.temperature == 1 with such a model.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

import torch


def build_request(rows: list[list[int]]) -> dict:
    return {
        "input_ids": rows,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": 0,
    }


def parse_response(response: list[dict] | dict, lengths: list[int], seq: int) -> torch.Tensor:
    """-> [rows, seq] log-probs aligned with the tokens (entry 0, which sglang reports as null, is 0)."""
    outputs = response if isinstance(response, list) else [response]
    if len(outputs) != len(lengths):
        raise ValueError(f"sglang returned {len(outputs)} results for {len(lengths)} sequences")
    out = torch.zeros(len(lengths), seq)
    for i, (result, length) in enumerate(zip(outputs, lengths)):
        entries = result["meta_info"]["input_token_logprobs"]
        if len(entries) != length:
            raise ValueError(f"sglang returned {len(entries)} input log-probs for a sequence of {length} tokens")
        values = [0.0 if e[0] is None else float(e[0]) for e in entries]
        out[i, :length] = torch.tensor(values)
    return out


class SGLangHTTPModel:
    """Scores micro-batches on a remote SGLang server in background threads, so requests overlap the student."""

    def __init__(self, name: str, url: str, *, timeout_s: float, workers: int = 4):
        self.name, self.url, self.timeout_s = name, url.rstrip("/"), timeout_s
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"sglang-{name}")
        self.forward_calls = self.samples_scored = 0

    def score_async(self, tokens: torch.Tensor, lengths: list[int]) -> Future:
        rows = [tokens[i, :n].tolist() for i, n in enumerate(lengths)]
        self.forward_calls += 1
        self.samples_scored += len(rows)
        return self._pool.submit(self._post, rows, lengths, tokens.shape[1])

    def _post(self, rows: list[list[int]], lengths: list[int], seq: int) -> torch.Tensor:
        request = urllib.request.Request(
            f"{self.url}/generate", data=json.dumps(build_request(rows)).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                return parse_response(json.loads(reply.read()), lengths, seq)
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise RuntimeError(f"sglang model {self.name!r} at {self.url} failed: {e}") from e

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
