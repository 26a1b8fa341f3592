"""Tiny random-initialised transformers Llama models saved with save_pretrained, the references
ftengine is checked against. Import as ``from model_fixtures import ...`` from a test file."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizer_fixtures import write_llama_style_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

# name -> LlamaConfig overrides; each exercises one feature of the Llama family.
VARIANTS: dict[str, dict] = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=16),
    "mqa_tied": dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "llama3_rope": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=64,
        ),
    ),
    "linear_rope": dict(
        num_attention_heads=4, num_key_value_heads=2,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
    ),
    "bias": dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    "head_dim_80": dict(hidden_size=96, num_attention_heads=2, num_key_value_heads=1, head_dim=80),
}


def make_tiny_llama(
    directory: str | Path,
    variant: str = "gqa",
    tokenizer_kind: str = "sentencepiece",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides,
) -> LlamaForCausalLM:
    """Writes a tiny Llama (config, safetensors, tokenizer) into `directory`; returns the float32
    transformers model that was saved (in eval mode)."""
    directory = Path(directory)
    vocab_size = write_llama_style_tokenizer(directory, kind=tokenizer_kind, vocab_size=384)
    settings = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        # Larger than transformers' 0.02 so a random model's next-token distribution is peaked
        # and greedy choices are not decided by rounding.
        initializer_range=0.25,
        bos_token_id=1,
        eos_token_id=2,
    )
    settings.update(VARIANTS[variant])
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    with torch.no_grad():  # norms start at 1.0: give them texture so a wrong weight shows
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(directory)
    return model.float()


# name -> LlamaConfig overrides for the GPU tests: head sizes the FastAttention CUDA members
# serve (64, 128).
CUDA_VARIANTS: dict[str, dict] = {
    "gqa_hd64": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64),
    "mha_hd128": dict(hidden_size=256, intermediate_size=512, num_attention_heads=2,
                      num_key_value_heads=2, head_dim=128),
    "mqa_tied_bias": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=64, tie_word_embeddings=True,
                          attention_bias=True, mlp_bias=True),
    "llama3_rope_gqa8": dict(
        hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=1,
        head_dim=64, rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=64)),
}
CUDA_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def load_reference(directory, dtype):
    """The transformers model of a checkpoint directory, on the GPU, in `dtype`."""
    return LlamaForCausalLM.from_pretrained(directory, dtype=dtype).cuda().eval()
