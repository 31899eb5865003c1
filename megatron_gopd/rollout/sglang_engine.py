"""SGLang rollout engine (GPU), co-located with the student: a thin adapter over `sglang.Engine` (>= 0.5.3).

UNVERIFIED until a GPU run records it (see README). Only `SGLangRolloutEngine.__init__` and the serializer touch
sglang; requests, results, seeds, the torchrun environment, memory stages and the weight hand-off are plain code,
tested on CPU against stand-ins that check sglang's formats (read from the 0.5.3 and 0.5.23 sources).

Weights reach the engine as sglang's "flattened_bucket" format: per bucket and dtype, one flat tensor plus the
(name, shape, dtype, start, end, numel) of each weight in it, element offsets. sglang 0.5.3 rebuilds a weight as
`flat[start:end].reshape(shape)`, 0.5.23 as `flat[start:end].view(dtype).reshape(shape)`; one dtype per flat tensor
with element offsets reads the same under both. An engine spanning the replica's TP ranks gets one payload per
engine rank: trainer TP rank i flattens the bucket on its own GPU and hands CUDA IPC handles to engine rank i
(which runs on that GPU), and the replica's leader passes the payloads to sglang in engine-rank order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from megatron_gopd.rollout.base import Sample, SamplingParams, WeightStream

MIN_SGLANG = "0.5.3"  # the first with SamplingParams.sampling_seed (always sent) and the flattened-bucket loader

# Variables torchrun sets for the trainer. sglang's scheduler processes inherit the environment and call
# init_process_group(init_method="tcp://127.0.0.1:<port>"); with TORCHELASTIC_USE_AGENT_STORE=True torch would
# then build a client-only store waiting on an agent that does not exist, and the start times out.
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCH_NCCL_ASYNC_ERROR_HANDLING")


@contextlib.contextmanager
def torchrun_env_cleared() -> Iterator[None]:
    """Removes torchrun's variables (and every TORCHELASTIC_*) for the block; restores them after."""
    names = [n for n in os.environ if n in TORCHRUN_ENV or n.startswith("TORCHELASTIC_")]
    saved = {n: os.environ.pop(n) for n in names}
    try:
        yield
    finally:
        os.environ.update(saved)


def check_sglang_version(version: str) -> None:
    from packaging.version import Version

    if Version(version) < Version(MIN_SGLANG):
        raise RuntimeError(f"sglang {version} is too old for the rollout engine: it needs >= {MIN_SGLANG} "
                           "(SamplingParams.sampling_seed, the flattened-bucket weight loader); "
                           'pip install -e ".[gpu]"')


def row_seed(seed: int, row: int) -> int:
    """The sampling seed of one row: distinct per row, so that duplicate prompts (a GRPO group) sample
    differently under deterministic inference. sglang keeps seeds in an int32 tensor, hence 31 bits."""
    return zlib.crc32(f"{seed}/{row}".encode()) & 0x7FFFFFFF


def sampling_params_to_sglang(params: SamplingParams) -> dict:
    if params.top_p < 1.0 or params.top_k > 0:
        # sglang reports log_softmax(logits / T) over the full vocabulary, so with top-p/top-k its log-probs
        # would not be those of the distribution it sampled from, and the importance weights would be wrong.
        raise ValueError("the sglang engine supports top_p=1 and top_k=0 only (its log-probs ignore the filters)")
    return {
        "temperature": params.temperature,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }


def row_requests(params: SamplingParams, rows: int) -> list[dict]:
    """One sglang sampling-params dict per row, each with its own seed (a fresh base seed when none is given)."""
    request = sampling_params_to_sglang(params)
    base = params.seed if params.seed is not None else random.getrandbits(31)
    return [{**request, "sampling_seed": row_seed(base, row)} for row in range(rows)]


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


# ---- weights ---------------------------------------------------------------------------------------------


@dataclass
class FlatTensorMeta:
    """The fields of sglang's FlattenedTensorMetadata (sglang.srt.weight_sync.tensor_bucket); on a GPU the real
    class is used, since sglang >= 0.5.2x unpickles only its own classes."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


def weight_buckets(weights: WeightStream, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Groups the exporter's (HF name, tensor) stream into buckets of about `bucket_bytes`."""
    bucket, size = [], 0
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def flatten_by_dtype(bucket: list[tuple[str, torch.Tensor]], meta_type=FlatTensorMeta) -> list[dict]:
    """A bucket as sglang's flattened-bucket payloads: one {"flattened_tensor", "metadata"} per dtype, the flat
    tensor a fresh copy on the tensors' device, the metadata in element offsets, in the bucket's order."""
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in bucket:
        by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
    payloads = []
    for dtype, named in by_dtype.items():
        metadata, start = [], 0
        for name, tensor in named:
            metadata.append(meta_type(name, tensor.shape, dtype, start, start + tensor.numel(), tensor.numel()))
            start += tensor.numel()
        flat = torch.cat([tensor.reshape(-1) for _, tensor in named])
        payloads.append({"flattened_tensor": flat, "metadata": metadata})
    return payloads


def _sglang_serializer() -> tuple[Callable[[object], str], type]:
    """sglang's own serializer (CUDA tensors travel as IPC handles, devices named by UUID) and metadata class."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    monkey_patch_torch_reductions()
    return (lambda obj: MultiprocessingSerializer.serialize(obj, output_str=True)), FlattenedTensorMetadata


class WeightHandoff:
    """The weight path into one SGLang engine, run in lockstep by every trainer rank that hosts one of its ranks.

    `group` is the replica's first-stage TP group when the engine spans it (its rank i hosts engine rank i), else
    None (the leader alone). For each bucket and dtype, every member flattens the bucket on its GPU and serialises
    it; the leader gathers the payloads in rank order and hands them to `update` (sglang's
    update_weights_from_tensor), then shares the result, so that every member keeps its flat tensor alive until
    the engine has read it and all raise together on a rejection."""

    def __init__(self, bucket_bytes: int, group: dist.ProcessGroup | None = None,
                 serializer: tuple[Callable[[object], object], type] | None = None):
        self.bucket_bytes, self.group = bucket_bytes, group
        self.serialize, self.meta_type = serializer or _sglang_serializer()
        self.leader = group is None or group.rank() == 0

    def send(self, weights: WeightStream, update: Callable[[list], tuple[bool, str]] | None) -> None:
        for bucket in weight_buckets(weights, self.bucket_bytes):
            for payload in flatten_by_dtype(bucket, self.meta_type):
                flat = payload["flattened_tensor"]
                if flat.is_cuda:  # the engine reads the handle from another process: the copy must be done
                    torch.cuda.synchronize(flat.device)
                serialized = [self.serialize(payload)]
                if self.group is not None:
                    gathered = [None] * self.group.size() if self.leader else None
                    dist.gather_object(serialized[0], gathered, dst=dist.get_global_rank(self.group, 0),
                                       group=self.group)
                    serialized = gathered
                result = [update(serialized) if self.leader else None]
                if self.group is not None:
                    dist.broadcast_object_list(result, src=dist.get_global_rank(self.group, 0), group=self.group)
                ok, message = result[0]
                if not ok:
                    raise RuntimeError(f"sglang rejected a weight update: {message}")


def _check(result, what: str) -> None:
    """begin/end_weight_update answer (ok, message); older sglang versions answer nothing."""
    if isinstance(result, tuple) and not result[0]:
        raise RuntimeError(f"sglang {what} failed: {result[1]}")


# ---- the engine ------------------------------------------------------------------------------------------


class SGLangRolloutEngine:
    """One `sglang.Engine` on the replica's GPUs, sharing them with the trainer through sglang's memory saver.

    `tp_size` engine ranks run on GPUs base_gpu_id .. base_gpu_id + tp_size - 1, the devices of the replica's
    first-stage TP ranks; with tp_size > 1 pass their `tp_group` (its other ranks run a WeightHandoff)."""

    def __init__(self, hf_dir: str, *, dtype: str = "bfloat16", mem_fraction_static: float = 0.5, seed: int = 0,
                 bucket_bytes: int = 1 << 30, tp_size: int = 1, tp_group: dist.ProcessGroup | None = None,
                 deterministic: bool = False):
        # Return the log-probs of the tempered distribution we sample from (env name differs across 0.5.x).
        os.environ.pop("SGLANG_RETURN_ORIGINAL_LOGPROB", None)
        os.environ.pop("RETURN_ORIGINAL_LOGPROB", None)
        import sglang
        from sglang.srt import constants

        check_sglang_version(sglang.__version__)
        if (tp_size > 1) != (tp_group is not None) or (tp_group is not None and tp_group.size() != tp_size):
            raise ValueError(f"an sglang engine of tp_size {tp_size} needs the TP group of that many trainer ranks")
        self.handoff = WeightHandoff(bucket_bytes, tp_group)
        self.weight_tags = [constants.GPU_MEMORY_TYPE_WEIGHTS]
        # sglang >= 0.5.2x also releases its CUDA graphs; they come back with the KV cache, after the weights
        self.cache_tags = [constants.GPU_MEMORY_TYPE_KV_CACHE] + (
            [constants.GPU_MEMORY_TYPE_CUDA_GRAPH] if hasattr(constants, "GPU_MEMORY_TYPE_CUDA_GRAPH") else [])
        self.released: set[str] = set()  # "weights", "cache"
        with torchrun_env_cleared():
            self.engine = sglang.Engine(
                model_path=hf_dir,
                dtype=dtype,
                tp_size=tp_size,
                base_gpu_id=torch.cuda.current_device(),
                mem_fraction_static=mem_fraction_static,
                random_seed=seed,
                # sampling_seed is honoured only here (batch-invariant kernels, slower): exact resumes need it
                enable_deterministic_inference=deterministic,
                skip_tokenizer_init=True,
                enable_memory_saver=True,
                load_format="dummy",  # the real weights arrive from the student through sync_weights
                log_level="error",
            )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sample]:
        samples: list[Sample | None] = [None] * len(prompts)
        for row, sample in self.generate_iter(prompts, params):
            samples[row] = sample
        return samples

    def generate_iter(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[tuple[int, Sample]]:
        """Submits every prompt at once (sglang batches them continuously) and yields (row, sample) as each
        finishes. The engine keeps generating while the caller works on a yielded sample."""
        requests = row_requests(params, len(prompts))
        loop = getattr(self.engine, "loop", None) or asyncio.get_event_loop()  # the loop sglang's client runs on

        async def one(row: int):
            return row, await self.engine.async_generate(input_ids=prompts[row], sampling_params=requests[row],
                                                         return_logprob=True)

        pending = {loop.create_task(one(row)) for row in range(len(prompts))}
        try:
            while pending:
                done, pending = loop.run_until_complete(asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED))
                for row, output in sorted(task.result() for task in done):
                    yield row, parse_sglang_output(prompts[row], output)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    def sync_weights(self, weights: WeightStream) -> None:
        begin = getattr(self.engine, "begin_weight_update", None)  # required from sglang 0.5.21
        if begin:
            _check(begin(), "begin_weight_update")

        def update(payloads: list) -> tuple[bool, str]:
            return self.engine.update_weights_from_tensor(payloads, load_format="flattened_bucket",
                                                          flush_cache=False)

        self.handoff.send(weights, update)
        end = getattr(self.engine, "end_weight_update", None)
        if end:
            _check(end(), "end_weight_update")
        self.engine.flush_cache()

    def sleep(self) -> None:
        """Releases the KV cache (and CUDA graphs), then the weights; what is already released stays so."""
        for stage, tags in (("cache", self.cache_tags), ("weights", self.weight_tags)):
            if stage not in self.released:
                self.engine.release_memory_occupation(tags=tags)
                self.released.add(stage)

    def wake_weights(self) -> None:
        """Resumes the weights only after a release (sglang fails on a resume of memory it still holds)."""
        self._resume("weights", self.weight_tags)

    def wake_cache(self) -> None:
        self._resume("cache", self.cache_tags)

    def _resume(self, stage: str, tags: list[str]) -> None:
        if stage in self.released:
            self.engine.resume_memory_occupation(tags=tags)
            self.released.discard(stage)

    def shutdown(self) -> None:
        self.engine.shutdown()
