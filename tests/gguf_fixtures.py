"""Tiny llama GGUF files written from tiny transformers models, the way llama.cpp's converter
lays them out (q/k rows permuted for interleaved rotary, GGUF dimension order, quantised blocks).
Import as ``from gguf_fixtures import ...`` from a test file."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

# Block layouts of the K-quants (bytes per 256 weights) and the byte offsets of their float16
# scales, for making valid random blocks: gguf-py dequantises K-quants but cannot quantise them.
K_QUANT_LAYOUT = {
    Q.Q2_K: (84, (80, 82)),
    Q.Q3_K: (110, (108,)),
    Q.Q4_K: (144, (0, 2)),
    Q.Q5_K: (176, (0, 2)),
    Q.Q6_K: (210, (208,)),
}


def permute_for_interleaved_rope(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (and biases)."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def random_k_quant_blocks(rows: int, cols: int, qtype: Q, seed: int) -> np.ndarray:
    block_bytes, scale_offsets = K_QUANT_LAYOUT[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, block_bytes), dtype=np.uint8)
    for offset in scale_offsets:
        scales = rng.uniform(0.002, 0.01, size=(rows, cols // 256)).astype(np.float16)
        blocks[:, :, offset:offset + 2] = scales.view(np.uint8).reshape(rows, cols // 256, 2)
    return blocks.reshape(rows, -1)


def encode_tensor(values: np.ndarray, qtype: Q, seed: int) -> tuple[np.ndarray, Q]:
    """Bytes of `values` in `qtype`; 1-D tensors (norms, biases) stay float32, as llama.cpp
    keeps them. K-quant matrices get random valid blocks (their values are then whatever
    those blocks decode to)."""
    if values.ndim == 1 or qtype == Q.F32:
        return values.astype(np.float32), Q.F32
    if qtype in K_QUANT_LAYOUT:
        return random_k_quant_blocks(values.shape[0], values.shape[1], qtype, seed), qtype
    return quants.quantize(values.astype(np.float32), qtype), qtype


def gpt2_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer_dir: Path) -> None:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    special = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    vocab.update(special)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if token in special else 1 for token in tokens]
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[config["bos_token"] if isinstance(config["bos_token"], str)
                                  else config["bos_token"]["content"]])
    writer.add_eos_token_id(vocab["<|eot_id|>"] if "<|eot_id|>" in vocab else 2)
    writer.add_add_bos_token(True)
    if config.get("chat_template"):
        writer.add_chat_template(config["chat_template"])


def llama3_rope_factors(config) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for a llama3-scaled rope (convert_hf_to_gguf's formula)."""
    rope = config.rope_parameters
    dim, base = config.head_dim, rope["rope_theta"]
    low_wavelen = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high_wavelen = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(rope["factor"])
        else:
            smooth = ((rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"])
                      / (rope["high_freq_factor"] - rope["low_freq_factor"]))
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def write_tiny_gguf(path: Path, model, tokenizer_dir: Path, qtype: Q = Q.Q8_0,
                    architecture: str = "llama") -> Path:
    """Writes `model` (a transformers LlamaForCausalLM) as a GGUF file; matrices in `qtype`.
    A llama3-scaled rope is written as llama.cpp does: a rope_freqs tensor of divisors."""
    config = model.config
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    gpt2_tokenizer_metadata(writer, tokenizer_dir)

    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    modules = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for index, (name, values) in enumerate(state.items()):
        if name in names:
            target = names[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            target = f"blk.{layer}.{modules[module]}.{kind}"
            if module == "self_attn.q_proj":
                values = permute_for_interleaved_rope(values, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                values = permute_for_interleaved_rope(values, config.num_key_value_heads)
        data, stored = encode_tensor(values, qtype, seed=index)
        writer.add_tensor(target, data, raw_dtype=stored)
    if config.rope_parameters.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(config), raw_dtype=Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
