"""Hugging Face decoder configs (Llama, Qwen2, Qwen3 dense, Qwen3-MoE) -> megatron-core TransformerConfig.

All four are the same Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA); they differ only in a few switches,
which `ARCHITECTURES` lists. Qwen3-MoE replaces the MLP of its sparse layers with a top-k softmax router over
SwiGLU experts (no shared expert). Everything else (the weight map, the builder, the exporter) is driven by
`ModelDims`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig


@dataclass(frozen=True)
class Architecture:
    hf_class: str
    qkv_bias_always: bool  # Qwen2 has q/k/v biases whatever the config says
    qk_norm: bool  # Qwen3 normalises queries and keys per head
    moe: bool = False  # sparse layers route each token to top-k experts


ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", qkv_bias_always=False, qk_norm=False),
    "qwen2": Architecture("Qwen2ForCausalLM", qkv_bias_always=True, qk_norm=False),
    "qwen3": Architecture("Qwen3ForCausalLM", qkv_bias_always=False, qk_norm=True),
    "qwen3_moe": Architecture("Qwen3MoeForCausalLM", qkv_bias_always=False, qk_norm=True, moe=True),
}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ModelDims:
    """The architecture-defining numbers of a model, normalised across HF config versions."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    initializer_range: float = 0.02
    # Mixture of experts (0 experts: a dense model). `moe_layers` are the sparse layers' indices; the others
    # keep a dense MLP of `ffn_hidden_size`.
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_topk: int = 0
    norm_topk_prob: bool = False  # renormalise the top-k probabilities to sum to 1
    moe_layers: tuple[int, ...] = ()

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.model_type]

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_hf(cls, hf_config) -> "ModelDims":
        """From a transformers PretrainedConfig, a config dict, or a directory holding config.json."""
        cfg = _as_dict(hf_config)
        model_type = cfg.get("model_type")
        if model_type not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture model_type={model_type!r}; supported: {sorted(ARCHITECTURES)} "
                f"(decoders: {', '.join(a.hf_class for a in ARCHITECTURES.values())})"
            )
        arch = ARCHITECTURES[model_type]
        if cfg.get("mlp_bias"):
            raise UnsupportedModelError(f"{model_type}: mlp_bias=True is not supported")
        if cfg.get("attention_bias") and not arch.qkv_bias_always:
            raise UnsupportedModelError(
                f"{model_type}: attention_bias=True (a bias on o_proj too) is not supported; only Qwen2-style "
                "q/k/v biases are"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{model_type}: hidden_act={cfg['hidden_act']!r}, only 'silu' is supported")
        rope = cfg.get("rope_parameters") or {}
        if (cfg.get("rope_scaling") or rope).get("rope_type", "default") not in ("default", None):
            raise UnsupportedModelError(f"{model_type}: rope scaling {cfg.get('rope_scaling') or rope} is not supported")
        if cfg.get("use_sliding_window"):
            raise UnsupportedModelError(f"{model_type}: sliding-window attention is not supported")
        heads = cfg["num_attention_heads"]
        moe = _moe_fields(cfg) if arch.moe else {}
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            ffn_hidden_size=cfg["intermediate_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch.qkv_bias_always,
            qk_norm=arch.qk_norm,
            initializer_range=cfg.get("initializer_range", 0.02),
            **moe,
        )

    def check_parallel(self, tp: int, pp: int, ep: int = 1, etp: int | None = None, divisible_by: int = 128) -> None:
        """Clear errors for parallel sizes this model cannot be split into. `etp` (expert tensor parallel) defaults
        to `tp`."""
        if self.num_heads % tp:
            raise ValueError(f"tp={tp} does not divide num_attention_heads={self.num_heads}")
        if self.num_kv_heads % tp:
            raise ValueError(f"tp={tp} does not divide num_key_value_heads={self.num_kv_heads} (the GQA groups)")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"tp={tp} does not divide intermediate_size={self.ffn_hidden_size}")
        if self.num_layers % pp:
            raise ValueError(f"pp={pp} does not divide num_hidden_layers={self.num_layers}")
        if padded_vocab_size(self.vocab_size, divisible_by) % tp:
            raise ValueError(f"tp={tp} does not divide the padded vocab size {padded_vocab_size(self.vocab_size, divisible_by)}")
        etp = tp if etp is None else etp
        if not self.is_moe:
            if ep > 1 or etp != tp:
                raise ValueError(f"ep={ep}, etp={etp}: expert parallelism needs a mixture-of-experts model, and "
                                 f"{self.model_type} has no experts")
            return
        if self.num_experts % ep:
            raise ValueError(f"ep={ep} does not divide num_experts={self.num_experts}")
        if self.moe_ffn_hidden_size % etp:
            raise ValueError(f"etp={etp} does not divide moe_intermediate_size={self.moe_ffn_hidden_size}")


def _moe_fields(cfg: dict) -> dict:
    """Qwen3-MoE's expert settings. Layer i is sparse unless listed in mlp_only_layers, and when
    (i + 1) % decoder_sparse_step == 0 (transformers' rule)."""
    experts = cfg.get("num_experts") or cfg.get("num_local_experts") or 0  # transformers 5 saves the latter
    if not experts:
        raise UnsupportedModelError(f"{cfg['model_type']}: num_experts={experts}; a mixture of experts needs >= 1")
    if cfg.get("shared_expert_intermediate_size"):
        raise UnsupportedModelError(f"{cfg['model_type']}: shared experts are not supported")
    step, dense = cfg.get("decoder_sparse_step", 1), set(cfg.get("mlp_only_layers") or [])
    return dict(
        num_experts=experts,
        moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_topk=cfg["num_experts_per_tok"],
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        moe_layers=tuple(i for i in range(cfg["num_hidden_layers"]) if i not in dense and (i + 1) % step == 0),
    )


def _as_dict(hf_config) -> dict:
    if isinstance(hf_config, dict):
        return hf_config
    if isinstance(hf_config, (str, Path)):
        path = Path(hf_config)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no HF config.json at {path}")
        return json.loads(path.read_text())
    return hf_config.to_dict()


# train.recompute -> megatron-core's activation recompute settings. selective: megatron's default module, the core
# attention (its inputs are kept, its internals recomputed: the S x S scores of attention 'megatron'; torch's fused
# attention keeps next to nothing of its own). full: every layer keeps only its input and is recomputed in the
# backward, one layer at a time (the uniform method over units of one layer).
RECOMPUTE = {
    "none": {},
    "selective": dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    "full": dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
}


def padded_vocab_size(vocab_size: int, divisible_by: int = 128) -> int:
    """Pads independently of TP, so that a dist checkpoint reshards to any TP that divides the padded size."""
    return math.ceil(vocab_size / divisible_by) * divisible_by


def transformer_config(
    dims: ModelDims,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    dtype: torch.dtype = torch.float32,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    moe_aux_loss_coef: float = 0.0,
    grouped_gemm: bool = False,
    recompute: str = "none",
) -> TransformerConfig:
    """`ep`/`etp` and the MoE arguments act on mixture-of-experts models only; a dense model built in an
    expert-parallel layout (a colocated teacher) leaves the expert groups unused."""
    if not dims.is_moe:
        ep, etp = 1, tp
    dims.check_parallel(tp, pp, ep, etp)
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute={recompute!r} is not one of {', '.join(RECOMPUTE)}")
    on_gpu = torch.cuda.is_available()
    if fp8 and not on_gpu:
        raise ValueError(f"fp8={fp8!r} needs a CUDA GPU and Transformer Engine; set fp8: null on CPU")
    return TransformerConfig(
        **(_moe_config(dims, ep, etp, moe_aux_loss_coef, grouped_gemm) if dims.is_moe else {}),
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        num_attention_heads=dims.num_heads,
        num_query_groups=dims.num_kv_heads,
        kv_channels=dims.head_dim,
        ffn_hidden_size=dims.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=dims.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=dims.qkv_bias,
        qk_layernorm=dims.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=dims.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Fusions need CUDA kernels (or apex); the unfused paths compute the same function.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=not on_gpu,
        batch_p2p_sync=on_gpu,  # after batch_isend_irecv megatron calls torch.cuda.synchronize()
        # Micro-batches of one schedule differ in shape (a teacher scores only its domain's rows; rows are padded
        # per micro-batch), so pipeline stages exchange each activation's shape before the activation.
        variable_seq_lengths=pp > 1,
        # all_to_all_single with uneven splits (NCCL and gloo alike), and the one dispatcher megatron allows with
        # variable lengths; unused by dense models
        moe_token_dispatcher_type="alltoall",
        fp8=fp8,
        fp8_recipe=fp8_recipe,
        **RECOMPUTE[recompute],
    )


def _moe_config(dims: ModelDims, ep: int, etp: int | None, aux_loss_coef: float, grouped_gemm: bool) -> dict:
    return dict(
        num_moe_experts=dims.num_experts,
        moe_ffn_hidden_size=dims.moe_ffn_hidden_size,
        moe_layer_freq=[int(i in dims.moe_layers) for i in range(dims.num_layers)],
        moe_router_topk=dims.moe_topk,
        moe_router_score_function="softmax",
        # HF takes the softmax over all experts, then the top k (renormalised when norm_topk_prob); megatron's
        # softmax over the top-k logits alone is that renormalised distribution.
        moe_router_pre_softmax=not dims.norm_topk_prob,
        # The switch-transformer loss of each sparse layer, summed over layers and weighted by the coefficient;
        # off (0) by default: distillation follows the teacher, not a load target.
        moe_router_load_balancing_type="aux_loss" if aux_loss_coef > 0 else "none",
        moe_aux_loss_coeff=aux_loss_coef,
        moe_grouped_gemm=grouped_gemm,  # Transformer Engine's grouped GEMM; per-expert MLPs otherwise
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
