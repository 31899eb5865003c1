"""SGLang rollout engine (GPU), co-located with the student: a thin adapter over `sglang.Engine` (0.5.x).

UNVERIFIED until a GPU run records it (see README). Only `SGLangRolloutEngine` touches sglang; building requests,
parsing results and bucketing weights are plain functions tested on CPU against sglang's documented formats.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch

from megatron_gopd.rollout.base import Sample, SamplingParams, WeightStream


def sampling_params_to_sglang(params: SamplingParams) -> dict:
    if params.top_p < 1.0 or params.top_k > 0:
        # sglang reports log_softmax(logits / T) over the full vocabulary, so with top-p/top-k its log-probs
        # would not be those of the distribution it sampled from, and the importance weights would be wrong.
        raise ValueError("the sglang engine supports top_p=1 and top_k=0 only (its log-probs ignore the filters)")
    request = {
        "temperature": params.temperature,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if params.seed is not None:
        request["sampling_seed"] = params.seed
    return request


def parse_sglang_output(prompt: list[int], output: dict) -> Sample:
    """One `Engine.generate(..., return_logprob=True)` result -> Sample."""
    meta = output["meta_info"]
    ids = list(output["output_ids"])
    logprobs = [float(lp) for lp, _token, *_ in meta["output_token_logprobs"]]
    if len(logprobs) != len(ids):
        raise ValueError(f"sglang returned {len(ids)} tokens but {len(logprobs)} log-probs")
    reason = meta["finish_reason"]["type"] if isinstance(meta["finish_reason"], dict) else meta["finish_reason"]
    if reason not in ("stop", "length"):
        raise RuntimeError(f"sglang aborted a request: {meta['finish_reason']}")
    return Sample(list(prompt), ids, logprobs, reason)


def weight_buckets(weights: WeightStream, bucket_bytes: int, device) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups the exporter's (HF name, tensor) stream into device-resident buckets of about `bucket_bytes`."""
    bucket, size = [], 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.to(device, copy=True)))
        size += nbytes
    if bucket:
        yield bucket


class SGLangRolloutEngine:
    """One `sglang.Engine` on this rank's GPU, sharing it with the trainer through sglang's memory saver."""

    def __init__(self, hf_dir: str, *, dtype: str = "bfloat16", mem_fraction_static: float = 0.5, seed: int = 0,
                 bucket_bytes: int = 1 << 30):
        # Return the log-probs of the tempered distribution we sample from (env name differs across 0.5.x).
        os.environ.pop("SGLANG_RETURN_ORIGINAL_LOGPROB", None)
        os.environ.pop("RETURN_ORIGINAL_LOGPROB", None)
        import sglang

        self.device = torch.device("cuda", torch.cuda.current_device())
        self.bucket_bytes = bucket_bytes
        self.asleep = False
        self.engine = sglang.Engine(
            model_path=hf_dir,
            dtype=dtype,
            tp_size=1,
            base_gpu_id=self.device.index,
            mem_fraction_static=mem_fraction_static,
            random_seed=seed,
            skip_tokenizer_init=True,
            enable_memory_saver=True,
            load_format="dummy",  # the real weights arrive from the student through sync_weights
            log_level="error",
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        outputs = self.engine.generate(
            input_ids=prompts, sampling_params=sampling_params_to_sglang(params), return_logprob=True
        )
        return [parse_sglang_output(p, o) for p, o in zip(prompts, outputs)]

    def sync_weights(self, weights: WeightStream) -> None:
        begin = getattr(self.engine, "begin_weight_update", None)  # required from sglang 0.5.21
        if begin:
            begin()
        for bucket in weight_buckets(weights, self.bucket_bytes, self.device):
            ok, message = self.engine.update_weights_from_tensor(bucket, flush_cache=False)
            if not ok:
                raise RuntimeError(f"sglang rejected a weight update: {message}")
        end = getattr(self.engine, "end_weight_update", None)
        if end:
            end()
        self.engine.flush_cache()

    def sleep(self) -> None:
        """Releases the engine's weights and KV cache for training; a second sleep is a no-op."""
        if not self.asleep:
            self.engine.release_memory_occupation()
            self.asleep = True

    def wake(self) -> None:
        """Resumes only after a release (sglang fails on a resume of memory it still holds)."""
        if self.asleep:
            self.engine.resume_memory_occupation()
            self.asleep = False

    def shutdown(self) -> None:
        self.engine.shutdown()
