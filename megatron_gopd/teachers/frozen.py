"""Frozen models (teachers, reference): no grads, no DDP, no optimizer state; offloaded while idle on GPU."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from megatron_gopd.batching import Batching, assemble, per_row, plan
from megatron_gopd.checkpoint import load_model
from megatron_gopd.models.architectures import ModelDims, padded_vocab_size
from megatron_gopd.models.builder import DTYPES, build_model
from megatron_gopd.models.parallel_model import ParallelModel
from megatron_gopd.runtime.layout import RoleGroups


class FrozenModel(ParallelModel):
    def __init__(self, name: str, path: str, groups: RoleGroups, *, dtype: str = "fp32",
                 batching: Batching = Batching(max_rows=4)):
        dims = ModelDims.from_hf(Path(path) / "hf")
        gpt = build_model(dims, groups.pgc, dtype=DTYPES[dtype])
        load_model(path, gpt, group=groups.world)
        gpt.requires_grad_(False)
        gpt.eval()
        super().__init__(gpt, dims)
        self.name, self.batching = name, batching
        self.forward_calls = 0  # micro-batches scored
        self.samples_scored = 0
        self._offloaded = False
        # Parked until first used: colocated models would otherwise all sit on the GPU, beside the student, while
        # the rollout engine starts and generates the first step (memory_plan counts one at a time).
        self.offload()

    def score(self, rows: list[list[int]], temperature: float) -> list[torch.Tensor]:
        """Per-token log-probs of each row of token ids ([its length], aligned with its tokens, entry 0 is 0), as
        CPU tensors, on every rank of the model's group: all rows in as few micro-batches as the batching allows."""
        self.onload()
        micro_batches = plan([len(r) for r in rows], self.batching).micro_batches
        assembled = [assemble([rows[i] for i in mb], self.batching) for mb in micro_batches]
        self.forward_calls += len(assembled)
        self.samples_scored += len(rows)
        out: list[torch.Tensor | None] = [None] * len(rows)
        for indices, mb, lp in zip(micro_batches, assembled, self.token_logprobs(assembled, temperature=temperature)):
            for i, values in zip(indices, per_row(mb, lp)):
                out[i] = values
        return out

    def offload(self) -> None:
        """On GPU, park the weights in pinned host memory between uses (a colocated model shares the GPU)."""
        if torch.cuda.is_available() and not self._offloaded:
            for p in self.gpt.parameters():
                p.data = p.data.to("cpu", non_blocking=True).pin_memory()
            torch.cuda.synchronize()  # the asynchronous copies must land before anything reads the host copies
            self._offloaded = True

    def onload(self) -> None:
        if self._offloaded:
            for p in self.gpt.parameters():
                p.data = p.data.to(torch.cuda.current_device(), non_blocking=True)
            self._offloaded = False


def tokenizer_fingerprint(model_path: str) -> tuple[int, str]:
    """(padded vocab size, hash of the token -> id map) of a model checkpoint's tokenizer. Reads only the
    tokenizer and config.json's vocab_size, so that a teacher served by SGLang may be of an architecture this
    trainer cannot build (e.g. qwen2_moe)."""
    from transformers import AutoTokenizer

    hf_dir = Path(model_path) / "hf" if (Path(model_path) / "hf").is_dir() else Path(model_path)
    vocab = AutoTokenizer.from_pretrained(hf_dir).get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    cfg = json.loads((hf_dir / "config.json").read_text())
    vocab_size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    if not vocab_size:
        raise ValueError(f"{hf_dir / 'config.json'} has no vocab_size")
    return padded_vocab_size(vocab_size), digest


class TokenizerMismatchError(ValueError):
    pass


def check_same_tokenizer(models: dict[str, str]) -> None:
    """Teachers, reference and student must score the same token ids: same padded vocab, same token map."""
    prints = {name: tokenizer_fingerprint(path) for name, path in models.items()}
    (first, (size0, hash0)), *rest = prints.items()
    for name, (size, digest) in rest:
        if size != size0:
            raise TokenizerMismatchError(
                f"tokenizer mismatch: {name} ({models[name]}) has padded vocab size {size}, "
                f"{first} ({models[first]}) has {size0}"
            )
        if digest != hash0:
            raise TokenizerMismatchError(
                f"tokenizer mismatch: {name} ({models[name]}) and {first} ({models[first]}) map tokens to ids "
                f"differently (vocab hashes {digest} vs {hash0}); distillation needs one shared tokenizer"
            )
