"""Reading Hugging Face checkpoints: safetensors files (single or sharded through an index),
validated by the safetensors library and checked tensor by tensor against the shapes the config
implies, then streamed into the native runtime one tensor at a time."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from .errors import MissingWeightError, WeightFileError, WeightShapeError

# Tensors some checkpoints carry that no model reads: rotary buffers are recomputed from the config.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# safetensors dtype -> (numpy dtype of the raw items, dtype name the native side takes)
_DTYPES = {
    "F32": (np.float32, "float32"),
    "BF16": (np.uint16, "bfloat16"),
    "F16": (np.float16, "float16"),
}


def all_finite(array: np.ndarray, dtype: str) -> bool:
    """Whether a weight holds only finite values (bfloat16 given as its uint16 bits)."""
    if dtype == "bfloat16":
        return not ((array & 0x7F80) == 0x7F80).any()
    return bool(np.isfinite(array).all())


@dataclass(frozen=True)
class TensorEntry:
    """Where one safetensors tensor lives: file, dtype, shape and byte range of its data.

    Every checkpoint format's entries offer name, shape, dtype, source, supported, nbytes and
    read(), which is all check_against_spec and stream_weights use."""

    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def source(self) -> str:
        return self.path.name

    @property
    def supported(self) -> bool:
        return self.dtype in _DTYPES

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    def head_bytes(self, count: int = 64) -> bytes:
        """The first bytes of the tensor's data (for fingerprints)."""
        with self.path.open("rb") as stream:
            stream.seek(self.begin)
            return stream.read(min(count, self.nbytes))

    def read(self) -> tuple[np.ndarray, str]:
        """The tensor's items (memory-mapped, not copied) and the dtype name the runtime takes."""
        numpy_dtype, native_dtype = _DTYPES[self.dtype]
        items = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.begin,
                          shape=(self.nbytes,))
        array = items.view(numpy_dtype).reshape(self.shape)
        if native_dtype == "float16":  # no float16 storage on the CPU: widen exactly
            array, native_dtype = array.astype(np.float32), "float32"
        if not all_finite(array, native_dtype):
            raise WeightFileError(f"tensor {self.name} in {self.source} holds inf or NaN values: "
                                  f"the file is corrupt")
        return array, native_dtype


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, through the shard index when there is one."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as bad:
            raise WeightFileError(f"{index_path} is not a valid shard index: {bad}") from None
        files = [model_dir / name for name in names]
        for path in files:
            if not path.is_file():
                raise WeightFileError(f"{index_path} names {path.name}, which does not exist")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        hint = ""
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pth")):
            hint = " (pickled .bin/.pth checkpoints are not read; convert them to safetensors)"
        raise WeightFileError(f"no *.safetensors files in {model_dir}{hint}")
    return files


def _entries_of(path: Path) -> Iterator[TensorEntry]:
    # The library validates the header (offsets in bounds, contiguous, file size consistent);
    # only after that do we read offsets from the same header to map bfloat16 data, which
    # numpy cannot represent and the library will not hand to numpy.
    try:
        with safe_open(str(path), framework="np") as handle:
            names = list(handle.keys())
            described = {
                name: (handle.get_slice(name).get_dtype(), handle.get_slice(name).get_shape())
                for name in names
            }
        with path.open("rb") as stream:
            (header_length,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(header_length))
    except (SafetensorError, OSError, ValueError, struct.error) as bad:
        raise WeightFileError(f"{path} is not a readable safetensors file: {bad}") from None
    data_start = 8 + header_length
    for name in names:
        dtype, shape = described[name]
        begin, end = header[name]["data_offsets"]
        yield TensorEntry(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def index_tensors(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint by name; a name in two files is an error."""
    entries: dict[str, TensorEntry] = {}
    for path in weight_files(model_dir):
        for entry in _entries_of(path):
            if entry.name in entries:
                raise WeightFileError(
                    f"tensor {entry.name} is in both {entries[entry.name].path.name} and "
                    f"{path.name}"
                )
            entries[entry.name] = entry
    return entries


@dataclass(frozen=True)
class ShardRead:
    """The part of one checkpoint tensor a rank loads: all of it when axis < 0, else indices
    [begin, begin + count) along axis (native spec: _C.expected_weights)."""

    entry: Any
    axis: int
    begin: int
    count: int

    @property
    def nbytes(self) -> int:
        if self.axis < 0:
            return self.entry.nbytes
        return self.entry.nbytes * self.count // self.entry.shape[self.axis]

    def read(self) -> tuple[np.ndarray, str]:
        array, dtype = self.entry.read()
        if self.axis >= 0:
            # Only the slice is copied out of the memory map: each rank reads its own shard.
            index = [slice(None)] * array.ndim
            index[self.axis] = slice(self.begin, self.begin + self.count)
            array = np.ascontiguousarray(array[tuple(index)])
        return array, dtype


def check_against_spec(
    entries: dict[str, Any],
    expected: list[tuple[str, list[int], int, int, int]],
    checkpoint: str,
    tie_word_embeddings: bool,
) -> list[ShardRead]:
    """What this rank reads, in spec order; raises on anything missing, misshapen, of an
    unsupported dtype, or unexpected."""
    needed = []
    for name, shape, axis, begin, count in expected:
        entry = entries.get(name)
        if entry is None:
            raise MissingWeightError(
                f"tensor {name} is missing from the checkpoint {checkpoint}; the config implies "
                f"it with shape {list(shape)}"
            )
        if list(entry.shape) != list(shape):
            raise WeightShapeError(
                f"tensor {name} in {entry.source} has shape {list(entry.shape)} but the config "
                f"implies {list(shape)}: does config.json belong to these weights?"
            )
        if not entry.supported:
            raise WeightShapeError(
                f"tensor {name} in {entry.source} has dtype {entry.dtype}, which ftengine "
                f"cannot read"
            )
        needed.append(ShardRead(entry, axis, begin, count))
    wanted = {spec[0] for spec in expected}
    unexpected = [
        name
        for name in entries
        if name not in wanted
        and not name.endswith(_IGNORED_SUFFIXES)
        and not (tie_word_embeddings and name == "lm_head.weight")
    ]
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:5])
        raise WeightShapeError(
            f"the checkpoint {checkpoint} holds {len(unexpected)} tensor(s) this architecture "
            f"does not use ({shown}): is the config's architecture right?"
        )
    return needed


def stream_weights(
    entries: list[ShardRead],
    add: Callable[[str, np.ndarray, str], None],
    progress: bool,
    description: str,
) -> None:
    """Hands each tensor to `add` with a progress bar sized in bytes."""
    from tqdm import tqdm

    total = sum(entry.nbytes for entry in entries)
    with tqdm(total=total, unit="B", unit_scale=True, desc=description, disable=not progress,
              leave=False) as bar:
        for entry in entries:
            array, dtype = entry.read()
            add(entry.entry.name, array, dtype)
            bar.update(entry.nbytes)
