"""Verifiers: did a response get the reference answer? One uniform call, `verifier(response, reference)`.

- "math":  the last \\boxed{...} (or a final-answer line) checked against the reference with math-verify.
- "code":  the last ```python block run against unit tests in the sandbox (see sandbox.py).
- "exact": the final answer equal to the reference after whitespace normalisation (toy domains).
- "number": the final answer, else the response's last number, equal to the reference as a number (short
           arithmetic answers such as "7 * 8 = 56", which say no "answer").

A bad response is never an exception: it is `VerifyResult(False, reason)`. A missing or ill-typed reference (the
data's fault) raises; a reference math-verify cannot parse gives False with that reason.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.pool
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import math_verify

from megatron_gopd.eval.sandbox import SandboxLimits, run_python


@dataclass(frozen=True)
class VerifyResult:
    correct: bool
    reason: str  # why: "correct", "no final answer found", "exit code 1: AssertionError", ...


Verifier = Callable[[str, Any], VerifyResult]


# ---------------------------------------------------------------- answer extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "#### 42" (GSM8K), "Answer: 42", "The answer is 42", "**Final Answer:** 42"; the rest of that line is the answer.
_ANSWER_LINE = re.compile(r"(?:^[ \t]*####|\banswer\**[ \t]*(?:is\b[ \t]*:?|[:：]))[ \t]*\**[ \t]*(.*)$",
                          re.IGNORECASE | re.MULTILINE)
_MATH_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent or cut off.
    Regex cannot match nested braces, hence the hand scan. In \\boxed{\\boxed{5}} the last one is the inner: "5"."""
    starts = list(_BOXED.finditer(text))
    if not starts:
        return None
    begin = starts[-1].end()
    depth = 1
    for i in range(begin, len(text)):
        if text[i] == "{" and text[i - 1] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[begin:i].strip()
    return None


def final_answer(response: str) -> str | None:
    """The last \\boxed{} content, else the text after the last answer marker (see _ANSWER_LINE), else None."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    lines = [m.group(1) for m in _ANSWER_LINE.finditer(response)]
    if not lines:
        return None
    # Drop a sentence's full stop and markdown bold around the answer.
    return lines[-1].strip().rstrip(".").strip().strip("*").strip() or None


# ---------------------------------------------------------------- math

def verify_math(response: str, answer: Any, *, timeout_s: int = 5) -> VerifyResult:
    """The response's final answer (last \\boxed{} or answer line) equals `answer` according to math-verify.

    math-verify's own timeout uses SIGALRM, which only works in the main thread (elsewhere it raises ValueError).
    From the main thread it runs here with that timeout; from any other thread it runs in a spawned worker
    process (in that process's main thread), which is killed if it outlives a hard limit."""
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise ValueError(f"math reference answer must be a non-empty string or number, got {answer!r}")
    predicted = final_answer(response)
    if predicted is None:
        return VerifyResult(False, "no final answer found (no \\boxed{} and no answer line)")
    if threading.current_thread() is threading.main_thread():
        return math_equal(str(answer), predicted, timeout_s)
    return _MATH_WORKERS.call(math_equal, (str(answer), predicted, timeout_s), hard_timeout_s=6 * timeout_s + 10)


def math_equal(gold: str, predicted: str, timeout_s: int = 5) -> VerifyResult:
    """math-verify on two bare answers. Both are parsed the same way, as the content of a \\boxed{}, so that plain
    text ("1/2", "sqrt(2)") and LaTeX ("\\frac{1}{2}", "[1, 2)") both parse. Main thread only (SIGALRM timeouts)."""
    try:
        gold_parsed = math_verify.parse(_as_boxed(gold), parsing_timeout=timeout_s)
        if not gold_parsed:
            return VerifyResult(False, f"math-verify could not parse the reference answer {gold!r}")
        predicted_parsed = math_verify.parse(_as_boxed(predicted), parsing_timeout=timeout_s)
        if not predicted_parsed:
            return VerifyResult(False, f"math-verify could not parse the answer {predicted[:200]!r}")
        if math_verify.verify(gold_parsed, predicted_parsed, timeout_seconds=timeout_s):
            return VerifyResult(True, "correct")
        return VerifyResult(False, f"answer {predicted[:200]!r} does not match {gold[:200]!r}")
    except Exception as error:  # math-verify catches most of its own errors; this is the last line of defence
        return VerifyResult(False, f"math-verify failed: {type(error).__name__}: {str(error)[:200]}")


def _as_boxed(answer: str) -> str:
    answer = answer.strip()
    for left, right in _MATH_DELIMITERS:
        if len(answer) > len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left):-len(right)].strip()
            break
    return "\\boxed{" + answer + "}"


class _WorkerPool:
    """A lazily started pool of spawned processes for work that must run in a main thread. A task outliving its
    hard limit (e.g. stuck in C code, where SIGALRM cannot interrupt it) gets the pool terminated and restarted;
    tasks of other threads still in flight on that pool then time out too. Spawned workers import the caller's
    main module, so a script that verifies math from threads needs an `if __name__ == "__main__":` guard."""

    def __init__(self, processes: int):
        self._processes = processes
        self._lock = threading.Lock()
        self._pool: multiprocessing.pool.Pool | None = None

    def call(self, fn: Callable[..., VerifyResult], args: tuple, *, hard_timeout_s: float) -> VerifyResult:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: forking a process that runs threads (the trainer) can deadlock the child.
                self._pool = multiprocessing.get_context("spawn").Pool(self._processes)
            pool = self._pool
        try:
            return pool.apply_async(fn, args).get(timeout=hard_timeout_s)
        except multiprocessing.TimeoutError:
            self._discard(pool)
            return VerifyResult(False, f"timed out after {hard_timeout_s:.0f}s in a worker process (restarted)")
        except ValueError:  # "Pool not running": another thread terminated it under us
            return VerifyResult(False, "worker pool was restarted by a timeout in another thread")

    def _discard(self, pool: multiprocessing.pool.Pool) -> None:
        with self._lock:
            if self._pool is pool:
                self._pool = None
        pool.terminate()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()


_MATH_WORKERS = _WorkerPool(processes=2)
atexit.register(_MATH_WORKERS.close)


# ---------------------------------------------------------------- code

@dataclass(frozen=True)
class CodeTests:
    """Unit tests for a code response: `test` is either HumanEval-style source defining `check(candidate)`
    (then `entry_point` names the function under test) or plain assert statements (then `entry_point` is None)."""

    test: str
    entry_point: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.test, str) or not self.test.strip():
            raise ValueError(f"code tests must be non-empty source, got {self.test!r}")
        if self.entry_point is not None and not self.entry_point.isidentifier():
            raise ValueError(f"entry_point must be a Python identifier, got {self.entry_point!r}")

    @classmethod
    def from_reference(cls, reference: Any) -> CodeTests:
        """Accepts a CodeTests, a mapping with "test" (+ optional "entry_point", e.g. a HumanEval problem),
        a list of assert statements, or a string of them."""
        if isinstance(reference, CodeTests):
            return reference
        if isinstance(reference, Mapping):
            if "test" not in reference:
                raise ValueError(f"code reference mapping needs a 'test' key, got keys {sorted(reference)}")
            return cls(reference["test"], reference.get("entry_point"))
        if isinstance(reference, str):
            return cls(reference)
        if isinstance(reference, Sequence) and reference and all(isinstance(t, str) for t in reference):
            return cls("\n".join(reference))
        raise ValueError("code reference must be CodeTests, a mapping with 'test', a list of assert strings or a "
                         f"string, got {type(reference).__name__}: {str(reference)[:200]!r}")

    def program(self, code: str) -> str:
        parts = [code, self.test]
        if self.entry_point is not None:
            parts.append(f"check({self.entry_point})")
        return "\n\n".join(parts) + "\n"


_FENCE = re.compile(r"```[ \t]*([\w+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}


def extract_code(response: str) -> str | None:
    """The last ```python fenced block, else the last fenced block of any language; None if there is none."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(response)]
    python = [code for tag, code in blocks if tag in _PYTHON_TAGS]
    if python:
        return python[-1]
    return blocks[-1][1] if blocks else None


def verify_code(response: str, tests: Any, *, limits: SandboxLimits | None = None) -> VerifyResult:
    """The last code block of the response passes `tests` (see CodeTests.from_reference) in the sandbox."""
    spec = CodeTests.from_reference(tests)
    code = extract_code(response)
    if code is None or not code.strip():
        return VerifyResult(False, "no fenced code block in the response")
    result = run_python(spec.program(code), limits or SandboxLimits())
    return VerifyResult(True, "passed") if result.ok else VerifyResult(False, result.failure_reason())


# ---------------------------------------------------------------- exact match

_EXACT_MARKER = re.compile(r"answer:", re.IGNORECASE)


def exact_match(response: str, answer: Any) -> VerifyResult:
    """The final answer (last \\boxed{}, else the rest of the line after the last "Answer:"; a response with
    neither counts as a bare answer) equals str(answer), both with whitespace runs collapsed and ends stripped."""
    if answer is None:
        raise ValueError("exact-match reference answer is None")
    boxed = last_boxed(response)
    markers = list(_EXACT_MARKER.finditer(response))
    if boxed is not None:
        predicted = boxed
    elif markers:
        predicted = response[markers[-1].end():].split("\n", 1)[0]
    else:
        predicted = response
    predicted, expected = " ".join(predicted.split()), " ".join(str(answer).split())
    if predicted == expected:
        return VerifyResult(True, "correct")
    return VerifyResult(False, f"answer {predicted[:200]!r} != {expected[:200]!r}")


# ---------------------------------------------------------------- last number

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def last_number(response: str, answer: Any) -> VerifyResult:
    """The last number of the final answer (last \\boxed{} or answer line) if the response gives one, else of the
    whole response, equal to float(answer); thousands separators are ignored."""
    if answer is None:
        raise ValueError("number reference answer is None")
    expected = float(answer)
    given = final_answer(response)
    numbers = _NUMBER.findall((response if given is None else given).replace(",", ""))
    if not numbers:
        return VerifyResult(False, "no number in the response")
    if float(numbers[-1]) == expected:
        return VerifyResult(True, "correct")
    return VerifyResult(False, f"answer {numbers[-1]} != {answer}")


# ---------------------------------------------------------------- registry and batches

VERIFIERS: dict[str, Verifier] = {"math": verify_math, "code": verify_code, "exact": exact_match,
                                  "number": last_number}


def get_verifier(kind: str) -> Verifier:
    if kind not in VERIFIERS:
        raise ValueError(f"unknown verifier kind {kind!r}; known kinds: {', '.join(sorted(VERIFIERS))}")
    return VERIFIERS[kind]


def verify_batch(
    kinds: str | Sequence[str],
    responses: Sequence[str],
    references: Sequence[Any],
    *,
    max_workers: int | None = None,
    code_limits: SandboxLimits | None = None,
    math_timeout_s: int = 5,
) -> list[VerifyResult]:
    """Verifies responses[i] against references[i] with verifier kinds[i] (or one kind for all).

    Code checks run concurrently on `max_workers` threads (default: the CPUs this process may use), each waiting on
    its sandboxed process; the other kinds run meanwhile in the calling thread."""
    n = len(responses)
    kinds = [kinds] * n if isinstance(kinds, str) else list(kinds)
    if len(kinds) != n or len(references) != n:
        raise ValueError(f"kinds ({len(kinds)}), responses ({n}) and references ({len(references)}) differ in length")
    verifiers = {kind: get_verifier(kind) for kind in kinds}  # fails on an unknown kind before any work starts
    options = {"code": {"limits": code_limits}, "math": {"timeout_s": math_timeout_s}}
    results: list[VerifyResult | None] = [None] * n
    with ThreadPoolExecutor(max_workers=max_workers or len(os.sched_getaffinity(0))) as pool:
        futures = {i: pool.submit(verifiers["code"], responses[i], references[i], **options["code"])
                   for i in range(n) if kinds[i] == "code"}
        for i in range(n):
            if kinds[i] != "code":
                results[i] = verifiers[kinds[i]](responses[i], references[i], **options.get(kinds[i], {}))
        for i, future in futures.items():
            results[i] = future.result()
    return results
