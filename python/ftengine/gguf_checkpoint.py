"""llama.cpp GGUF files of llama-architecture models, read through the `gguf` package.

Tensors are renamed to their Hugging Face names and dequantised into the engine's dtypes at load.
llama.cpp's converter permutes the rows of q and k so that rotary embedding rotates interleaved
pairs (Meta's layout); the weights are kept as they are and the model runs the interleaved
rotary kernel (rope_interleaved), which computes the same function as HF's rotate_half on the
unpermuted weights.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import Checkpoint
from .config import config_from_dict
from .errors import ConfigError, FtengineError, WeightFileError
from .loader import all_finite

# GGUF name -> Hugging Face name; {i} is the layer.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# Quantisation types the gguf package dequantises (numpy reference implementations).
_DEQUANTISED = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
_PLAIN = {"F32", "F16", "BF16"}


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None when the engine does not use it."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, module, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[module]}.{kind}"
    return None


@dataclass(frozen=True)
class GgufEntry:
    """One GGUF tensor under its Hugging Face name; read() dequantises it."""

    name: str
    gguf_name: str
    path: Path
    dtype: str  # GGML type name: F32, Q4_1, ...
    shape: tuple[int, ...]  # Hugging Face order (GGUF lists dimensions innermost first)
    nbytes: int
    tensor: Any  # gguf.ReaderTensor

    @property
    def source(self) -> str:
        return f"{self.path.name} ({self.gguf_name})"

    @property
    def supported(self) -> bool:
        return self.dtype in _DEQUANTISED or self.dtype in _PLAIN

    def head_bytes(self, count: int = 64) -> bytes:
        """The first bytes of the tensor's data (for fingerprints)."""
        return np.asarray(self.tensor.data).reshape(-1).view(np.uint8)[:count].tobytes()

    def read(self) -> tuple[np.ndarray, str]:
        from gguf import quants

        data = np.asarray(self.tensor.data)
        try:
            with np.errstate(all="ignore"):  # corrupt scales are reported below, by name
                if self.dtype == "BF16":
                    values, native = data.view(np.uint16).reshape(self.shape), "bfloat16"
                else:
                    if self.dtype == "F32":
                        values = data.view(np.float32)
                    elif self.dtype == "F16":
                        values = data.view(np.float16).astype(np.float32)
                    else:
                        values = quants.dequantize(data, self.tensor.tensor_type)
                    values = np.ascontiguousarray(values, dtype=np.float32).reshape(self.shape)
                    native = "float32"
        except (ValueError, TypeError) as bad:
            raise WeightFileError(f"cannot read tensor {self.source}: {bad}") from None
        finite = all_finite(values, native)
        # A flipped bit in a block scale decodes to inf or NaN for a whole block: never load it.
        if not finite:
            raise WeightFileError(f"tensor {self.source} holds non-finite values: the file is "
                                  f"corrupt")
        return values, native


def _check_metadata_lengths(path: Path) -> None:
    """Rejects metadata whose lengths run past the end of the file. gguf's reader walks an
    array's claimed element count one element at a time, and reads past the end of the file as
    empty slices: a corrupt count (2^62) keeps it busy for ever (found by scripts/fuzz_gguf.py).
    Files that are not GGUF v2+ are left to the reader to reject."""
    from gguf import GGUF_MAGIC, GGUFValueType

    scalar_bytes = {
        GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
        GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
        GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
        GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
    }
    with open(path, "rb") as file:
        if file.seek(0, 2) < 24:
            return
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            magic, version = struct.unpack_from("<II", data, 0)
            if magic != GGUF_MAGIC or version == 1:
                return
            # The reader takes a version with empty low bytes for a big-endian file.
            order = ">" if version & 0xFFFF == 0 else "<"

            def read(fmt: str, offset: int) -> tuple[tuple[int, ...], int]:
                end = offset + struct.calcsize(order + fmt)
                if end > len(data):
                    raise WeightFileError(f"{path}: GGUF metadata runs past the end of the file")
                return struct.unpack_from(order + fmt, data, offset), end

            def skip_value(kind: int, offset: int) -> int:
                if kind in scalar_bytes:
                    return offset + scalar_bytes[kind]
                if kind == GGUFValueType.STRING:
                    (length,), offset = read("Q", offset)
                    return offset + length
                if kind != GGUFValueType.ARRAY:
                    raise WeightFileError(f"{path}: unknown GGUF metadata type {kind}")
                (item_kind, count), offset = read("IQ", offset)
                if item_kind in scalar_bytes:
                    return offset + count * scalar_bytes[item_kind]
                for _ in range(count):  # each item reads a length first: ends at the file's end
                    offset = skip_value(item_kind, offset)
                return offset

            (_, kv_count), offset = read("QQ", 8)
            for _ in range(kv_count):
                (key_length,), offset = read("Q", offset)
                (kind,), offset = read("I", offset + key_length)
                offset = skip_value(kind, offset)
                if offset > len(data):
                    raise WeightFileError(f"{path}: GGUF metadata runs past the end of the file")


def _read_file(path: Path):
    import gguf

    _check_metadata_lengths(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except FtengineError:
        raise
    except Exception as bad:  # the reader raises many types on malformed files
        raise WeightFileError(f"{path} is not a readable GGUF file: {bad}") from None
    return reader


def _llama_config(meta: dict[str, Any], tensors: dict[str, Any], source: str):
    architecture = meta.get("general.architecture")
    if architecture != "llama":
        raise ConfigError(
            f"{source}: GGUF architecture {architecture!r} is not supported (supported: llama)"
        )

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"llama.{key}", default)
        if value is None:
            raise ConfigError(f"{source}: GGUF metadata llama.{key} is missing")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(meta.get("llama.attention.key_length") or hidden // max(heads, 1))
    rotary_dim = int(meta.get("llama.rope.dimension_count") or head_dim)
    if rotary_dim != head_dim:
        raise ConfigError(f"{source}: partial rotary ({rotary_dim} of {head_dim}) is not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    embedding = tensors.get("token_embd.weight")
    vocab = int(meta.get("llama.vocab_size") or (len(tokens) if tokens else 0) or
                (int(embedding.shape[-1]) if embedding is not None else 0))
    raw: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv") or heads),
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        raw["rope_scaling"] = {"rope_type": "linear",
                               "factor": float(get("rope.scaling.factor"))}
    elif scaling not in ("none", None):
        raw["rope_scaling"] = {"rope_type": scaling}  # rejected by config_from_dict by name
    config = replace(config_from_dict(raw, source), rope_interleaved=True)
    if "rope_freqs.weight" in tensors:
        # Llama 3.1 / 3.2 GGUFs carry their rope scaling as per-frequency divisors.
        factors = _rope_freq_factors(tensors["rope_freqs.weight"], config.head_dim // 2, source)
        config = replace(config, rope_freq_factors=factors)
    return config


def _rope_freq_factors(tensor: Any, count: int, source: str) -> tuple[float, ...]:
    if tensor.tensor_type.name != "F32" or int(tensor.n_elements) != count:
        raise ConfigError(f"{source}: rope_freqs must hold {count} float32 values")
    factors = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    if not (np.isfinite(factors).all() and (factors > 0).all()):
        raise ConfigError(f"{source}: rope_freqs holds non-positive or non-finite values")
    return tuple(float(f) for f in factors)


def open_gguf(path: Path) -> Checkpoint:
    from .gguf_tokenizer import gguf_metadata, tokenizer_from_gguf

    reader = _read_file(path)
    meta = gguf_metadata(reader, str(path))
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    config = _llama_config(meta, tensors, str(path))
    tokenizer = tokenizer_from_gguf(meta, str(path))
    entries: dict[str, GgufEntry] = {}
    for gguf_name, tensor in tensors.items():
        name = hf_name(gguf_name)
        if name is None:
            continue
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        entries[name] = GgufEntry(name, gguf_name, path, tensor.tensor_type.name, shape,
                                  int(tensor.n_bytes), tensor)
    # Tensors under names the engine has no use for would be silently dropped: name them.
    unused = [n for n in tensors if hf_name(n) is None and n != "rope_freqs.weight"]
    if unused:
        raise ConfigError(
            f"{path}: tensors {', '.join(unused[:5])} belong to no part of the llama model"
        )
    return Checkpoint(str(path), config, tokenizer, entries, "float32")
