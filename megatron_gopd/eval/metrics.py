"""Accuracy metrics over n sampled responses per prompt: avg@n (the paper's metric) and unbiased pass@k."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples of which c are correct:
    1 - C(n-c, k) / C(n, k), evaluated as a product so that large n cannot overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_n(correct: Sequence[Sequence[bool]]) -> float:
    """Mean over prompts of each prompt's fraction of correct samples; `correct[p]` holds prompt p's n samples."""
    _check_samples(correct)
    return sum(sum(samples) / len(samples) for samples in correct) / len(correct)


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over prompts."""
    _check_samples(correct)
    return sum(pass_at_k(len(samples), sum(samples), k) for samples in correct) / len(correct)


def domain_metrics(samples: Iterable[tuple[str, str, bool]], ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Metrics per domain from (domain, prompt_id, correct) triples, one per sampled response.

    Returns "{domain}/avg@{n}" and "{domain}/pass@{k}" for each k <= n, plus "mean/..." (the unweighted mean over
    domains, as the paper averages benchmarks) when there are several domains with the same n. Every prompt of a
    domain must have the same number of samples n, otherwise avg@n would mix sample counts."""
    by_domain: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for domain, prompt_id, correct in samples:
        by_domain[domain][prompt_id].append(bool(correct))
    if not by_domain:
        raise ValueError("domain_metrics got no samples")
    metrics: dict[str, float] = {}
    sample_counts = {}
    for domain, prompts in sorted(by_domain.items()):
        counts = {len(s) for s in prompts.values()}
        if len(counts) != 1:
            raise ValueError(f"domain {domain!r}: prompts have different sample counts {sorted(counts)}")
        n = sample_counts[domain] = counts.pop()
        correct = list(prompts.values())
        metrics[f"{domain}/avg@{n}"] = avg_at_n(correct)
        for k in ks:
            if k <= n:
                metrics[f"{domain}/pass@{k}"] = mean_pass_at_k(correct, k)
    if len(by_domain) > 1 and len(set(sample_counts.values())) == 1:
        names = {name.split("/", 1)[1] for name in metrics}
        for name in sorted(names):
            metrics[f"mean/{name}"] = sum(metrics[f"{d}/{name}"] for d in by_domain) / len(by_domain)
    return metrics


def _check_samples(correct: Sequence[Sequence[bool]]) -> None:
    if not correct:
        raise ValueError("no prompts")
    empty = [i for i, samples in enumerate(correct) if not samples]
    if empty:
        raise ValueError(f"prompts without samples at indices {empty[:10]}")
