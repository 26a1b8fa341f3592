"""Malformed GGUF files: each gets a typed ftengine error naming the file, never a crash or a
hang. The fuzz script runs for a bounded time too."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from ftengine import ConfigError, Engine, WeightFileError, WeightShapeError
from gguf import GGMLQuantizationType as Q
from gguf_fixtures import write_tiny_gguf
from model_fixtures import make_tiny_llama

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gguf-bad-input")
    model = make_tiny_llama(directory, "gqa", "byte_level_bpe", hidden_size=64,
                            intermediate_size=96)
    return write_tiny_gguf(directory / "good.gguf", model, directory, Q.Q8_0), model, directory


def damaged(tmp_path, source: Path, edit) -> Path:
    data = bytearray(source.read_bytes())
    edit(data)
    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(data))
    return path


def tensor_info_offset(data: bytearray, name: bytes) -> int:
    """Byte offset of the n_dims field that follows `name` in the tensor-info section."""
    position = data.rfind(struct.pack("<Q", len(name)) + name)
    assert position > 0
    return position + 8 + len(name)


def load(path):
    return Engine.from_pretrained(path, progress=False)


def test_good_file_loads(good_gguf):
    path, _, _ = good_gguf
    assert load(path).config.num_layers == 2


def test_wrong_magic(tmp_path, good_gguf):
    path = damaged(tmp_path, good_gguf[0], lambda d: d.__setitem__(slice(0, 4), b"GGUX"))
    with pytest.raises(WeightFileError, match="damaged.gguf"):
        load(path)


@pytest.mark.parametrize("keep", [3, 20, 200, 2000, -100])
def test_truncated(tmp_path, good_gguf, keep):
    path = damaged(tmp_path, good_gguf[0], lambda d: d.__delitem__(slice(keep, None)))
    with pytest.raises(WeightFileError, match="damaged.gguf"):
        load(path)


@pytest.mark.parametrize("field_offset", [8, 16], ids=["tensor_count", "kv_count"])
def test_absurd_counts(tmp_path, good_gguf, field_offset):
    path = damaged(tmp_path, good_gguf[0],
                   lambda d: d.__setitem__(slice(field_offset, field_offset + 8),
                                           struct.pack("<Q", 2**62)))
    with pytest.raises(WeightFileError, match="damaged.gguf"):
        load(path)


@pytest.mark.parametrize("dimension", [2**62, 2**63 + 5, 0])
def test_absurd_dimensions(tmp_path, good_gguf, dimension):
    def edit(d):
        at = tensor_info_offset(d, b"blk.0.ffn_up.weight") + 4  # first dimension
        d[at:at + 8] = struct.pack("<Q", dimension)

    path = damaged(tmp_path, good_gguf[0], edit)
    with pytest.raises((WeightFileError, WeightShapeError)):
        load(path)


def test_unknown_quantisation_type(tmp_path, good_gguf):
    def edit(d):
        at = tensor_info_offset(d, b"blk.0.ffn_up.weight")
        n_dims = struct.unpack_from("<I", d, at)[0]
        d[at + 4 + 8 * n_dims:at + 8 + 8 * n_dims] = struct.pack("<I", 250)

    with pytest.raises(WeightFileError, match="damaged.gguf"):
        load(damaged(tmp_path, good_gguf[0], edit))


def test_non_finite_block_scale(tmp_path, good_gguf):
    path, model, _ = good_gguf

    def edit(d):
        # The last tensor's data ends the file; Q8_0 blocks start with a float16 scale.
        d[-34:-32] = struct.pack("<e", float("inf"))

    with pytest.raises(WeightFileError, match="non-finite"):
        load(damaged(tmp_path, path, edit))


def test_non_llama_architecture(tmp_path, good_gguf):
    _, model, directory = good_gguf
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", model, directory, Q.F32, architecture="gpt2")
    with pytest.raises(ConfigError, match="architecture 'gpt2'"):
        load(path)


def test_fuzz_for_a_bounded_time():
    import ftengine

    package_root = os.path.dirname(os.path.dirname(ftengine.__file__))
    env = dict(os.environ, PYTHONPATH=package_root)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fuzz_gguf.py"), "--seconds", "15"],
        capture_output=True, text=True, timeout=240, env=env, cwd="/tmp",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no crash" in result.stdout
