"""Bad input of every kind: damaged checkpoints, configs and tokenizers, invalid prompts, sampling
parameters and context lengths. Each must raise its typed ftengine error with a message naming
the file, tensor or value at fault, never crash or hang, and leave a loaded Engine usable."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import ftengine
import numpy as np
import pytest
import torch
from ftengine import (
    _C,
    ConfigError,
    ContextLengthError,
    Engine,
    FtengineError,
    InvalidTokenError,
    MissingWeightError,
    SamplingParams,
    SamplingParamsError,
    TokenizerError,
    WeightFileError,
    WeightShapeError,
)
from ftengine import engine as engine_module
from ftengine.generate import main as cli_main
from model_fixtures import make_tiny_llama
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
K_PROJ = "model.layers.0.self_attn.k_proj.weight"
UP_PROJ = "model.layers.1.mlp.up_proj.weight"
KV_CACHE = 64  # tokens of the small-cache engine (block_size 16, so exactly 64)


# ---- helpers -------------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    """A private copy of the tiny gqa model (float32, sentencepiece) to damage."""
    source, _ = tiny_llama("gqa")
    return Path(shutil.copytree(source, tmp_path / "model"))


def load(directory, **kwargs):
    return Engine.from_pretrained(directory, progress=False, **kwargs)


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format's alignment padding
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def tensor_names(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"),
                  key=lambda k: header[k]["data_offsets"][0])


def rewrite_tensors(directory: Path, change) -> None:
    """Loads the checkpoint, lets `change(dict)` edit it, saves it back with save_file."""
    tensors = load_file(directory / WEIGHTS)
    change(tensors)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})


def edit_config(directory: Path, change) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def raises(error_type, *fragments):
    """pytest.raises that also checks the message names each fragment; exact type or subclass."""

    class _Check:
        def __enter__(self):
            self._ctx = pytest.raises(error_type)
            self.info = self._ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            suppressed = self._ctx.__exit__(*exc)
            if not suppressed:  # another exception type: let it propagate as is
                return False
            message = str(self.info.value)
            for fragment in fragments:
                assert str(fragment) in message, f"{fragment!r} not in {message!r}"
            return suppressed

    return _Check()


# ---- safetensors files ---------------------------------------------------------------------


def _cut(fraction_or_size):
    def damage(directory: Path):
        path = directory / WEIGHTS
        raw = path.read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        if fraction_or_size == "data":
            path.write_bytes(raw[: 8 + length + (len(raw) - 8 - length) // 2])
        elif fraction_or_size == "header":
            path.write_bytes(raw[: 8 + length // 2])
        else:
            path.write_bytes(raw[:fraction_or_size])
    return damage


def _garbage_json(directory: Path):
    _, data = read_safetensors(directory / WEIGHTS)
    junk = b"{this is not json: [" + b" " * 4
    (directory / WEIGHTS).write_bytes(struct.pack("<Q", len(junk)) + junk + data)


def _header_too_long(directory: Path):
    path = directory / WEIGHTS
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])


def _header_absurd(directory: Path):
    path = directory / WEIGHTS
    path.write_bytes(struct.pack("<Q", 2**63 + 5) + path.read_bytes()[8:])


def _overlap(directory: Path):
    header, data = read_safetensors(directory / WEIGHTS)
    first, second = tensor_names(header)[:2]
    # second now starts inside first; same total size, so the file still looks whole
    begin, end = header[first]["data_offsets"]
    header[second]["data_offsets"] = [begin + 4, header[second]["data_offsets"][1]]
    write_safetensors(directory / WEIGHTS, header, data)


def _past_end(directory: Path):
    header, data = read_safetensors(directory / WEIGHTS)
    last = tensor_names(header)[-1]
    header[last]["data_offsets"][1] += 256  # claims bytes beyond the end of the file
    write_safetensors(directory / WEIGHTS, header, data)


def _offsets_reversed(directory: Path):
    header, data = read_safetensors(directory / WEIGHTS)
    name = tensor_names(header)[0]
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [end, begin]
    write_safetensors(directory / WEIGHTS, header, data)


def _shape_disagrees_with_bytes(directory: Path):
    header, data = read_safetensors(directory / WEIGHTS)
    header[K_PROJ]["shape"] = [32, 65]
    write_safetensors(directory / WEIGHTS, header, data)


@pytest.mark.parametrize(
    "damage",
    [
        _cut("data"),
        _cut("header"),
        _cut(4),
        _cut(0),
        _garbage_json,
        _header_too_long,
        _header_absurd,
        _overlap,
        _past_end,
        _offsets_reversed,
        _shape_disagrees_with_bytes,
    ],
    ids=["truncated-data", "truncated-header", "4-bytes", "empty-file", "garbage-json",
         "header-longer-than-file", "header-length-absurd", "overlapping-offsets",
         "offsets-past-end", "offsets-reversed", "shape-vs-bytes"],
)
def test_unreadable_safetensors(model_copy, damage):
    damage(model_copy)
    with raises(WeightFileError, model_copy / WEIGHTS) as info:
        load(model_copy)
    assert type(info.value) is WeightFileError


def test_overlap_names_the_tensor(model_copy):
    header, data = read_safetensors(model_copy / WEIGHTS)
    first, second = tensor_names(header)[:2]
    header[second]["data_offsets"] = list(header[first]["data_offsets"])
    write_safetensors(model_copy / WEIGHTS, header, data)
    with raises(WeightFileError, model_copy / WEIGHTS, "offset"):
        load(model_copy)


def test_empty_directory(tmp_path):
    with raises(FtengineError, tmp_path):
        load(tmp_path)


def test_missing_directory(tmp_path):
    with raises(FtengineError, tmp_path / "nope"):
        load(tmp_path / "nope")


def test_no_safetensors(model_copy):
    (model_copy / WEIGHTS).unlink()
    with raises(WeightFileError, "no *.safetensors", model_copy) as info:
        load(model_copy)
    assert "convert" not in str(info.value)


def test_pytorch_bin_only_gets_conversion_hint(model_copy):
    (model_copy / WEIGHTS).rename(model_copy / "pytorch_model.bin")
    with raises(WeightFileError, model_copy, ".bin", "convert"):
        load(model_copy)


# ---- sharded checkpoints -------------------------------------------------------------------


INDEX = "model.safetensors.index.json"


def shard(directory: Path, duplicate: str | None = None) -> dict:
    """Splits the checkpoint into two shards with an index; `duplicate` goes into both."""
    tensors = load_file(directory / WEIGHTS)
    (directory / WEIGHTS).unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    weight_map = {}
    for file, part in halves.items():
        chosen = {n: tensors[n] for n in part}
        if duplicate is not None:
            chosen[duplicate] = tensors[duplicate]
        save_file(chosen, directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index))
    return index


def test_sharded_checkpoint_loads(model_copy, tiny_llama):
    reference = load(tiny_llama("gqa")[0]).logits([1, 5, 9, 200])
    shard(model_copy)
    np.testing.assert_allclose(load(model_copy).logits([1, 5, 9, 200]), reference, atol=1e-6)


def test_index_names_missing_shard(model_copy):
    shard(model_copy)
    (model_copy / "model-00002-of-00002.safetensors").unlink()
    with raises(WeightFileError, INDEX, "model-00002-of-00002.safetensors"):
        load(model_copy)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"metadata": {}}', '{"weight_map": 7}'],
                         ids=["garbage", "list", "no-weight-map", "weight-map-int"])
def test_malformed_index(model_copy, text):
    shard(model_copy)
    (model_copy / INDEX).write_text(text)
    with raises(WeightFileError, model_copy / INDEX):
        load(model_copy)


def test_tensor_in_two_shards(model_copy):
    shard(model_copy, duplicate=K_PROJ)
    with raises(WeightFileError, K_PROJ, "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors"):
        load(model_copy)


# ---- tensors against the config --------------------------------------------------------------


def test_transposed_tensor(model_copy):
    rewrite_tensors(model_copy, lambda t: t.update({K_PROJ: t[K_PROJ].T.contiguous()}))
    with raises(WeightShapeError, K_PROJ, "[64, 32]", "[32, 64]"):
        load(model_copy)


@pytest.mark.parametrize("dtype, name", [(torch.int8, "I8"), (torch.float64, "F64")])
def test_unsupported_dtype(model_copy, dtype, name):
    rewrite_tensors(model_copy, lambda t: t.update({UP_PROJ: t[UP_PROJ].to(dtype)}))
    with raises(WeightShapeError, UP_PROJ, name):
        load(model_copy)


def test_missing_tensor(model_copy):
    rewrite_tensors(model_copy, lambda t: t.pop(UP_PROJ))
    with raises(MissingWeightError, UP_PROJ, "[160, 64]"):
        load(model_copy)


def test_missing_lm_head_untied(model_copy):
    rewrite_tensors(model_copy, lambda t: t.pop("lm_head.weight"))
    with raises(MissingWeightError, "lm_head.weight"):
        load(model_copy)


def test_rotary_inv_freq_buffers_ignored(model_copy, tiny_llama):
    def add_buffers(tensors):
        for layer in range(2):
            tensors[f"model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    rewrite_tensors(model_copy, add_buffers)
    ids = [1, 17, 40, 99, 3]
    reference = load(tiny_llama("gqa")[0]).logits(ids)
    np.testing.assert_allclose(load(model_copy).logits(ids), reference, atol=1e-6)


def test_unexpected_extra_tensor(model_copy):
    extra = "model.layers.0.self_attn.q_norm.weight"
    rewrite_tensors(model_copy, lambda t: t.update({extra: torch.ones(16)}))
    with raises(WeightShapeError, extra, model_copy):
        load(model_copy)


# ---- config.json -----------------------------------------------------------------------------


def test_config_missing(model_copy):
    (model_copy / "config.json").unlink()
    with raises(ConfigError, model_copy / "config.json", "not found"):
        load(model_copy)


@pytest.mark.parametrize("text", ["{'single': quotes}", "", "\xff\xfe garbage", "[1, 2]"],
                         ids=["bad-json", "empty", "not-utf8", "not-object"])
def test_config_not_json(model_copy, text):
    (model_copy / "config.json").write_bytes(text.encode("latin-1"))
    with raises(ConfigError, model_copy / "config.json"):
        load(model_copy)


def _set_rope(kind, **extra):
    def change(config):
        config["rope_parameters"] = dict(rope_type=kind, rope_theta=10000.0, factor=2.0, **extra)
    return change


def _legacy_rope_scaling(config):  # transformers < 5 layout, old "type" key
    config.pop("rope_parameters")
    config["rope_theta"] = 10000.0
    config["rope_scaling"] = {"type": "dynamic", "factor": 2.0}


@pytest.mark.parametrize(
    "change, fragments",
    [
        (_set_rope("yarn"), ["rope_type", "'yarn'"]),
        (_set_rope("dynamic"), ["'dynamic'"]),
        (_legacy_rope_scaling, ["'dynamic'"]),
        (lambda c: c["rope_parameters"].update(rope_type="llama3", factor=8.0),
         ["llama3", "low_freq_factor"]),
        (lambda c: c.update(rope_parameters="default"), ["rope parameters"]),
        (lambda c: c.update(architectures=["MistralForCausalLM"]), ["'MistralForCausalLM'"]),
        (lambda c: c.update(architectures=[], model_type="gpt2"), ["'gpt2'"]),
        (lambda c: c.update(num_key_value_heads=3), ["num_attention_heads (8)",
                                                     "num_key_value_heads (3)"]),
        (lambda c: c.pop("hidden_size"), ["'hidden_size'"]),
        (lambda c: c.pop("vocab_size"), ["'vocab_size'"]),
        (lambda c: c.pop("num_hidden_layers"), ["'num_hidden_layers'"]),
        (lambda c: c.update(hidden_act="gelu"), ["hidden_act", "'gelu'"]),
        (lambda c: c.update(num_hidden_layers=0), ["num_layers", "0"]),
        (lambda c: c.update(intermediate_size="wide"), ["'wide'"]),
        (lambda c: c.update(head_dim=15), ["head_dim"]),
    ],
    ids=["rope-yarn", "rope-dynamic", "legacy-rope-scaling", "llama3-incomplete",
         "rope-not-object", "architecture", "model-type", "heads-not-divisible",
         "no-hidden-size", "no-vocab-size", "no-layers", "gelu", "zero-layers", "non-numeric",
         "odd-head-dim"],
)
def test_bad_config(model_copy, change, fragments):
    edit_config(model_copy, change)
    with raises(ConfigError, model_copy / "config.json", *fragments):
        load(model_copy)


# ---- tokenizer, device, dtype ----------------------------------------------------------------


def test_tokenizer_missing(model_copy):
    (model_copy / "tokenizer.model").unlink()
    with raises(TokenizerError, model_copy, "tokenizer.json", "tokenizer.model"):
        load(model_copy)


def test_tokenizer_corrupt(model_copy):
    (model_copy / "tokenizer.model").write_bytes(b"\x00garbage" * 10)
    with raises(TokenizerError, "tokenizer.model"):
        load(model_copy)


def test_unknown_device(tiny_llama):
    directory = tiny_llama("gqa")[0]
    with raises(FtengineError, "'npu'", "cpu"):
        load(directory, device="npu")
    # Without the CUDA backend in the build "cuda" itself is unknown, and the error says why.
    bad_cuda = "cuda:x" if _C.has_cuda else "cuda"
    with raises(FtengineError, repr(bad_cuda), "cpu"):
        load(directory, device=bad_cuda)


@pytest.mark.parametrize("device,checkpoint,expected", [
    ("cpu", "bfloat16", "bfloat16"), ("cpu", "float16", "float32"), ("cpu", "float32", "float32"),
    ("cuda", "bfloat16", "bfloat16"), ("cuda", "float16", "float16"),
    ("cuda", "float32", "bfloat16"),
])
def test_default_weight_dtype(device, checkpoint, expected):
    """Each device keeps the checkpoint's own storage where it runs it: float16 files widen
    (exactly) to float32 on the CPU and stay float16 on the GPU; float32 runs in bfloat16 there."""
    assert engine_module._default_dtype(device, checkpoint) == expected


def test_float16_checkpoint_runs_as_float32_on_cpu(tmp_path):
    make_tiny_llama(tmp_path, "gqa", dtype=torch.float16)
    engine = load(tmp_path)
    assert engine.dtype == "float32"


@pytest.mark.parametrize("dtype", ["float16", "int8", "fp32"])
def test_unknown_dtype(tiny_llama, dtype):
    with raises(FtengineError, repr(dtype)):
        load(tiny_llama("gqa")[0], dtype=dtype)


# ---- a loaded engine: bad prompts and parameters, then still healthy -------------------------

FULL_PROMPT = list(range(3, 3 + KV_CACHE - 10))  # + 10 new tokens: the whole KV cache
FULL_PARAMS = SamplingParams(max_new_tokens=10, ignore_eos=True)
SHORT_PARAMS = SamplingParams(max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def small_cache_engine(tiny_llama):
    """An engine whose KV cache holds exactly one 64-token request, with the reference greedy
    outputs of a fresh engine to compare against after every error."""
    directory, _ = tiny_llama("gqa")
    engine = load(directory, kv_cache_tokens=KV_CACHE, block_size=16)
    assert engine._runtime.kv_cache_tokens == KV_CACHE
    reference = {
        "full": engine.generate(FULL_PROMPT, FULL_PARAMS).token_ids,
        "short": engine.generate("Hello there", SHORT_PARAMS).token_ids,
    }
    return engine, reference


def assert_healthy(engine_and_reference):
    """The engine lost nothing: a request needing every KV block is admitted (no block leaked,
    no stale request in the runtime) and greedy output is unchanged."""
    engine, reference = engine_and_reference
    assert not engine._runtime.has_unfinished()
    assert engine.generate(FULL_PROMPT, FULL_PARAMS).token_ids == reference["full"]
    assert engine.generate("Hello there", SHORT_PARAMS).token_ids == reference["short"]


@pytest.mark.parametrize(
    "prompt, error, fragments",
    [
        ([1, 5, 384], InvalidTokenError, ["384", "position 2", "[0, 384)"]),
        ([1, 10**12], InvalidTokenError, [str(10**12)]),
        ([1, -1, 7], InvalidTokenError, ["-1", "position 1"]),
        (np.array([4, -3]), InvalidTokenError, ["-3"]),
        ([1, 2.5], InvalidTokenError, ["2.5", "position 1"]),
        ([3.5, 4], InvalidTokenError, ["3.5"]),
        ([1, "a"], InvalidTokenError, ["'a'"]),
        ([1, True], InvalidTokenError, ["True"]),
        ([1, None], InvalidTokenError, ["None"]),
        ([], InvalidTokenError, ["empty"]),
        ([[]], InvalidTokenError, ["empty"]),
        (None, InvalidTokenError, ["None"]),
        (7, InvalidTokenError, ["7"]),
        (["fine", [1, 400]], InvalidTokenError, ["400"]),  # the good prompt is not started
        ([[5, 6], "fine", []], InvalidTokenError, ["empty"]),
    ],
    ids=["id-eq-vocab", "id-huge", "negative", "numpy-negative", "float", "float-first",
         "string-id", "bool-id", "none-id", "empty-ids", "empty-in-batch", "none-prompt",
         "int-prompt", "bad-in-batch", "empty-last-in-batch"],
)
@pytest.mark.parametrize("api", ["generate", "stream"])
def test_invalid_prompt(small_cache_engine, prompt, error, fragments, api):
    engine, _ = small_cache_engine
    with raises(error, *fragments):
        if api == "generate":
            engine.generate(prompt, SHORT_PARAMS)
        else:
            list(engine.stream(prompt, SHORT_PARAMS))
    assert_healthy(small_cache_engine)


def test_invalid_logits_ids(small_cache_engine):
    engine, _ = small_cache_engine
    with raises(InvalidTokenError, "999"):
        engine.logits([1, 999])
    with raises(InvalidTokenError, "empty"):
        engine.logits([])
    assert_healthy(small_cache_engine)


def test_empty_text_prompt_is_bos(small_cache_engine):
    engine, _ = small_cache_engine
    output = engine.generate("", SHORT_PARAMS)  # the tokenizer adds BOS: a one-token prompt
    assert output.prompt_token_ids == [1]
    assert len(output.token_ids) == 4


@pytest.mark.parametrize(
    "params, fragments",
    [
        (dict(temperature=-0.5), ["temperature", "-0.5"]),
        (dict(temperature=math.nan), ["temperature", "nan"]),
        (dict(temperature=math.inf), ["temperature", "inf"]),
        (dict(temperature="hot"), ["temperature", "'hot'"]),
        (dict(top_p=0.0), ["top_p", "0.0"]),
        (dict(top_p=1.5), ["top_p", "1.5"]),
        (dict(top_p=math.nan), ["top_p", "nan"]),
        (dict(top_k=-1), ["top_k", "-1"]),
        (dict(top_k=2.0), ["top_k", "2.0"]),
        (dict(max_new_tokens=0), ["max_new_tokens", "0"]),
        (dict(max_new_tokens=-3), ["max_new_tokens", "-3"]),
        (dict(max_new_tokens=4.0), ["max_new_tokens", "4.0"]),
        (dict(max_new_tokens="8"), ["max_new_tokens", "'8'"]),
        (dict(max_new_tokens=True), ["max_new_tokens", "True"]),
        (dict(repetition_penalty=0), ["repetition_penalty", "0"]),
        (dict(repetition_penalty=-1.0), ["repetition_penalty", "-1.0"]),
        (dict(stop="###"), ["stop", "single string"]),
        (dict(stop=[""]), ["stop", "''"]),
        (dict(stop=["ok", 3]), ["stop", "3"]),
        (dict(stop=None), ["stop", "None"]),
        (dict(seed=-1), ["seed", "-1"]),
        (dict(seed=2**64), ["seed", str(2**64)]),
        (dict(seed=1.5), ["seed", "1.5"]),
        (dict(stop_token_ids=[2, "x"]), ["stop_token_ids", "'x'"]),
        (dict(stop_token_ids=[-5]), ["stop_token_ids", "-5"]),
        (dict(stop_token_ids=7), ["stop_token_ids", "7"]),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_invalid_sampling_params(small_cache_engine, params, fragments):
    engine, _ = small_cache_engine
    bad = SamplingParams(**{"max_new_tokens": 4, **params})
    with raises(SamplingParamsError, *fragments):
        bad.validate()
    with raises(SamplingParamsError, *fragments):
        engine.generate("Hello", bad)
    with raises(SamplingParamsError, *fragments):
        list(engine.stream(["Hello", "there"], bad))
    assert_healthy(small_cache_engine)


def test_sampling_params_errors_are_value_errors():
    with pytest.raises(ValueError):
        SamplingParams(top_p=2.0).validate()


def test_stop_token_outside_vocab(small_cache_engine):
    engine, _ = small_cache_engine
    with raises(InvalidTokenError, "stop token id 384"):
        engine.generate("Hello", SamplingParams(max_new_tokens=2, stop_token_ids=[384]))
    with raises(InvalidTokenError, str(2**40)):
        engine.generate("Hello", SamplingParams(max_new_tokens=2, stop_token_ids=[2**40]))
    assert_healthy(small_cache_engine)


def test_extreme_but_valid_params(small_cache_engine):
    """Values valid in Python that overflow the native types must be accepted, not crash."""
    engine, _ = small_cache_engine
    for params in (
        dict(seed=2**64 - 1, temperature=1.0),  # the second request's seed + 1 wraps to 0
        dict(top_k=2**40, temperature=1.0, seed=1),
        dict(temperature=1e30, seed=2),
        dict(repetition_penalty=1e30),
        dict(stop_token_ids=[383, 0]),
    ):
        outputs = engine.generate([[5, 6, 7], [8, 9]],
                                  SamplingParams(max_new_tokens=3, ignore_eos=True, **params))
        for output in outputs:
            assert output.finish_reason in ("length", "stop"), params
            assert 1 <= len(output.token_ids) <= 3, params
    # a huge top_k means no cut: same as top_k 0
    seeded = dict(max_new_tokens=6, temperature=1.0, seed=11, ignore_eos=True)
    assert (engine.generate("Hi", SamplingParams(top_k=10**12, **seeded)).token_ids
            == engine.generate("Hi", SamplingParams(top_k=0, **seeded)).token_ids)
    assert_healthy(small_cache_engine)


# ---- context length --------------------------------------------------------------------------


def test_beyond_max_position_embeddings(tiny_llama):
    engine = load(tiny_llama("gqa")[0])  # max_position_embeddings 512, a large default cache
    with raises(ContextLengthError, "500", "max_new_tokens 20", "520", "512"):
        engine.generate([5] * 500, SamplingParams(max_new_tokens=20))
    with raises(ContextLengthError, "512"):
        engine.generate("Hello", SamplingParams(max_new_tokens=10**9))
    with raises(ContextLengthError, "513"):
        engine.logits([5] * 513)
    assert engine.logits([5] * 512).shape == (512, 384)  # exactly the context fits


def test_beyond_kv_cache(small_cache_engine):
    engine, _ = small_cache_engine
    with raises(ContextLengthError, "65", "64", "kv_cache_tokens"):
        engine.generate(FULL_PROMPT + [3], FULL_PARAMS)
    with raises(ContextLengthError, "kv_cache_tokens"):
        list(engine.stream([[5, 6], FULL_PROMPT], SamplingParams(max_new_tokens=11)))
    with raises(ContextLengthError, "65", "kv_cache_tokens"):
        engine.logits(list(range(3, 3 + KV_CACHE + 1)))
    assert engine.logits(list(range(3, 3 + KV_CACHE))).shape == (KV_CACHE, 384)
    assert_healthy(small_cache_engine)


def test_kv_cache_rounds_to_blocks(tiny_llama):
    engine = load(tiny_llama("gqa")[0], kv_cache_tokens=64)  # block_size 128: one block
    with raises(ContextLengthError, "kv_cache_tokens", str(engine._runtime.kv_cache_tokens)):
        engine.generate([5] * 100, SamplingParams(max_new_tokens=100))


def test_batch_larger_than_cache_runs_in_turn(small_cache_engine):
    """Each request fits alone but not together: they queue for the cache instead of failing
    or hanging, and give the same tokens as alone."""
    engine, reference = small_cache_engine
    outputs = engine.generate([FULL_PROMPT, FULL_PROMPT[:30], FULL_PROMPT], FULL_PARAMS)
    assert outputs[0].token_ids == outputs[2].token_ids == reference["full"]
    assert len(outputs[1].token_ids) == 10
    assert_healthy(small_cache_engine)


def test_failure_while_adding_a_batch_frees_cache(small_cache_engine):
    """If the runtime refuses the second request of a batch, the first one (already queued,
    already holding the cache once admitted) is aborted, not left behind."""
    engine, _ = small_cache_engine
    runtime = engine._runtime

    class RefusesSecond:
        calls = 0

        def __getattr__(self, name):
            return getattr(runtime, name)

        def add_request(self, *args):
            RefusesSecond.calls += 1
            if RefusesSecond.calls == 2:
                raise ValueError("refused by the runtime")
            return runtime.add_request(*args)

    engine._runtime = RefusesSecond()
    try:
        with pytest.raises(ValueError, match="refused"):
            engine.generate([FULL_PROMPT, [5, 6]], FULL_PARAMS)
    finally:
        engine._runtime = runtime
    assert_healthy(small_cache_engine)


def test_abandoned_stream_frees_cache(small_cache_engine):
    engine, _ = small_cache_engine
    events = engine.stream(FULL_PROMPT, FULL_PARAMS)
    next(events)
    events.close()  # the caller stops iterating after one token
    assert_healthy(small_cache_engine)


def test_error_inside_stream_consumer_frees_cache(small_cache_engine):
    engine, _ = small_cache_engine
    with pytest.raises(RuntimeError, match="consumer"):
        for _ in engine.stream([FULL_PROMPT[:20], FULL_PROMPT[:25]], FULL_PARAMS):
            raise RuntimeError("consumer failed")
    assert_healthy(small_cache_engine)


# ---- the command line ------------------------------------------------------------------------


def _cli(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(ftengine.__path__[0]))
    return subprocess.run([sys.executable, "-m", "ftengine.generate", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_cli_broken_model_is_one_line_error(model_copy):
    _cut("data")(model_copy)
    result = _cli("--model", str(model_copy), "--prompt", "hi")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and WEIGHTS in lines[0]
    assert result.stdout == ""


def test_cli_help():
    result = _cli("--help")
    assert result.returncode == 0
    assert "--max-new-tokens" in result.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--top-p", "0"], "top_p"),
        (["--temperature", "nan"], "temperature"),
        (["--device", "cuda"], "'cuda'"),
        (["--max-new-tokens", "100000"], "context"),
    ],
    ids=["max-new-tokens", "top-p", "temperature-nan", "device", "too-long"],
)
def test_cli_errors_in_process(tiny_llama, capsys, args, fragment):
    directory, _ = tiny_llama("gqa")
    code = cli_main(["--model", str(directory), "--prompt", "hi", "--quiet", *args])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], captured.err


@pytest.mark.parametrize("damage", ["missing-dir", "no-config", "bad-shape"])
def test_cli_broken_models_in_process(model_copy, capsys, damage):
    if damage == "missing-dir":
        target = model_copy / "absent"
    elif damage == "no-config":
        (model_copy / "config.json").unlink()
        target = model_copy
    else:
        rewrite_tensors(model_copy, lambda t: t.update({K_PROJ: t[K_PROJ].T.contiguous()}))
        target = model_copy
    code = cli_main(["--model", str(target), "--prompt", "hi"])
    captured = capsys.readouterr()
    assert code == 1
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert str(target) in lines[0] or K_PROJ in lines[0]


def test_non_finite_safetensors_weight(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    source, _ = tiny_llama("gqa")
    directory = tmp_path / "nan"
    shutil.copytree(source, directory)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightFileError, match=r"up_proj.*inf or NaN"):
        Engine.from_pretrained(directory, progress=False)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = 0.0
    tensors["model.norm.weight"] = tensors["model.norm.weight"].bfloat16()
    tensors["model.norm.weight"][0] = float("inf")
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightFileError, match="model.norm.weight"):
        Engine.from_pretrained(directory, progress=False)


@pytest.mark.parametrize("key,value", [("rms_norm_eps", 0.0), ("rope_theta", -1.0)])
def test_nonpositive_numeric_config(tiny_llama, tmp_path, key, value):
    source, _ = tiny_llama("gqa")
    directory = tmp_path / "cfg"
    shutil.copytree(source, directory)
    config = json.loads((directory / "config.json").read_text())
    if key == "rope_theta":
        config["rope_parameters"]["rope_theta"] = value
    else:
        config[key] = value
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="must be a positive number"):
        Engine.from_pretrained(directory, progress=False)


def test_host_tier_options_need_the_gpu(tiny_llama):
    # The host tier splits a GPU's KV cache; on the CPU the whole cache is host memory already.
    with raises(FtengineError, "gpu_kv_budget", "device='cuda'"):
        load(tiny_llama("gqa")[0], gpu_kv_budget=1.0)
    with raises(FtengineError, "host_tier_attention", "disk"):
        load(tiny_llama("gqa")[0], host_tier_attention="disk")
