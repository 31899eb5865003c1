"""Build one pipeline stage of a megatron-core GPTModel for a HF architecture, and fill it with HF weights."""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec, get_gpt_layer_local_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_gopd.models.architectures import ModelDims, padded_vocab_size, transformer_config
from megatron_gopd.models.attention import SDPAttention
from megatron_gopd.models.hf_io import HFWeights
from megatron_gopd.models.weights import local_to_global_name, resolved_weights, to_megatron_shard

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_engine_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


ATTENTIONS = ("auto", "sdpa", "megatron", "te")


def layer_spec(dims: ModelDims, fp8: str | None, attention: str = "auto", config=None, pp_rank: int = 0):
    """The transformer layer spec for `attention`; for a mixture of experts (`config` needed), the block spec of
    pipeline stage `pp_rank`, whose layers are dense or sparse as the config's pattern says:
    - "te": Transformer Engine's spec (its fused attention; packed rows in the THD format); needs TE and CUDA;
    - "sdpa": megatron's local spec with SDPAttention (torch's fused attention, linear memory, packed rows);
    - "megatron": megatron's local spec as it is (DotProductAttention: S x S scores, no packed rows);
    - "auto": "te" where Transformer Engine and CUDA are present, else "sdpa".
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r} is not one of {', '.join(ATTENTIONS)}")
    has_te = transformer_engine_available()
    if attention == "auto":
        attention = "te" if has_te else "sdpa"
    if attention == "te" and not has_te:
        raise ValueError("attention='te' needs Transformer Engine on a CUDA GPU, which this process does not "
                         "have; use 'sdpa'")
    if fp8 and not has_te:
        raise ValueError(f"fp8={fp8!r} needs Transformer Engine on a CUDA GPU, which this process does not have")
    if fp8 and attention != "te":
        raise ValueError(f"fp8={fp8!r} needs Transformer Engine's layers: attention 'te' or 'auto', not {attention!r}")
    if dims.is_moe:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=attention == "te", normalization="RMSNorm",
                                          pp_rank=pp_rank)
        layers = spec.layer_specs
    elif attention == "te":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=dims.qk_norm)
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=dims.qk_norm)
        layers = [spec]
    if attention == "sdpa":
        for layer in layers:
            layer.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


class RoleAmaxGroups:
    """The two questions megatron's fp8 context (fp8_utils.get_fp8_context) asks `parallel_state`, answered with
    one role's groups. parallel_state is never initialised here, so megatron would pass fp8_group=None and
    Transformer Engine would reduce its amax statistics over the WORLD, dedicated teacher ranks included, which
    never join: a hang. The group is megatron's own choice (TP x DP x CP, or TP x CP with tp_only_amax_red)."""

    def __init__(self, pgc: ProcessGroupCollection):
        self.pgc = pgc

    def model_parallel_is_initialized(self) -> bool:
        return True

    def get_amax_reduction_group(self, with_context_parallel: bool = False, tp_only_amax_red: bool = False):
        # cp is 1 in every layout here, so the groups with and without context parallelism coincide
        return self.pgc.tp_cp if tp_only_amax_red else self.pgc.tp_dp_cp


def route_fp8_amax_reduction(pgc: ProcessGroupCollection) -> None:
    """Makes megatron's fp8 context reduce amax over this role's groups (see RoleAmaxGroups)."""
    from megatron.core import fp8_utils

    fp8_utils.parallel_state = RoleAmaxGroups(pgc)  # fp8_utils reads nothing else from parallel_state


def build_model(
    dims: ModelDims,
    pgc: ProcessGroupCollection,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 1234,
    fp8: str | None = None,
    fp8_recipe: str = "delayed",
    attention: str = "auto",
    moe_aux_loss_coef: float = 0.0,
    recompute: str = "none",
) -> GPTModel:
    """This rank's pipeline stage of the model, TP-sharded over `pgc.tp` (experts over `pgc.ep`, each split
    over `pgc.expt_tp`), randomly initialised from `seed`, with the core attention that `layer_spec` picks for
    `attention` and activation recompute `recompute` (none | selective | full, see architectures.RECOMPUTE; it
    acts only in training mode)."""
    tp, pp, pp_rank = pgc.tp.size(), pgc.pp.size(), pgc.pp.rank()
    config = transformer_config(dims, tp=tp, pp=pp, ep=pgc.ep.size(), etp=pgc.expt_tp.size(), dtype=dtype, fp8=fp8,
                                fp8_recipe=fp8_recipe, moe_aux_loss_coef=moe_aux_loss_coef,
                                grouped_gemm=transformer_engine_available(), recompute=recompute)
    if fp8:
        route_fp8_amax_reduction(pgc)
    # Seeds the per-TP-rank RNG states; with CPU initialisation the full weight is drawn then sliced, so the
    # initial model is the same at every TP size.
    tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=pgc.tp.rank(), ep_rank=pgc.ep.rank(),
                                                    etp_rank=pgc.expt_tp.rank())
    torch.manual_seed(seed)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(dims, fp8, attention, config, pp_rank),
        vocab_size=padded_vocab_size(dims.vocab_size),
        max_sequence_length=dims.max_position_embeddings,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        share_embeddings_and_output_weights=dims.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(dims.rope_theta),
        pg_collection=pgc,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def layer_offset(model: GPTModel) -> int:
    return get_transformer_layer_offset(model.config, vp_stage=None, pp_rank=model.pg_collection.pp.rank())


def expert_offset(model: GPTModel) -> int:
    """Global index of this rank's first local expert (0 for a dense model)."""
    experts = model.config.num_moe_experts or 0
    return model.pg_collection.ep.rank() * experts // model.config.expert_model_parallel_size if experts else 0


def global_parameter_names(model: GPTModel) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters under the weight table's global names."""
    layers, experts = layer_offset(model), expert_offset(model)
    return {local_to_global_name(name, layers, experts): p for name, p in model.named_parameters()}


def shard_group(model: GPTModel, weight):
    """The group a table weight is tensor-split over: expert TP for experts, TP otherwise."""
    return model.pg_collection.expt_tp if weight.entry.is_expert else model.pg_collection.tp


@torch.no_grad()
def load_hf_weights(model: GPTModel, dims: ModelDims, weights: HFWeights) -> None:
    """Copies HF weights into this rank's shard of the model. Each rank reads only the tensors it needs."""
    by_global = {w.megatron: w for w in resolved_weights(dims)}
    for name, param in global_parameter_names(model).items():
        # The last pipeline stage keeps its own copy of the tied embedding.
        tied = name == "output_layer.weight" and dims.tie_word_embeddings
        weight = by_global.get("embedding.word_embeddings.weight" if tied else name)
        if weight is None:
            raise KeyError(f"megatron parameter {name} has no entry in the {dims.model_type} weight map")
        group = shard_group(model, weight)
        shard = to_megatron_shard(dims, weight, [weights[n] for n in weight.hf], group.rank(), group.size())
        if shard.shape != param.shape:
            raise ValueError(f"{name}: HF weights give shape {tuple(shard.shape)}, model has {tuple(param.shape)}")
        param.copy_(shard)
