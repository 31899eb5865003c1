"""Tiny random Hugging Face models for tests, built from a config with no download."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_BASE = dict(vocab_size=250, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY_CONFIGS = {
    "llama": dict(_BASE, model_type="llama", rope_theta=10000.0),
    "qwen2": dict(_BASE, model_type="qwen2", rope_theta=1000000.0),  # q/k/v biases
    "qwen3": dict(_BASE, model_type="qwen3", head_dim=32, rope_theta=1000000.0),  # qk-norm, head_dim != h/heads
    "qwen3_tied": dict(_BASE, model_type="qwen3", head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True),
    # a 16-token vocabulary: a random policy hits a given token 1 time in 16, enough signal for RL tests
    "qwen3_vocab16": dict(_BASE, model_type="qwen3", head_dim=32, rope_theta=1000000.0, vocab_size=16),
    # Qwen3-MoE: 4 experts, top 2 renormalised; layer 1 keeps a dense MLP (mlp_only_layers)
    "qwen3_moe": dict(_BASE, model_type="qwen3_moe", head_dim=32, rope_theta=1000000.0, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True, mlp_only_layers=[1]),
    # top 2 of all experts' softmax, not renormalised; every second layer sparse (decoder_sparse_step)
    "qwen3_moe_step2": dict(_BASE, model_type="qwen3_moe", head_dim=32, rope_theta=1000000.0, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=False,
                            decoder_sparse_step=2),
}


def tiny_hf_config(name: str):
    kwargs = dict(TINY_CONFIGS[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def tiny_hf_model(name: str, seed: int = 0):
    """A random fp32 model. Every parameter, norms and biases included, is perturbed away from its default
    init, so that a wrong mapping of any tensor changes the logits."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(name), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<assistant>", "<unk>"]  # ids 0-4; words are "t5".."t{n-1}"


def tiny_tokenizer(vocab_size: int = 250):
    """A word-level tokenizer: special tokens at ids 0-4, then words "t5".."t{n-1}" at their own ids, and a chat
    template; no download. (Special tokens must not be prefixes of words: transformers splits added tokens out of
    any text that contains them.)"""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {name: i for i, name in enumerate(SPECIAL_TOKENS)} | {f"t{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = (
        "{{ bos_token }} {% for m in messages %}{{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    return tokenizer


def save_tiny_hf(name: str, directory, seed: int = 0, tokenizer_vocab: int = 250):
    """Writes a tiny HF checkpoint (safetensors, config, tokenizer) and returns the model."""
    model = tiny_hf_model(name, seed)
    model.save_pretrained(directory)
    tiny_tokenizer(tokenizer_vocab).save_pretrained(directory)
    return model
