"""Hugging Face decoder configs (Llama, Qwen2, Qwen3 dense) -> megatron-core TransformerConfig.

All three are the same Llama-style decoder (RMSNorm, RoPE, SwiGLU, GQA); they differ only in a few switches,
which `ARCHITECTURES` lists. Everything else (the weight map, the builder, the exporter) is driven by `ModelDims`.
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


ARCHITECTURES = {
    "llama": Architecture("LlamaForCausalLM", qkv_bias_always=False, qk_norm=False),
    "qwen2": Architecture("Qwen2ForCausalLM", qkv_bias_always=True, qk_norm=False),
    "qwen3": Architecture("Qwen3ForCausalLM", qkv_bias_always=False, qk_norm=True),
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

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.model_type]

    @classmethod
    def from_hf(cls, hf_config) -> "ModelDims":
        """From a transformers PretrainedConfig, a config dict, or a directory holding config.json."""
        cfg = _as_dict(hf_config)
        model_type = cfg.get("model_type")
        if model_type not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture model_type={model_type!r}; supported: {sorted(ARCHITECTURES)} "
                f"(dense decoders: {', '.join(a.hf_class for a in ARCHITECTURES.values())})"
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
        )

    def check_parallel(self, tp: int, pp: int, divisible_by: int = 128) -> None:
        """Clear errors for parallel sizes this model cannot be split into."""
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


def padded_vocab_size(vocab_size: int, divisible_by: int = 128) -> int:
    """Pads independently of TP, so that a dist checkpoint reshards to any TP that divides the padded size."""
    return math.ceil(vocab_size / divisible_by) * divisible_by


def transformer_config(
    dims: ModelDims,
    *,
    tp: int = 1,
    pp: int = 1,
    dtype: torch.dtype = torch.float32,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
) -> TransformerConfig:
    dims.check_parallel(tp, pp)
    on_gpu = torch.cuda.is_available()
    if fp8 and not on_gpu:
        raise ValueError(f"fp8={fp8!r} needs a CUDA GPU and Transformer Engine; set fp8: null on CPU")
    return TransformerConfig(
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
        moe_token_dispatcher_type="alltoall",  # the one megatron allows with variable lengths (unused by dense)
        fp8=fp8,
        fp8_recipe=fp8_recipe,
    )
