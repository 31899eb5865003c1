"""The CPU compatibility layer for megatron-core (0.16 - 0.19).

megatron-core assumes CUDA throughout. On a CPU-only torch build these shims let the *real* library run over
gloo: models, TP/PP schedules, DDP, the distributed optimizer and dist_checkpointing. Every shim below was shown
to be needed by switching it off, and its comment says where megatron needs it. They are applied only when CUDA is
absent, once per process, before any megatron model is built. On a GPU this module does nothing.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.overrides import TorchFunctionMode

_applied = False
_rewrite: TorchFunctionMode | None = None  # the process-wide CUDA-to-CPU rewrite, once applied


class _NoOpStream:
    """Stand-in for torch.cuda.Stream: CPU work is synchronous, so there is nothing to wait for."""

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpEvent()


class _NoOpEvent:
    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass


class _CudaFactoryToCpu(TorchFunctionMode):
    """Rewrites `device="cuda"` in tensor factories, `.cuda()` and `.to("cuda")` to the CPU.

    A few call sites hard-code CUDA, e.g. every pipeline schedule does
    `torch.zeros([], dtype=torch.int, device="cuda")` to count tokens."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        device = kwargs.get("device")
        if device is not None and "cuda" in str(device):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to and len(args) > 1 and "cuda" in str(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


def _patch_current_device():
    # megatron allocates with device=torch.cuda.current_device() in ~150 places (the global memory buffer used
    # by local attention, p2p receive buffers, DDP grad buffers, ...).
    torch.cuda.current_device = lambda: "cpu"


def _patch_rng_tracker():
    # The model-parallel RNG tracker keeps per-TP-rank CUDA generator states (dropout, weight init). Keep CPU
    # generator states instead, with the same fork semantics.
    import megatron.core.tensor_parallel.random as mrandom

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, *args, **kwargs: torch.set_rng_state(new_state)

    class CpuRngStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_ or name in self.states_:
                raise RuntimeError(f"rng state {name} (seed {seed}) already exists")
            self.seeds_.add(seed)
            saved = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)

    mrandom.CudaRNGStatesTracker = CpuRngStatesTracker
    mrandom.initialize_rng_tracker(force_reset=True)


def _patch_causal_mask():
    # The default causal mask of the local attention is created with device="cuda".
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    @functools.lru_cache(maxsize=32)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def _patch_streams():
    # DDP's grad-sync start calls torch.cuda.current_stream() unconditionally (0.19), and pipeline p2p may call
    # torch.cuda.synchronize(). The MoE all-to-all token dispatcher creates a side stream for its device-to-host
    # copies of the split sizes and waits on an event it records there.
    torch.cuda.current_stream = lambda device=None: _NoOpStream()
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.Stream = _NoOpStream


def _patch_tensor_type():
    # The optimizers and clip_grads check `param.type() == "torch.cuda.FloatTensor"` and raise TypeError on CPU
    # tensors. Report CPU tensors under the CUDA name, for the no-argument form only.
    original = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1) if ".cuda." not in name else name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type


def _patch_moe_split_sizes():
    # The MoE all-to-all dispatcher computes its per-rank split sizes as device tensors and turns them into
    # numpy arrays while copying them to the host; a CPU tensor is returned as it is, which torch's
    # all_to_all_single rejects (it takes a sequence of ints). Give CPU tensors the same numpy form.
    import megatron.core.transformer.moe.token_dispatcher as token_dispatcher

    original = token_dispatcher.maybe_move_tensor_to_cpu

    def move_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    token_dispatcher.maybe_move_tensor_to_cpu = move_to_cpu


def _patch_router_gemm_without_te():
    # megatron-core 0.16's MoE router gating tests `te_general_gemm is not None`, a name it binds only when
    # Transformer Engine imports: without TE every MoE forward raises NameError. None selects its torch.mm path.
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply_if_needed() -> bool:
    """Apply every shim when CUDA is absent (the TE-symbol one whenever TE is). Returns True when the CPU shims
    are active. Idempotent."""
    global _applied, _rewrite
    _patch_router_gemm_without_te()
    if torch.cuda.is_available():
        return False
    if not _applied:
        _patch_current_device()
        _patch_rng_tracker()
        _patch_causal_mask()
        _patch_streams()
        _patch_tensor_type()
        _patch_moe_split_sizes()
        _rewrite = _CudaFactoryToCpu()
        _rewrite.__enter__()  # stays active for the life of the process, but for plain_torch() blocks
        _applied = True
    return True


@contextlib.contextmanager
def plain_torch():
    """Runs a block without the CUDA-to-CPU rewrite, at plain torch's speed: the mode puts a Python call in front of
    every torch call, and only megatron's schedules, DDP and optimizer need it (neither the rollout engine nor the
    model's layers name CUDA). A no-op where the rewrite is not active, or not the innermost mode (modes are a stack;
    only the top one can step aside)."""
    from torch.overrides import _get_current_function_mode_stack

    stack = _get_current_function_mode_stack()
    if _rewrite is None or not stack or stack[-1] is not _rewrite:
        yield
        return
    _rewrite.__exit__(None, None, None)
    try:
        yield
    finally:
        _rewrite.__enter__()
