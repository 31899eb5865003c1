"""avg@n / pass@k evaluation of a rollout engine on held-out prompts, per domain (trainer and tools/evaluate.py)."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import defaultdict
from pathlib import PurePosixPath
from typing import Callable

from megatron_gopd.data.prompts import PromptItem
from megatron_gopd.eval.metrics import domain_metrics
from megatron_gopd.eval.verifiers import CodeTests, VerifyResult, verify_batch
from megatron_gopd.rollout.base import Sample, SamplingParams


def verifier_kind(item: PromptItem) -> str:
    """A row's `verifier` column if it has one; else unit tests -> code, the math domain -> math, else exact."""
    if item.extra.get("verifier"):
        return item.extra["verifier"]
    if item.tests is not None:
        return "code"
    return "math" if item.domain == "math" else "exact"


def reference_of(item: PromptItem):
    if verifier_kind(item) != "code":
        return item.answer
    tests = item.tests
    if isinstance(tests, dict) and "test" in tests:
        return CodeTests(tests["test"], tests.get("entry_point"))
    return tests


def verify_items(items: list[PromptItem], texts: list[str]) -> list[VerifyResult]:
    """Each item's verifier on its response text (code runs sandboxed)."""
    return verify_batch([verifier_kind(i) for i in items], texts, [reference_of(i) for i in items])


def generate_and_verify(
    generate: Callable[[list[list[int]], SamplingParams], list[Sample]],
    items: list[PromptItem],
    decode: Callable[[list[int]], str],
    *,
    n: int,
    params: SamplingParams,
) -> list[dict]:
    """n samples per item; one record per sample: uid, domain, correct, response length, text and token ids."""
    prompts = [item.prompt_ids for item in items for _ in range(n)]
    samples = generate(prompts, params)
    expanded = [item for item in items for _ in range(n)]
    texts = [decode(s.response_ids) for s in samples]
    results = verify_items(expanded, texts)
    return [
        {"uid": item.uid, "domain": item.domain, "correct": r.correct, "length": len(s.response_ids),
         "finish": s.finish_reason, "response": text, "response_ids": s.response_ids}
        for item, s, text, r in zip(expanded, samples, texts, results)
    ]


def dataset_of(uid: str) -> str:
    """The data file's stem of a PromptItem uid ("path:line" or "path#row")."""
    return PurePosixPath(re.sub(r"(:\d+|#\d+)$", "", uid)).stem


def summarize(records: list[dict], ks=(1,)) -> dict[str, float]:
    """avg@n and pass@k per domain and their mean, plus mean response length and truncation rate per domain;
    and avg@n and pass@k per data file, as "dataset/<file stem>/...". Records with a "reverse_kl" (the sum over
    their response tokens, evaluate_hf_model's teacher) add its per-token mean per domain, "{domain}/reverse_kl"."""
    metrics = domain_metrics(((r["domain"], r["uid"], r["correct"]) for r in records), ks=ks)
    files = {dataset_of(r["uid"]) for r in records}
    per_file = domain_metrics(((dataset_of(r["uid"]), r["uid"], r["correct"]) for r in records), ks=ks)
    metrics.update({f"dataset/{k}": v for k, v in per_file.items() if k.split("/")[0] in files})  # not "mean/"
    lengths, truncated, kl = defaultdict(list), defaultdict(list), defaultdict(float)
    has_kl = any("reverse_kl" in r for r in records)
    for r in records:
        lengths[r["domain"]].append(r["length"])
        truncated[r["domain"]].append(r["finish"] == "length")
        kl[r["domain"]] += r.get("reverse_kl", 0.0)
    for domain in lengths:
        metrics[f"{domain}/response_length"] = sum(lengths[domain]) / len(lengths[domain])
        metrics[f"{domain}/truncated_frac"] = sum(truncated[domain]) / len(truncated[domain])
        if has_kl:
            metrics[f"{domain}/reverse_kl"] = kl[domain] / max(sum(lengths[domain]), 1)
    return metrics


def evaluate_hf_model(model_dir, data, *, n, ks=(1,), temperature=1.0, max_new_tokens=512, max_prompts=None,
                   max_prompt_len=2048, batch_size=64, seeds=(0,), teacher_dir=None) -> list[tuple[dict, list[dict]]]:
    """Loads a HF model directory into the transformers engine once and evaluates it on prompt files, once per
    sampling seed: (metrics, records) per seed. With `teacher_dir` (a HF model over the same vocabulary) each
    record also gets "reverse_kl", the sum over its response tokens of the exact KL(model || teacher)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gopd.data.prompts import load_prompts
    from megatron_gopd.eval.divergence import response_reverse_kl
    from megatron_gopd.rollout.hf_engine import HFRolloutEngine

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_prompts(data, tokenizer, max_prompt_len=max_prompt_len, split="test")
    items = dataset.take(range(min(len(dataset), max_prompts or len(dataset))))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = HFRolloutEngine.from_pretrained(str(model_dir), device=device, max_batch_size=batch_size)
    params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                            stop_token_ids=(tokenizer.eos_token_id,))
    decode = functools.partial(tokenizer.decode, skip_special_tokens=True)
    teacher = None if teacher_dir is None else AutoModelForCausalLM.from_pretrained(teacher_dir).to(device).eval()
    prompt_of = {item.uid: item.prompt_ids for item in items}
    results = []
    for seed in seeds:
        records = generate_and_verify(engine.generate, items, decode, n=n, params=dataclasses.replace(params, seed=seed))
        if teacher is not None:
            rows = [(prompt_of[r["uid"]], r["response_ids"]) for r in records]
            for record, kl in zip(records, response_reverse_kl(engine.model, teacher, rows)):
                record["reverse_kl"] = kl
        results.append((summarize(records, ks=ks), records))
    return results
