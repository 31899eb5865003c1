"""Evaluation: verifiers (math, code, exact match), the code sandbox, and avg@n / pass@k metrics."""

from megatron_gopd.eval.metrics import avg_at_n, domain_metrics, mean_pass_at_k, pass_at_k
from megatron_gopd.eval.sandbox import Isolation, RunResult, SandboxLimits, detect_isolation, run_python
from megatron_gopd.eval.verifiers import (
    VERIFIERS,
    CodeTests,
    Verifier,
    VerifyResult,
    exact_match,
    extract_code,
    final_answer,
    get_verifier,
    last_number,
    verify_batch,
    verify_code,
    verify_math,
)

__all__ = [
    "VERIFIERS", "CodeTests", "Isolation", "RunResult", "SandboxLimits", "Verifier", "VerifyResult", "avg_at_n",
    "detect_isolation", "domain_metrics", "exact_match", "extract_code", "final_answer", "get_verifier",
    "last_number", "mean_pass_at_k", "pass_at_k", "run_python", "verify_batch", "verify_code", "verify_math",
]
