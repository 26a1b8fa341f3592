"""Convert checkpoints ftengine cannot read directly into a Hugging Face directory it can.

    python -m ftengine.convert meta SRC_DIR DST_DIR                  # keep q/k, rope_interleaved
    python -m ftengine.convert meta SRC_DIR DST_DIR --permute-qk     # HF's rotate_half layout

`pangu-alpha` reads PanGu-alpha's PyTorch port (pytorch_model.bin, config.json, vocab.model).
`meta` reads Meta's Llama 2 / 3 release layout: params.json plus consolidated.00.pth ...
consolidated.NN.pth, one file per model-parallel rank of Meta's fairscale layers. The pickles are
read with torch.load(weights_only=True), which refuses anything but tensors and plain containers,
so a hostile file cannot run code; ftengine itself never unpickles. torch is needed only here.

Rotary convention: Meta's model rotates interleaved pairs (x[2i], x[2i+1]) of each head, HF's
rotate_half rotates (x[i], x[i + head_dim/2]). By default q and k are written as Meta stored them
and config.json gets ftengine's "rope_interleaved": true, which selects the interleaved rotary
kernel (transformers ignores that key, so such a directory is for ftengine only). --permute-qk
instead reorders the rows of q and k exactly as transformers' convert_llama_weights_to_hf does;
the result is an ordinary transformers checkpoint. Both compute the same function.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import read_config_json
from .errors import (
    ConfigError,
    FtengineError,
    MissingWeightError,
    TokenizerError,
    WeightFileError,
    WeightShapeError,
)

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
_DTYPES = ("bfloat16", "float16", "float32")
_SHARD_FILE = re.compile(r"consolidated\.(\d+)\.pth")

# Meta's Llama 3 tiktoken tokenizer appends its special tokens after the BPE ranks (128000 of
# them): begin_of_text, end_of_text, ..., eom_id (Llama 3.1) at +8, eot_id at +9.
_TIKTOKEN_BOS, _TIKTOKEN_EOS, _TIKTOKEN_EOM, _TIKTOKEN_EOT = 0, 1, 8, 9
_LLAMA3_VOCAB = 128000
# Default context, as transformers' converter chooses it (CONTEXT_LENGTH_FOR_VERSION).
_CONTEXT_LLAMA2, _CONTEXT_CODE_LLAMA, _CONTEXT_LLAMA3, _CONTEXT_LLAMA31 = 4096, 16384, 8192, 131072
# Meta's params.json has no rope scaling factor: its code takes 8, except for Llama 3.2 1B and
# 3B, whose published transformers configs say 32. They are recognised by (dim, n_layers).
_DEFAULT_ROPE_SCALING_FACTOR = 8.0
_ROPE_SCALING_FACTOR_BY_SHAPE = {(2048, 16): 32.0, (3072, 28): 32.0}

# How Meta's fairscale layers split a tensor over model-parallel ranks: ColumnParallelLinear
# splits output rows (axis 0), RowParallelLinear input columns (axis 1), norms are replicated
# (None). The output head is ColumnParallel (axis 0); the token embedding is ParallelEmbedding
# (axis 1) in Llama 2 and VocabParallelEmbedding (axis 0) in Llama 3, told apart by the shard
# shapes (_embedding_axis).
_REPLICATED = None
_LAYER_TENSORS = {  # Meta name inside layers.N -> (HF name inside model.layers.N, split axis)
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", _REPLICATED),
    "ffn_norm.weight": ("post_attention_layernorm.weight", _REPLICATED),
}
# Buffers some releases carry that the model recomputes from params.json.
_IGNORED = ("rope.freqs",)


def intermediate_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The SwiGLU hidden size of Meta's FeedForward: 2/3 of 4*dim, times ffn_dim_multiplier,
    rounded up to a multiple of multiple_of (as transformers' converter computes it)."""
    hidden = int(8 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class MetaParams:
    """params.json of a Meta Llama release."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int | None  # Llama 2 writes -1: taken from the weights
    multiple_of: int
    ffn_dim_multiplier: float | None
    norm_eps: float
    rope_theta: float
    use_scaled_rope: bool
    rope_scaling_factor: float
    rope_high_freq_factor: float

    @property
    def intermediate_size(self) -> int:
        return intermediate_size(self.dim, self.multiple_of, self.ffn_dim_multiplier)


def read_params(src: Path) -> MetaParams:
    path = src / "params.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: is {src} a Meta Llama checkpoint directory "
                          f"(params.json, consolidated.00.pth, ...)?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as bad:
        raise ConfigError(f"{path} is not valid JSON: {bad}") from None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]  # some releases nest the model arguments
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    try:
        dim, n_heads = int(raw["dim"]), int(raw["n_heads"])
        multiplier = raw.get("ffn_dim_multiplier")
        vocab_size = raw.get("vocab_size")
        params = MetaParams(
            dim=dim,
            n_layers=int(raw["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(raw.get("n_kv_heads") or n_heads),
            head_dim=int(raw.get("head_dim") or dim // max(n_heads, 1)),
            vocab_size=int(vocab_size) if vocab_size is not None and vocab_size > 0 else None,
            multiple_of=int(raw.get("multiple_of", 256)),
            ffn_dim_multiplier=float(multiplier) if multiplier is not None else None,
            norm_eps=float(raw.get("norm_eps", 1e-5)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            use_scaled_rope=bool(raw.get("use_scaled_rope", False)),
            rope_scaling_factor=float(
                raw.get("rope_scaling_factor")
                or _ROPE_SCALING_FACTOR_BY_SHAPE.get((dim, int(raw["n_layers"])),
                                                     _DEFAULT_ROPE_SCALING_FACTOR)
            ),
            rope_high_freq_factor=float(raw.get("rope_high_freq_factor") or 4.0),
        )
    except KeyError as missing:
        raise ConfigError(f"{path}: required key {missing} is missing") from None
    except (TypeError, ValueError) as bad:
        raise ConfigError(f"{path}: malformed value: {bad}") from None
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "multiple_of",
                 "rope_scaling_factor"):
        if getattr(params, name) <= 0:
            raise ConfigError(f"{path}: {name} must be positive, got {getattr(params, name)}")
    if params.n_heads % params.n_kv_heads:
        raise ConfigError(f"{path}: n_heads ({params.n_heads}) is not a multiple of n_kv_heads "
                          f"({params.n_kv_heads})")
    if params.head_dim % 2:
        raise ConfigError(f"{path}: the head size {params.head_dim} must be even for rotary "
                          f"embedding")
    return params


def shard_files(src: Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth, in rank order, with none missing."""
    numbered = {}
    for path in src.glob("consolidated.*.pth"):
        match = _SHARD_FILE.fullmatch(path.name)
        if match:
            numbered[int(match.group(1))] = path
    if not numbered:
        raise WeightFileError(f"no consolidated.NN.pth files in {src}")
    missing = sorted(set(range(max(numbered) + 1)) - set(numbered))
    if missing:
        raise WeightFileError(f"{src} has {len(numbered)} consolidated.*.pth shards but lacks "
                              f"rank(s) {missing}: the checkpoint is incomplete")
    return [numbered[rank] for rank in sorted(numbered)]


def load_shard(path: Path) -> dict[str, Any]:
    """One rank's state dict, memory-mapped. weights_only refuses every pickled object but
    tensors and plain containers."""
    import torch

    try:
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except Exception as bad:  # UnpicklingError, RuntimeError, EOFError, ...: torch has no one type
        first_line = str(bad).strip().splitlines()[0] if str(bad).strip() else type(bad).__name__
        raise WeightFileError(f"{path} cannot be read as a weights-only torch checkpoint: "
                              f"{first_line}") from None
    if not isinstance(state, dict):
        raise WeightFileError(f"{path} holds a {type(state).__name__}, not a state dict of "
                              f"tensors")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise WeightFileError(f"{path}: entry {name!r} is a {type(value).__name__}, not a "
                                  f"tensor")
    return state


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor: where its pieces come from and how they are joined."""

    hf_name: str
    meta_name: str
    axis: int | None  # concatenation axis over shards; None: replicated, shard 0 is taken
    shape: tuple[int, ...]  # full shape after joining
    permute_heads: int = 0  # >0: permute rows into rotate_half order with this many heads


def _check_shards_agree(shards: list[dict[str, Any]], files: list[Path]) -> None:
    names = set(shards[0])
    for state, path in zip(shards[1:], files[1:], strict=True):
        if set(state) != names:
            only_here = sorted(set(state) - names)[:3]
            only_first = sorted(names - set(state))[:3]
            raise WeightFileError(
                f"{path.name} and {files[0].name} hold different tensors (only in {path.name}: "
                f"{only_here}; only in {files[0].name}: {only_first}): are they shards of one "
                f"checkpoint?"
            )
        for name in names:
            first, other = shards[0][name], state[name]
            if first.shape != other.shape or first.dtype != other.dtype:
                raise WeightShapeError(
                    f"tensor {name} is {list(other.shape)} {other.dtype} in {path.name} but "
                    f"{list(first.shape)} {first.dtype} in {files[0].name}: model-parallel "
                    f"shards must agree"
                )


def plan_tensors(params: MetaParams, shards: list[dict[str, Any]], files: list[Path],
                 permute_qk: bool) -> list[PlannedTensor]:
    """Every output tensor in transformers' order, its full shape checked against params.json.
    Raises on a missing, misshapen or unexpected tensor."""
    _check_shards_agree(shards, files)
    count = len(shards)
    first = shards[0]
    where = f"{files[0].parent}"

    def local_shape(name: str) -> tuple[int, ...]:
        if name not in first:
            raise MissingWeightError(
                f"tensor {name} is missing from {files[0].name} (and every shard) in {where}"
            )
        return tuple(first[name].shape)

    tied = "output.weight" not in first  # Llama 3.2 1B/3B share the embedding with the head
    vocab_source = "tok_embeddings.weight" if tied else "output.weight"
    vocab_shape = local_shape(vocab_source)
    if len(vocab_shape) != 2:
        raise WeightShapeError(f"tensor {vocab_source} in {files[0].name} has shape "
                               f"{list(vocab_shape)}; a matrix was expected")
    embedding_axis = _embedding_axis(local_shape("tok_embeddings.weight"), params.dim, count,
                                     files[0].name)
    vocab_axis = embedding_axis if tied else 0
    vocab_size = vocab_shape[0] * (count if vocab_axis == 0 else 1)
    if params.vocab_size is not None and params.vocab_size != vocab_size:
        raise WeightShapeError(f"params.json says vocab_size {params.vocab_size} but "
                               f"{vocab_source} has {vocab_size} rows across {count} shard(s)")

    dim, head_dim = params.dim, params.head_dim
    q_rows, kv_rows = params.n_heads * head_dim, params.n_kv_heads * head_dim
    ffn = params.intermediate_size
    layer_shapes = {
        "attention.wq.weight": (q_rows, dim),
        "attention.wk.weight": (kv_rows, dim),
        "attention.wv.weight": (kv_rows, dim),
        "attention.wo.weight": (dim, q_rows),
        "feed_forward.w1.weight": (ffn, dim),
        "feed_forward.w3.weight": (ffn, dim),
        "feed_forward.w2.weight": (dim, ffn),
        "attention_norm.weight": (dim,),
        "ffn_norm.weight": (dim,),
    }
    planned = [PlannedTensor("model.embed_tokens.weight", "tok_embeddings.weight",
                             embedding_axis, (vocab_size, dim))]
    for layer in range(params.n_layers):
        for meta_suffix, (hf_suffix, axis) in _LAYER_TENSORS.items():
            heads = 0
            if permute_qk and meta_suffix == "attention.wq.weight":
                heads = params.n_heads
            elif permute_qk and meta_suffix == "attention.wk.weight":
                heads = params.n_kv_heads
            planned.append(PlannedTensor(f"model.layers.{layer}.{hf_suffix}",
                                         f"layers.{layer}.{meta_suffix}", axis,
                                         layer_shapes[meta_suffix], heads))
    planned.append(PlannedTensor("model.norm.weight", "norm.weight", _REPLICATED, (dim,)))
    if not tied:
        planned.append(PlannedTensor("lm_head.weight", "output.weight", 0, (vocab_size, dim)))

    for tensor in planned:
        shape = list(local_shape(tensor.meta_name))
        if tensor.axis is not None and len(shape) > tensor.axis:
            shape[tensor.axis] *= count
        if tuple(shape) != tensor.shape:
            hint = "does params.json belong to these weights?"
            if tensor.meta_name.endswith(("w1.weight", "w2.weight", "w3.weight")):
                hint = (f"params.json's dim {dim}, multiple_of {params.multiple_of} and "
                        f"ffn_dim_multiplier {params.ffn_dim_multiplier} give an intermediate "
                        f"size of {ffn}")
            raise WeightShapeError(
                f"tensor {tensor.meta_name} joins to shape {shape} across {count} shard(s) of "
                f"{where} but params.json implies {list(tensor.shape)}: {hint}"
            )
        if not first[tensor.meta_name].is_floating_point():
            raise WeightShapeError(f"tensor {tensor.meta_name} in {files[0].name} has dtype "
                                   f"{first[tensor.meta_name].dtype}; floating point expected")
    used = {tensor.meta_name for tensor in planned}
    unexpected = sorted(name for name in first if name not in used and name not in _IGNORED)
    if unexpected:
        raise WeightShapeError(
            f"{files[0].name} holds {len(unexpected)} tensor(s) a Llama with params.json's "
            f"{params.n_layers} layers does not use ({', '.join(unexpected[:5])}): does "
            f"params.json belong to these weights?"
        )
    return planned


def _embedding_axis(shard_shape: tuple[int, ...], dim: int, count: int, source: str) -> int:
    if len(shard_shape) != 2:
        raise WeightShapeError(f"tensor tok_embeddings.weight in {source} has shape "
                               f"{list(shard_shape)}; a matrix was expected")
    if count == 1 or shard_shape[1] * count == dim:
        return 1  # Llama 2's ParallelEmbedding: each rank holds a slice of every embedding
    if shard_shape[1] == dim:
        return 0  # Llama 3's VocabParallelEmbedding: each rank holds a slice of the vocabulary
    raise WeightShapeError(f"tensor tok_embeddings.weight in {source} has shape "
                           f"{list(shard_shape)}, which splits neither the vocabulary nor "
                           f"dim {dim} over {count} shards")


def join_tensor(tensor: PlannedTensor, shards: list[dict[str, Any]], files: list[Path], dtype):
    """The full tensor in `dtype`, contiguous."""
    import torch

    pieces = [state[tensor.meta_name] for state in shards]
    if tensor.axis is None:
        for piece, path in zip(pieces[1:], files[1:], strict=True):
            if not torch.equal(piece, pieces[0]):
                raise WeightFileError(f"tensor {tensor.meta_name} should be replicated but "
                                      f"differs between {files[0].name} and {path.name}")
        full = pieces[0]
    else:
        full = torch.cat(pieces, dim=tensor.axis) if len(pieces) > 1 else pieces[0]
    if tensor.permute_heads:
        # Meta pairs rows (2i, 2i+1) of a head; rotate_half pairs (i, i + head_dim/2).
        rows, cols = full.shape
        heads = tensor.permute_heads
        full = full.view(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)
    return full.to(dtype).contiguous()


def group_into_files(tensors: list[PlannedTensor], itemsize: int,
                     max_file_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors packed into files of at most max_file_bytes (a larger tensor gets a
    file of its own)."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = math.prod(tensor.shape) * itemsize
        if groups[-1] and size + nbytes > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += nbytes
    return groups


@dataclass(frozen=True)
class TokenizerInfo:
    path: Path
    kind: str  # "sentencepiece" or "tiktoken"
    bos_token_id: int | None
    eos_token_ids: list[int]


def find_tokenizer(src: Path, given: Path | None, params: MetaParams) -> TokenizerInfo | None:
    """The release's tokenizer.model: the given path, else SRC/, else SRC/.. (Meta's Llama 2
    download keeps it beside the model folders)."""
    if given is not None:
        if not given.is_file():
            raise FtengineError(f"--tokenizer {given} is not a file")
        path = given
    else:
        candidates = [src / "tokenizer.model", src.parent / "tokenizer.model"]
        path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if path is None:
            return None
    from .tiktoken_tokenizer import is_tiktoken_file, read_tiktoken_ranks

    if is_tiktoken_file(path):
        ranks = len(read_tiktoken_ranks(path))  # checks the file
        eos = [ranks + _TIKTOKEN_EOS, ranks + _TIKTOKEN_EOT]
        if params.use_scaled_rope:
            eos.insert(1, ranks + _TIKTOKEN_EOM)
        return TokenizerInfo(path, "tiktoken", ranks + _TIKTOKEN_BOS, eos)
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (OSError, RuntimeError) as bad:
        raise TokenizerError(f"{path} is neither a sentencepiece model nor a tiktoken BPE file: "
                            f"{bad}") from None
    bos, eos = processor.bos_id(), processor.eos_id()
    return TokenizerInfo(path, "sentencepiece", bos if bos >= 0 else None,
                         [eos] if eos >= 0 else [])


def hf_config(params: MetaParams, planned: list[PlannedTensor], tokenizer: TokenizerInfo | None,
              dtype: str, permute_qk: bool, max_position: int | None) -> dict[str, Any]:
    vocab_size = planned[0].shape[0]
    llama3 = vocab_size >= _LLAMA3_VOCAB or (tokenizer is not None and tokenizer.kind == "tiktoken")
    if tokenizer is not None:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_ids
    elif llama3:
        bos, eos = _LLAMA3_VOCAB, [_LLAMA3_VOCAB + _TIKTOKEN_EOS, _LLAMA3_VOCAB + _TIKTOKEN_EOT]
    else:
        bos, eos = 1, [2]
    if max_position is None:
        if params.use_scaled_rope:
            max_position = _CONTEXT_LLAMA31
        elif llama3:
            max_position = _CONTEXT_LLAMA3
        else:
            max_position = _CONTEXT_CODE_LLAMA if params.rope_theta > 10000.0 else _CONTEXT_LLAMA2
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": params.dim,
        "intermediate_size": params.intermediate_size,
        "num_hidden_layers": params.n_layers,
        "num_attention_heads": params.n_heads,
        "num_key_value_heads": params.n_kv_heads,
        "head_dim": params.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position,
        "rms_norm_eps": params.norm_eps,
        "rope_theta": params.rope_theta,
        "vocab_size": vocab_size,
        "tie_word_embeddings": planned[-1].hf_name != "lm_head.weight",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": bos,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "torch_dtype": dtype,
    }
    if params.use_scaled_rope:
        # Meta's apply_scaling: low_freq_factor 1 and the original context 8192 are constants.
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": params.rope_scaling_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": params.rope_high_freq_factor,
            "original_max_position_embeddings": 8192,
        }
    if not permute_qk:
        config["rope_interleaved"] = True
    return config


def _prepare_destination(dst: Path, force: bool) -> None:
    outputs = [dst / "config.json", dst / "model.safetensors.index.json",
               *dst.glob("*.safetensors")]
    existing = [path for path in outputs if path.exists()]
    if existing and not force:
        raise FtengineError(f"{dst} already holds a model ({existing[0].name}); choose an empty "
                            f"directory or pass --force to replace it")
    for path in existing:
        path.unlink()
    dst.mkdir(parents=True, exist_ok=True)


def convert_meta(src: str | Path, dst: str | Path, *, permute_qk: bool = False,
                 dtype: str | None = None, max_position: int | None = None,
                 rope_scaling_factor: float | None = None, tokenizer: str | Path | None = None,
                 max_file_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False,
                 progress: bool = True) -> Path:
    """Converts a Meta Llama checkpoint directory into a Hugging Face one; returns dst."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FtengineError(f"{src} is not a directory")
    if dtype is not None and dtype not in _DTYPES:
        raise FtengineError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if max_position is not None and max_position <= 0:
        raise FtengineError(f"max position must be positive, got {max_position}")
    params = read_params(src)
    if rope_scaling_factor is not None:
        if not (math.isfinite(rope_scaling_factor) and rope_scaling_factor > 0):
            raise FtengineError(f"the rope scaling factor must be positive, got "
                                f"{rope_scaling_factor}")
        params = replace(params, rope_scaling_factor=rope_scaling_factor)
    files = shard_files(src)
    shards = [load_shard(path) for path in files]
    planned = plan_tensors(params, shards, files, permute_qk)
    tokenizer_info = find_tokenizer(src, Path(tokenizer) if tokenizer else None, params)
    if progress and tokenizer_info is not None and tokenizer_info.path.parent != src:
        print(f"tokenizer: {tokenizer_info.path} ({tokenizer_info.kind})", file=sys.stderr)
    if dtype is None:  # as stored (Meta releases are bfloat16)
        dtype = str(shards[0][planned[0].meta_name].dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            dtype = "float32"
    torch_dtype = getattr(torch, dtype)
    config = hf_config(params, planned, tokenizer_info, dtype, permute_qk, max_position)

    _prepare_destination(dst, force)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    groups = group_into_files(planned, itemsize, max_file_bytes)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    total = sum(math.prod(tensor.shape) for tensor in planned) * itemsize
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"converting {src.name}",
              disable=not progress, file=sys.stderr) as bar:
        for name, group in zip(names, groups, strict=True):
            contents = {}
            for tensor in group:
                contents[tensor.hf_name] = join_tensor(tensor, shards, files, torch_dtype)
                weight_map[tensor.hf_name] = name
                bar.update(contents[tensor.hf_name].nbytes)
            save_file(contents, str(dst / name), metadata={"format": "pt"})
            del contents
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_tokenizer(src, dst, tokenizer_info)
    return dst


def _write_tokenizer(src: Path, dst: Path, tokenizer: TokenizerInfo | None) -> None:
    if tokenizer is None:
        print(f"warning: no tokenizer.model in {src} or its parent (give --tokenizer); copy one "
              f"into {dst} before loading the model", file=sys.stderr)
        return
    if tokenizer.path.resolve() != (dst / "tokenizer.model").resolve():
        shutil.copyfile(tokenizer.path, dst / "tokenizer.model")
    tokenizer_config = tokenizer.path.parent / "tokenizer_config.json"
    if tokenizer_config.is_file():
        if tokenizer_config.resolve() != (dst / "tokenizer_config.json").resolve():
            shutil.copyfile(tokenizer_config, dst / "tokenizer_config.json")
    elif tokenizer.kind == "sentencepiece":
        # Meta's generation encodes prompts with bos=True, eos=False.
        settings = {"add_bos_token": True, "add_eos_token": False}
        (dst / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def _byte_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 2GB, 500MB or 1024")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2).upper()]
    size = int(float(match.group(1)) * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError("the size must be positive")
    return size


# The port's attention modules keep a causal-mask buffer (attn.bias) and its fill value
# (attn.masked_bias) in the state dict; ftengine's kernels need neither.
_PANGU_MASK_BUFFER = re.compile(r"transformer\.h\.\d+\.attn\.(bias|masked_bias)")


def convert_pangu_alpha(src: str | Path, dst: str | Path, *, force: bool = False,
                        progress: bool = True) -> Path:
    """PanGu-alpha's PyTorch port (config.json, pytorch_model.bin, vocab.model) into a
    safetensors directory; returns dst."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise FtengineError(f"{dst} is the source directory: write the conversion elsewhere")
    config = read_config_json(src, "PanGu-alpha")
    index = src / "pytorch_model.bin.index.json"
    if index.exists():
        try:
            files = sorted({src / name for name in json.loads(index.read_text())["weight_map"]
                            .values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as bad:
            raise WeightFileError(f"{index} is not a valid shard index: {bad}") from None
    else:
        files = [src / "pytorch_model.bin"]
    for path in files:
        if not path.is_file():
            raise WeightFileError(f"{path} not found")
    tensors: dict[str, Any] = {}
    for path in tqdm(files, desc="reading", disable=not progress, leave=False):
        for name, value in load_shard(path).items():
            if _PANGU_MASK_BUFFER.fullmatch(name) or name == "lm_head.weight":
                continue  # mask buffers; the head is tied to transformer.wte
            tensors[name] = value.contiguous()
    if not (src / "vocab.model").is_file():
        raise WeightFileError(f"{src / 'vocab.model'} not found: the tokenizer is needed too")
    _prepare_destination(dst, force)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config.update(architectures=["GPTPanguForCausalLM"], model_type="gpt_pangu")
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("vocab.model", "tokenizer_config.json"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    return dst


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ftengine.convert",
        description="Convert a checkpoint into a Hugging Face directory (config.json, "
        "*.safetensors, tokenizer) that ftengine loads. Pickled files are read with "
        "torch.load(weights_only=True): tensors only, no code runs.",
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    meta = formats.add_parser(
        "meta",
        help="Meta Llama 2 / 3 release: params.json + consolidated.NN.pth shards",
        description="Convert a Meta Llama 2 / 3 checkpoint (params.json and the model-parallel "
        "shards consolidated.00.pth ... consolidated.NN.pth) into a Hugging Face directory. "
        "By default q and k keep Meta's interleaved rotary layout and config.json gets "
        "\"rope_interleaved\": true, which ftengine reads (transformers does not); "
        "--permute-qk writes transformers' layout instead. Both give the same logits.",
        epilog="examples:\n"
        "  python -m ftengine.convert meta llama-2-7b/ llama-2-7b-ftengine/\n"
        "  python -m ftengine.convert meta Meta-Llama-3.1-8B/ llama31-hf/ --permute-qk "
        "--dtype bfloat16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    meta.add_argument("src", metavar="SRC_DIR", help="directory with params.json and "
                      "consolidated.*.pth (and tokenizer.model, here or in its parent)")
    meta.add_argument("dst", metavar="DST_DIR", help="output directory (created if absent)")
    meta.add_argument("--permute-qk", action="store_true",
                      help="permute q/k rows into transformers' rotate_half layout, as "
                      "transformers' convert_llama_weights_to_hf does; the output then also "
                      "loads in transformers")
    meta.add_argument("--dtype", choices=_DTYPES, default=None,
                      help="dtype of the written weights (default: as stored, bfloat16 for "
                      "Meta releases)")
    meta.add_argument("--max-position", type=int, default=None,
                      help="max_position_embeddings to write (default: 4096 for Llama 2, "
                      "16384 for Code Llama, 8192 for Llama 3, 131072 for Llama 3.1+)")
    meta.add_argument("--rope-scaling-factor", type=float, default=None,
                      help="llama3 rope scaling factor for checkpoints with use_scaled_rope "
                      "(default: params.json's rope_scaling_factor, else 32 for the Llama 3.2 "
                      "1B/3B shapes and 8 otherwise, as Meta's code does)")
    meta.add_argument("--tokenizer", default=None,
                      help="tokenizer.model to copy (default: SRC_DIR/tokenizer.model, else "
                      "the one in SRC_DIR's parent)")
    meta.add_argument("--max-shard-size", type=_byte_size, default=DEFAULT_MAX_SHARD_BYTES,
                      help="split the safetensors output into files of at most this size "
                      "(bytes, or with a K/M/G suffix), indexed by model.safetensors.index.json "
                      "(default: 2GB)")
    meta.add_argument("--force", action="store_true",
                      help="replace config.json and *.safetensors already in DST_DIR")
    meta.add_argument("--quiet", action="store_true", help="no progress bar")

    pangu = formats.add_parser(
        "pangu-alpha",
        help="PanGu-alpha PyTorch port: config.json + pytorch_model.bin + vocab.model",
        description="Convert PanGu-alpha's PyTorch port (2.6B, 13B) into safetensors: the pickle "
        "is read tensors-only, the attention mask buffers are dropped, config.json and the "
        "jieba + sentencepiece tokenizer (vocab.model) are copied.",
    )
    pangu.add_argument("src", metavar="SRC_DIR", help="directory with pytorch_model.bin")
    pangu.add_argument("dst", metavar="DST_DIR", help="output directory (created if absent)")
    pangu.add_argument("--force", action="store_true",
                       help="replace config.json and *.safetensors already in DST_DIR")
    pangu.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.format == "meta":
            dst = convert_meta(args.src, args.dst, permute_qk=args.permute_qk, dtype=args.dtype,
                               max_position=args.max_position,
                               rope_scaling_factor=args.rope_scaling_factor,
                               tokenizer=args.tokenizer,
                               max_file_bytes=args.max_shard_size, force=args.force,
                               progress=not args.quiet)
        else:
            dst = convert_pangu_alpha(args.src, args.dst, force=args.force,
                                      progress=not args.quiet)
    except FtengineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"wrote {dst}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
