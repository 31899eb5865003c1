"""A frozen model served by an SGLang server (for a teacher or reference too big for the job, e.g. an MoE):
prefill-only scoring of given token ids through `POST /generate` with `return_logprob`.

UNVERIFIED against a live server until a GPU run records it (see README). Request building and response parsing
follow sglang 0.5.x's documented format and are tested on CPU against a local stand-in server, also made to drop
connections, answer 500, answer late and answer with the wrong length. SGLang reports input log-probs at
temperature 1, so the config requires rollout.temperature == 1 with such a model.

Over a long run the network fails now and then: a connection error, a 5xx answer, a timeout or a malformed reply
is retried `retries` times with exponential backoff (0.5 s, 1 s, 2 s, ... at most 8 s), all within the client's
`timeout_s` (fewer retries when they would not fit); a 4xx answer (our request is wrong) is not. Every reply is
checked: one result per sequence and one log-prob per input token. A missing or non-finite log-prob becomes NaN,
which drops (and counts) that sample.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

import torch

BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 8.0
MIN_ATTEMPT_S = 1.0  # the shortest wait for an answer worth a retry


def build_request(rows: list[list[int]]) -> dict:
    return {
        "input_ids": rows,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": 0,
    }


def parse_response(response: list[dict] | dict, lengths: list[int]) -> list[torch.Tensor]:
    """-> each row's log-probs [its length], aligned with its tokens (entry 0, which sglang reports as null, is 0;
    any other null is NaN). Raises ValueError on a reply of the wrong shape."""
    outputs = response if isinstance(response, list) else [response]
    if len(outputs) != len(lengths):
        raise ValueError(f"sglang returned {len(outputs)} results for {len(lengths)} sequences")
    out = []
    for i, (result, length) in enumerate(zip(outputs, lengths)):
        try:
            entries = result["meta_info"]["input_token_logprobs"]
        except (KeyError, TypeError):
            raise ValueError(f"sglang result {i} has no meta_info.input_token_logprobs") from None
        if len(entries) != length:
            raise ValueError(f"sglang returned {len(entries)} input log-probs for a sequence of {length} tokens")
        out.append(torch.tensor([0.0] + [math.nan if e[0] is None else float(e[0]) for e in entries[1:]]))
    return out


def backoff_delays(retries: int) -> list[float]:
    return [min(BACKOFF_FIRST_S * 2**k, BACKOFF_MAX_S) for k in range(retries)]


class SGLangHTTPModel:
    """Scores rows of token ids on a remote SGLang server in background threads, so requests overlap the student."""

    def __init__(self, name: str, url: str, *, timeout_s: float, retries: int = 3, workers: int = 4):
        self.name, self.url, self.timeout_s, self.retries = name, url.rstrip("/"), timeout_s, retries
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"sglang-{name}")
        self.forward_calls = self.samples_scored = 0

    def score_async(self, rows: list[list[int]]) -> Future:
        """A future of each row's log-probs (see parse_response)."""
        self.forward_calls += 1
        self.samples_scored += len(rows)
        return self._pool.submit(self._post, rows)

    def _post(self, rows: list[list[int]]) -> list[torch.Tensor]:
        delays = backoff_delays(self.retries)
        # every attempt and every pause end by the deadline, timeout_s from now (the time the scorer waits for the
        # answer): an attempt gets its share of what the pauses leave, at least MIN_ATTEMPT_S when there is that
        # much time left, and a retry whose pause would leave less is not made
        share = max((self.timeout_s - sum(delays)) / (self.retries + 1), MIN_ATTEMPT_S)
        deadline = time.monotonic() + self.timeout_s
        body = json.dumps(build_request(rows)).encode()
        for attempt, delay in enumerate(delays + [None]):
            request = urllib.request.Request(f"{self.url}/generate", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=min(share, deadline - time.monotonic())) as reply:
                    return parse_response(json.loads(reply.read()), [len(r) for r in rows])
            except urllib.error.HTTPError as e:
                status = f"HTTP {e.code} {e.reason}"
                if e.code < 500:
                    raise RuntimeError(self._failed(attempt, status)) from e
            except (urllib.error.URLError, TimeoutError, OSError) as e:  # refused, reset, dropped, timed out
                status = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except ValueError as e:  # a reply that is not JSON, or of the wrong shape
                status = f"bad reply: {e}"
            if delay is None:
                raise RuntimeError(self._failed(attempt, status))
            if time.monotonic() + delay + MIN_ATTEMPT_S > deadline:
                raise RuntimeError(self._failed(attempt, f"{status}; no time left to retry within {self.timeout_s:g}s"))
            time.sleep(delay)

    def _failed(self, attempt: int, status: str) -> str:
        return f"sglang model {self.name!r} at {self.url} failed after {attempt + 1} attempt(s); last status: {status}"

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
