"""python -m ftengine.convert meta: Meta Llama checkpoints (params.json + consolidated.NN.pth)
built in the test from a tiny transformers Llama, converted both ways (q/k kept with
rope_interleaved, and permuted as transformers' converter does), checked against the
transformers model they came from."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import ftengine
import numpy as np
import pytest
import torch
from ftengine import Engine, SamplingParams
from ftengine.convert import intermediate_size, main
from model_fixtures import make_tiny_llama
from transformers import LlamaForCausalLM

PROMPT_IDS = [1, 17, 250, 33, 4, 99, 120, 7, 64, 300, 12, 5] + list(range(40, 80))

# Meta name inside layers.N -> (transformers name inside model.layers.N, the axis fairscale
# splits it along over model-parallel ranks; None: replicated on every rank).
_LAYER_TENSORS = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}

# name -> (make_tiny_llama overrides, params.json entries, tok_embeddings split axis)
CASES = {
    # Llama 2 style: MHA, ParallelEmbedding split along dim 1, vocab_size -1 in params.json.
    "llama2_mha": (
        dict(variant="mha", intermediate_size=192),
        dict(multiple_of=32, vocab_size=-1),
        1,
    ),
    # Llama 3.1 style: GQA, ffn_dim_multiplier, scaled rope, vocabulary-split embedding.
    "llama31_gqa": (
        dict(variant="mha", num_key_value_heads=2, intermediate_size=160,
             max_position_embeddings=16384,
             rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                  low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192)),
        dict(multiple_of=32, ffn_dim_multiplier=0.9, n_kv_heads=2, rope_theta=500000.0,
             use_scaled_rope=True, vocab_size=384),
        0,
    ),
}


def assert_logits_close(ours, reference):
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, rtol=0, atol=2e-5 * max(scale, 1.0))


def to_meta_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of transformers' permute: rotate_half rows back to Meta's interleaved pairs."""
    rows, cols = weight.shape
    return weight.view(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def write_meta_checkpoint(model: LlamaForCausalLM, hf_dir: Path, directory: Path,
                          params_extra: dict, embedding_axis: int, shards: int = 2) -> Path:
    """Writes `model` as Meta's release would: params.json, consolidated.NN.pth per
    model-parallel rank, tokenizer.model. A tied model gets no output.weight."""
    config = model.config
    state = model.state_dict()
    full = {
        "tok_embeddings.weight": state["model.embed_tokens.weight"],
        "norm.weight": state["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        full["output.weight"] = state["lm_head.weight"]
    axes = {"tok_embeddings.weight": embedding_axis, "norm.weight": None, "output.weight": 0,
            "rope.freqs": None}
    for layer in range(config.num_hidden_layers):
        for meta_name, (hf_name, axis) in _LAYER_TENSORS.items():
            weight = state[f"model.layers.{layer}.{hf_name}"]
            if meta_name == "attention.wq.weight":
                weight = to_meta_rows(weight, config.num_attention_heads)
            elif meta_name == "attention.wk.weight":
                weight = to_meta_rows(weight, config.num_key_value_heads)
            full[f"layers.{layer}.{meta_name}"] = weight
            axes[f"layers.{layer}.{meta_name}"] = axis
    full["rope.freqs"] = torch.arange(8, dtype=torch.float32)  # a buffer the converter skips
    directory.mkdir(parents=True, exist_ok=True)
    for rank in range(shards):
        piece = {
            name: (tensor if axes[name] is None else tensor.chunk(shards, axes[name])[rank])
            .to(torch.bfloat16).clone()
            for name, tensor in full.items()
        }
        torch.save(piece, directory / f"consolidated.{rank:02d}.pth")
    params = dict(dim=config.hidden_size, n_layers=config.num_hidden_layers,
                  n_heads=config.num_attention_heads, norm_eps=config.rms_norm_eps)
    params.update(params_extra)
    (directory / "params.json").write_text(json.dumps(params))
    shutil.copyfile(hf_dir / "tokenizer.model", directory / "tokenizer.model")
    return directory


def bf16_reference(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The model with weights rounded to bfloat16 (Meta checkpoints are bfloat16), computing in
    float32."""
    rounded = LlamaForCausalLM(model.config).eval()
    rounded.load_state_dict({name: value.to(torch.bfloat16).float()
                             for name, value in model.state_dict().items()})
    return rounded


@pytest.fixture(scope="module")
def meta_checkpoint(tmp_path_factory):
    """make(case) -> (Meta checkpoint directory, bfloat16-rounded transformers reference),
    each written once per module."""
    cache = {}

    def make(case: str):
        if case not in cache:
            overrides, params_extra, embedding_axis = CASES[case]
            overrides = dict(overrides)
            variant = overrides.pop("variant")
            hf_dir = tmp_path_factory.mktemp(f"hf-{case}")
            model = make_tiny_llama(hf_dir, variant, **overrides)
            meta_dir = write_meta_checkpoint(model, hf_dir,
                                             tmp_path_factory.mktemp("meta") / "src",
                                             params_extra, embedding_axis)
            cache[case] = (meta_dir, bf16_reference(model))
        return cache[case]

    return make


def reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def reference_greedy(model, ids, new_tokens):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def load(directory: Path) -> Engine:
    return Engine.from_pretrained(directory, dtype="float32", progress=False,
                                  kv_cache_tokens=1024)


def test_intermediate_size_of_released_models():
    # (dim, multiple_of, ffn_dim_multiplier) -> intermediate_size in the released HF configs
    assert intermediate_size(4096, 256, None) == 11008  # Llama 2 7B
    assert intermediate_size(5120, 256, None) == 13824  # Llama 2 13B
    assert intermediate_size(8192, 4096, 1.3) == 28672  # Llama 2 70B, Llama 3 70B
    assert intermediate_size(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert intermediate_size(2048, 256, 1.5) == 8192  # Llama 3.2 1B
    assert intermediate_size(16384, 4096, 1.2) == 53248  # Llama 3.1 405B


@pytest.mark.parametrize("name", sorted(CASES))
def test_both_rotary_layouts_match_transformers(meta_checkpoint, name, tmp_path):
    meta_dir, reference = meta_checkpoint(name)
    kept, permuted = tmp_path / "kept", tmp_path / "permuted"
    assert main(["meta", str(meta_dir), str(kept), "--quiet"]) == 0
    assert main(["meta", str(meta_dir), str(permuted), "--permute-qk", "--dtype", "float32",
                 "--quiet"]) == 0

    kept_config = json.loads((kept / "config.json").read_text())
    permuted_config = json.loads((permuted / "config.json").read_text())
    assert kept_config["rope_interleaved"] is True
    assert "rope_interleaved" not in permuted_config
    assert kept_config["intermediate_size"] == reference.config.intermediate_size
    assert kept_config["num_key_value_heads"] == reference.config.num_key_value_heads
    assert kept_config["vocab_size"] == reference.config.vocab_size
    assert (kept_config["bos_token_id"], kept_config["eos_token_id"]) == (1, 2)  # from tokenizer
    assert (kept / "model.safetensors").is_file() and (kept / "tokenizer.model").is_file()
    assert kept_config["torch_dtype"] == "bfloat16"
    assert permuted_config["torch_dtype"] == "float32"
    if name == "llama31_gqa":
        assert kept_config["rope_scaling"]["rope_type"] == "llama3"
        assert kept_config["max_position_embeddings"] == 131072
    else:
        assert "rope_scaling" not in kept_config
        assert kept_config["max_position_embeddings"] == 4096

    expected = reference_logits(reference, PROMPT_IDS)
    kept_engine, permuted_engine = load(kept), load(permuted)
    assert kept_engine.config.rope_interleaved and not permuted_engine.config.rope_interleaved
    kept_logits = kept_engine.logits(PROMPT_IDS)
    permuted_logits = permuted_engine.logits(PROMPT_IDS)
    assert_logits_close(kept_logits, expected)
    assert_logits_close(permuted_logits, expected)
    assert_logits_close(kept_logits, permuted_logits)

    greedy = reference_greedy(reference, PROMPT_IDS[:12], 16)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    assert kept_engine.generate([PROMPT_IDS[:12]], params)[0].token_ids == greedy
    assert permuted_engine.generate([PROMPT_IDS[:12]], params)[0].token_ids == greedy

    # The permuted directory is an ordinary transformers checkpoint.
    with torch.no_grad():
        loaded = LlamaForCausalLM.from_pretrained(permuted).eval()
        assert_logits_close(loaded(torch.tensor([PROMPT_IDS])).logits[0].numpy(), expected)


def test_tied_single_shard(tmp_path):
    """One shard, no output.weight (the head shares the embedding, as in Llama 3.2 1B/3B)."""
    model = make_tiny_llama(tmp_path / "hf", "mqa_tied", intermediate_size=192)
    source = write_meta_checkpoint(model, tmp_path / "hf", tmp_path / "src",
                                   dict(multiple_of=64, n_kv_heads=1), embedding_axis=1, shards=1)
    assert main(["meta", str(source), str(tmp_path / "out"), "--quiet"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    assert_logits_close(load(tmp_path / "out").logits(PROMPT_IDS),
                        reference_logits(bf16_reference(model), PROMPT_IDS))


def test_llama3_tiktoken_checkpoint(tmp_path):
    """Meta's Llama 3 layout: a tiktoken tokenizer.model whose special tokens (begin_of_text,
    end_of_text, ..., eot_id at +9) follow the BPE ranks; the converted directory loads."""
    tokens = [bytes([b]) for b in range(256)] + [bytes([97 + i % 26, 97 + i // 26])
                                                 for i in range(44)]
    model = make_tiny_llama(tmp_path / "hf", "mha", intermediate_size=192,
                            vocab_size=len(tokens) + 256,
                            rope_parameters=dict(rope_type="default", rope_theta=500000.0))
    source = write_meta_checkpoint(model, tmp_path / "hf", tmp_path / "src",
                                   dict(multiple_of=64, rope_theta=500000.0), embedding_axis=0)
    (source / "tokenizer.model").write_bytes(
        b"".join(base64.b64encode(token) + b" %d\n" % rank for rank, token in enumerate(tokens)))
    assert main(["meta", str(source), str(tmp_path / "out"), "--quiet"]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (300, [301, 309])
    assert config["max_position_embeddings"] == 8192  # Llama 3: tiktoken tokenizer
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()

    engine = load(tmp_path / "out")
    assert engine.tokenizer.encode("ab")[0] == 300
    assert {301, 309} <= set(engine.tokenizer.eos_token_ids)
    assert_logits_close(engine.logits(PROMPT_IDS),
                        reference_logits(bf16_reference(model), PROMPT_IDS))


def test_command_line_writes_sharded_safetensors(meta_checkpoint, tmp_path):
    meta_dir, reference = meta_checkpoint("llama2_mha")
    destination = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(ftengine.__path__[0]), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "ftengine.convert", "meta", str(meta_dir), str(destination),
         "--permute-qk", "--max-shard-size", "64K", "--max-position", "256"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    index = json.loads((destination / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((destination / file).is_file() for file in files)
    assert not (destination / "model.safetensors").exists()
    assert "model.layers.1.self_attn.q_proj.weight" in index["weight_map"]
    engine = load(destination)
    assert engine.config.max_position_embeddings == 256
    assert_logits_close(engine.logits(PROMPT_IDS), reference_logits(reference, PROMPT_IDS))


def test_help_names_the_options():
    result = subprocess.run([sys.executable, "-m", "ftengine.convert", "meta", "--help"],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                                [os.path.dirname(ftengine.__path__[0]),
                                 os.environ.get("PYTHONPATH", "")])))
    assert result.returncode == 0
    for option in ("--permute-qk", "--dtype", "--max-position", "--max-shard-size"):
        assert option in result.stdout


# ---- bad input: every failure is an `error: ...` line naming the file, and exit status 1 ----


class NotATensor:
    """A class weights_only unpickling refuses to construct."""


@pytest.fixture(scope="module")
def pristine_meta(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("hf-errors")
    model = make_tiny_llama(hf_dir, "mha", intermediate_size=192)
    return write_meta_checkpoint(model, hf_dir, tmp_path_factory.mktemp("meta-errors") / "src",
                                 dict(multiple_of=32), embedding_axis=1)


@pytest.fixture
def broken(pristine_meta, tmp_path):
    """A fresh copy of a valid Meta checkpoint for a test to damage."""
    return Path(shutil.copytree(pristine_meta, tmp_path / "src"))


def run_failing(capsys, source: Path, destination: Path, *extra: str) -> str:
    assert main(["meta", str(source), str(destination), "--quiet", *extra]) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ")
    return error


def rewrite_shard(source: Path, rank: int, change) -> None:
    path = source / f"consolidated.{rank:02d}.pth"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def test_missing_params_json(broken, tmp_path, capsys):
    (broken / "params.json").unlink()
    assert "params.json not found" in run_failing(capsys, broken, tmp_path / "out")


def test_malformed_params_json(broken, tmp_path, capsys):
    (broken / "params.json").write_text('{"dim": 64, "n_heads": 4}')
    error = run_failing(capsys, broken, tmp_path / "out")
    assert "params.json" in error and "n_layers" in error


def test_no_consolidated_shards(broken, tmp_path, capsys):
    for path in broken.glob("consolidated.*.pth"):
        path.unlink()
    assert "no consolidated.NN.pth files" in run_failing(capsys, broken, tmp_path / "out")


def test_missing_rank(broken, tmp_path, capsys):
    shutil.copyfile(broken / "consolidated.01.pth", broken / "consolidated.03.pth")
    assert "lacks rank(s) [2]" in run_failing(capsys, broken, tmp_path / "out")


def test_shards_disagree_in_keys(broken, tmp_path, capsys):
    rewrite_shard(broken, 1, lambda state: state.pop("layers.0.ffn_norm.weight"))
    error = run_failing(capsys, broken, tmp_path / "out")
    assert "consolidated.01.pth and consolidated.00.pth hold different tensors" in error
    assert "layers.0.ffn_norm.weight" in error


def test_shards_disagree_in_shapes(broken, tmp_path, capsys):
    def shrink(state):
        state["layers.0.attention.wv.weight"] = state["layers.0.attention.wv.weight"][:-1]
    rewrite_shard(broken, 1, shrink)
    error = run_failing(capsys, broken, tmp_path / "out")
    assert "layers.0.attention.wv.weight" in error and "consolidated.01.pth" in error


def test_replicated_norm_differs(broken, tmp_path, capsys):
    def perturb(state):
        state["norm.weight"] = state["norm.weight"] + 1
    rewrite_shard(broken, 1, perturb)
    error = run_failing(capsys, broken, tmp_path / "out")
    assert "norm.weight should be replicated" in error


def test_tensor_missing_everywhere(broken, tmp_path, capsys):
    for rank in range(2):
        rewrite_shard(broken, rank, lambda state: state.pop("layers.0.attention.wk.weight"))
    error = run_failing(capsys, broken, tmp_path / "out")
    assert "layers.0.attention.wk.weight is missing" in error


def test_extra_layer_is_unexpected(broken, tmp_path, capsys):
    params = json.loads((broken / "params.json").read_text())
    (broken / "params.json").write_text(json.dumps(dict(params, n_layers=1)))
    error = run_failing(capsys, broken, tmp_path / "out")
    assert "does not use (layers.1." in error


def test_wrong_ffn_rounding(broken, tmp_path, capsys):
    params = json.loads((broken / "params.json").read_text())
    (broken / "params.json").write_text(json.dumps(dict(params, multiple_of=256)))
    error = run_failing(capsys, broken, tmp_path / "out")
    assert "intermediate size of 256" in error and "feed_forward.w1" in error


def test_object_in_pickle_is_refused(broken, tmp_path, capsys):
    rewrite_shard(broken, 0, lambda state: state.update(evil=NotATensor()))
    error = run_failing(capsys, broken, tmp_path / "out")
    assert "consolidated.00.pth cannot be read as a weights-only torch checkpoint" in error


def test_non_tensor_entry(broken, tmp_path, capsys):
    rewrite_shard(broken, 1, lambda state: state.update(step=3))
    error = run_failing(capsys, broken, tmp_path / "out")
    assert "consolidated.01.pth: entry 'step' is a int, not a tensor" in error


def test_truncated_shard(broken, tmp_path, capsys):
    path = broken / "consolidated.01.pth"
    path.write_bytes(path.read_bytes()[:1000])
    assert "consolidated.01.pth cannot be read" in run_failing(capsys, broken, tmp_path / "out")


def test_destination_with_a_model_needs_force(pristine_meta, tmp_path, capsys):
    destination = tmp_path / "out"
    assert main(["meta", str(pristine_meta), str(destination), "--quiet"]) == 0
    assert "--force" in run_failing(capsys, pristine_meta, destination)
    assert main(["meta", str(pristine_meta), str(destination), "--quiet", "--force",
                 "--max-shard-size", "32K"]) == 0
    assert not (destination / "model.safetensors").exists()  # the old single file is gone
    assert load(destination).config.num_layers == 2
