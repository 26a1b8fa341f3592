"""Writes a small random-weight Llama model directory (config.json, model.safetensors, a
byte-level BPE tokenizer.json trained here on a short text), needing only ftengine's own
dependencies. The text it generates is noise; it proves the whole path from files to streamed
tokens on a machine with nothing downloaded.

    python scripts/make_demo_model.py demo-model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = """FastAttention extends FlashAttention to NPUs and low-resource GPUs. It tiles the
attention computation twice: large blocks keep the matrix unit busy, small blocks fit the vector
unit. A tiling mask replaces the full attention mask, so memory no longer grows with the square
of the sequence. Tensor parallel inference overlaps the AllReduce with computation, and a
cooperative CPU-GPU strategy keeps attention going when the KV cache outgrows device memory.
Once upon a time, a small engine learned to read weights, stream tokens and answer questions.
"""


def train_tokenizer(directory: Path, vocab_size: int) -> int:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS.split("\n") * 4, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: "
                         "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}"
                         "assistant:{% endif %}",
    }, indent=2))
    return tokenizer.get_vocab_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    directory: Path = args.directory
    directory.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(directory, vocab_size=600)
    hidden, heads, kv_heads = args.hidden_size, 8, 2
    head_dim, intermediate = hidden // heads, hidden * 8 // 3
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": args.layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": head_dim, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(args.seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    tensors = {"model.embed_tokens.weight": matrix(vocab, hidden) * 4,
               "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(args.layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(hidden, np.float32),
            p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
            p + "self_attn.q_proj.weight": matrix(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": matrix(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": matrix(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": matrix(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": matrix(intermediate, hidden),
            p + "mlp.up_proj.weight": matrix(intermediate, hidden),
            p + "mlp.down_proj.weight": matrix(hidden, intermediate),
        })
    save_file(tensors, str(directory / "model.safetensors"))
    print(f"wrote a {args.layers}-layer random Llama ({vocab} tokens) to {directory}")


if __name__ == "__main__":
    main()
