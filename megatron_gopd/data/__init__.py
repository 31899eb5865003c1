"""Prompt datasets through `datasets`, chat templates, domains, and deterministic DP sampling."""

from megatron_gopd.data.prompts import (
    BAD_ROW_REASONS,
    BadRowError,
    DataReport,
    PromptDataset,
    PromptItem,
    PromptSampler,
    UnknownDomainError,
    encode_prompts,
    load_prompts,
    plain_template,
    write_jsonl,
)

__all__ = [
    "BAD_ROW_REASONS",
    "BadRowError",
    "DataReport",
    "PromptDataset",
    "PromptItem",
    "PromptSampler",
    "UnknownDomainError",
    "encode_prompts",
    "load_prompts",
    "plain_template",
    "write_jsonl",
]
