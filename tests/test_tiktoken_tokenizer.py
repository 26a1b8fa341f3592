"""Meta's tiktoken-format Llama 3 ``tokenizer.model``, checked against tiktoken itself.

The rank file is built here: a byte-level BPE trained with the ``tokenizers`` library on the Llama 3
split regex, written as tiktoken ranks (the 256 single bytes first, then the merged tokens in the
order they were learnt, as in Meta's file). tiktoken is a test-only dependency.
"""

import base64
import json
import random
import shutil
from pathlib import Path

import pytest
from ftengine.errors import TokenizerError
from ftengine.tiktoken_tokenizer import (
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_PATTERN,
    LLAMA3_SPECIAL_TOKENS,
    LLAMA31_SPECIAL_TOKENS,
    build_tiktoken_bpe,
    is_tiktoken_file,
    read_tiktoken_ranks,
    tokenizer_from_tiktoken,
)
from ftengine.tokenizer import IncrementalDetokenizer, Tokenizer
from tokenizer_fixtures import write_llama_style_tokenizer
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HfTokenizer

VOCAB_SIZE = 1200

_CODE = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)

for (i = 0; i < 10; ++i) { x[i] = y[i] * 2.5f; }  // C
SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name;
'''

_PROSE = (
    "The quick brown fox jumps over the lazy dog. It's what they'll do, isn't it? "
    "We've seen 1234567 tokens in 2024; 3.14159 is pi and 100% is all. "
    "Naïve café résumé Straße über façade. "
    "你好，世界！这是一个用于测试的句子。模型推理引擎。 "
    "こんにちは世界、カタカナとひらがな。 안녕하세요 세계. Привет, мир! Γειά σου κόσμε. "
    "Emoji: 😀🚀👍🏽👨‍👩‍👧 ❤️ 🇫🇷 and symbols ∑∫√ ≤ ≥ → ← © ® ™ € £ ¥. "
)

TEXTS = [
    "",
    " ",
    "hello world",
    " hello",
    "  two  spaces   three",
    "\n",
    "\n\n\n",
    "a\nb\r\nc\rd",
    "trailing spaces   \n   leading",
    "\t\ttabs\tand  \t mixed",
    "   ",
    "x" + " " * 40 + "y",
    "123 4567 89012345 0.5 -42 1e10 3,000,000",
    "I'M HERE, YOU'LL SEE, it'S 'tis 'twas",
    "don't won't can't shouldn't've",
    _CODE,
    _PROSE,
    "你好世界模型推理",
    "龘齉𝔘 😀🚀 👍🏽 ß€",
    "e\u0301 a\u0308 combining",
    "\u00a0nbsp\u3000ideographic\u2003em space",
    "zero\u200bwidth\u200djoiner",
    "<|begin_of_text|>hi<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nyo",
    "text <|end_of_text|> more <|reserved_special_token_0|>",
    "<|begin_of_text|",
    "<|not_a_token|>",
    "\x00\x01\x7f control",
    "ﬁ ligature Ⅻ roman ½ fraction ２ fullwidth",
]

_ALPHABET = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" \n\r\t.,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`")
    + [" ", " ", "  ", "\n\n", "'s", "'LL", "'re", "\u00a0", "\u3000", "\u2028"]
    + list("éüßçñøÆÑ你好世界模型推理的是こんにちは안녕Привет€£¥∑√")
    + ["😀", "🚀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "𝔘", "龘", "\u0301", "\u200d", "\ufeff", "\U0010fffd"]
    + ["<|eot_id|>", "<|begin_of_text|>", "<|python_tag|>", "<|"]
)


def _random_texts(count: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 40))) for _ in range(count)]


def _training_text() -> list[str]:
    rng = random.Random(0)
    pieces = _PROSE.split() + _CODE.split()
    lines = [_CODE, _PROSE]
    for _ in range(400):
        lines.append(" ".join(rng.choice(pieces) for _ in range(rng.randint(3, 15))))
    return lines + _random_texts(300, seed=100)


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _train_ranks() -> dict[bytes, int]:
    hf = HfTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(_training_text(), trainer=trainer)
    byte_of = {ch: b for b, ch in _gpt2_bytes_to_unicode().items()}
    ranks = {bytes([b]): b for b in range(256)}
    for piece, _ in sorted(hf.get_vocab().items(), key=lambda item: item[1]):
        token = bytes(byte_of[ch] for ch in piece)
        if token not in ranks:
            ranks[token] = len(ranks)
    return ranks


def _write_ranks(path: Path, ranks: dict[bytes, int]) -> None:
    lines = [
        f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])
    ]
    path.write_text("\n".join(lines) + "\n", encoding="ascii")


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    return _train_ranks()


@pytest.fixture(scope="module")
def tiktoken_dir(tmp_path_factory: pytest.TempPathFactory, ranks: dict[bytes, int]) -> Path:
    directory = tmp_path_factory.mktemp("tiktoken")
    _write_ranks(directory / "tokenizer.model", ranks)
    return directory


@pytest.fixture(scope="module")
def ours(tiktoken_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(tiktoken_dir)


@pytest.fixture(scope="module")
def reference(ranks: dict[bytes, int]):
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding(
        name="llama3-test",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)},
    )


def test_ranks_fixture_is_realistic(ranks: dict[bytes, int]) -> None:
    # Enough merges to exercise multi-byte CJK/emoji tokens and space-prefixed words.
    assert len(ranks) > 1000
    assert any(len(t.decode("utf-8", "ignore")) == 1 and len(t) == 3 for t in ranks)
    assert b" the" in ranks


def test_vocab_and_special_ids(ours: Tokenizer, ranks: dict[bytes, int]) -> None:
    n = len(ranks)
    assert ours.vocab_size == n + 256
    assert ours.piece_to_id("<|begin_of_text|>") == n
    assert ours.piece_to_id("<|end_of_text|>") == n + 1
    assert ours.piece_to_id("<|start_header_id|>") == n + 6
    assert ours.piece_to_id("<|eot_id|>") == n + 9
    assert ours.piece_to_id("<|reserved_special_token_250|>") == n + 255
    assert ours.bos_token_id == n
    assert ours.eos_token_id == n + 1
    assert ours.eos_token_ids == {n + 1, n + 9}
    assert all(ours.is_special(i) for i in range(n, n + 256))
    assert not ours.is_special(n - 1)
    assert ours.piece_to_id("Ġthe") == ranks[b" the"]


def test_encode_matches_tiktoken(ours: Tokenizer, reference) -> None:
    for text in TEXTS + _random_texts(400):
        expected = reference.encode(text, allowed_special="all")
        assert ours.encode(text, add_special_tokens=False) == expected, repr(text)
        assert ours.encode(text) == [ours.bos_token_id, *expected], repr(text)


def test_plain_text_round_trips(ours: Tokenizer) -> None:
    for text in TEXTS + _random_texts(200, seed=2):
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids, skip_special_tokens=False) == text, repr(text)


def test_decode_matches_tiktoken(ours: Tokenizer, reference) -> None:
    rng = random.Random(3)
    vocab = ours.vocab_size
    for _ in range(300):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 12))]
        expected = reference.decode(ids)  # bytes decoded with errors="replace"
        assert ours.decode(ids, skip_special_tokens=False) == expected, ids
        plain = [i for i in ids if i < vocab - 256]
        assert ours.decode(ids) == reference.decode(plain), ids
    # Single bytes of multi-byte characters, alone and split across tokens.
    for ids in ([0xE4], [0xE4, 0xBD], [0xE4, 0xBD, 0xA0], [0xF0, 0x9F, 0x98], [0xC3, 0x41]):
        assert ours.decode(ids) == reference.decode(ids), ids


def test_same_as_transformers_converter(tiktoken_dir: Path, ours: Tokenizer) -> None:
    pytest.importorskip("tiktoken")
    convert = pytest.importorskip("transformers.convert_slow_tokenizer")
    converted = convert.TikTokenConverter(
        vocab_file=str(tiktoken_dir / "tokenizer.model"),
        pattern=LLAMA3_PATTERN,
        extra_special_tokens=list(LLAMA3_SPECIAL_TOKENS),
    ).converted()
    for text in TEXTS + _random_texts(100, seed=4):
        assert ours.encode(text, add_special_tokens=False) == (
            converted.encode(text, add_special_tokens=False).ids
        ), repr(text)


def test_streaming_detokenizer(ours: Tokenizer) -> None:
    for text in (_PROSE, _CODE, "😀🚀👍🏽 你好"):
        ids = ours.encode(text, add_special_tokens=False)
        stream = IncrementalDetokenizer(ours)
        pieces = [stream.push(i) for i in ids]
        assert "".join(pieces) + stream.flush() == text
        assert not any("\ufffd" in p for p in pieces)


def test_default_chat_template(ours: Tokenizer) -> None:
    messages = [
        {"role": "system", "content": " Be brief. "},
        {"role": "user", "content": "hi\n"},
    ]
    prompt = ours.apply_chat_template(messages)
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = ours.encode(prompt, add_special_tokens=False)
    assert ids[0] == ours.bos_token_id
    assert ids.count(ours.piece_to_id("<|eot_id|>")) == 2
    assert ours.apply_chat_template(messages, add_generation_prompt=False).endswith("<|eot_id|>")


def test_directory_configs(tiktoken_dir: Path, tmp_path: Path, ranks: dict[bytes, int]) -> None:
    n = len(ranks)
    directory = tmp_path / "model"
    shutil.copytree(tiktoken_dir, directory)
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {"add_bos_token": False, "eos_token": "<|eot_id|>", "chat_template": "{{ 'x' }}"}
        )
    )
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [n + 1, n + 9]}))
    tok = Tokenizer.from_pretrained(directory)
    assert not tok.add_bos
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    assert tok.eos_token_id == n + 9
    assert tok.eos_token_ids == {n + 1, n + 9}
    assert tok.apply_chat_template([{"role": "user", "content": "a"}]) == "x"
    assert tok.special_tokens["eos_token"] == "<|eot_id|>"


def test_llama31_special_tokens(
    tiktoken_dir: Path, tmp_path: Path, ranks: dict[bytes, int]
) -> None:
    n = len(ranks)
    directory = tmp_path / "meta31"
    shutil.copytree(tiktoken_dir, directory)
    (directory / "params.json").write_text(json.dumps({"dim": 64, "use_scaled_rope": True}))
    tok = Tokenizer.from_pretrained(directory)
    assert tok.piece_to_id("<|eom_id|>") == n + 8
    assert tok.piece_to_id("<|python_tag|>") == n + 10
    assert tok.piece_to_id("<|reserved_special_token_2|>") == n + 11
    assert tok.piece_to_id("<|reserved_special_token_246|>") == n + 255
    assert tok.eos_token_ids == {n + 1, n + 8, n + 9}
    assert tok.encode("<|python_tag|>x", add_special_tokens=False)[0] == n + 10
    assert len(LLAMA31_SPECIAL_TOKENS) == len(LLAMA3_SPECIAL_TOKENS) == 256
    # An HF config.json with Llama 3.1 rope scaling says the same.
    (directory / "params.json").unlink()
    (directory / "config.json").write_text(
        json.dumps({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    )
    assert Tokenizer.from_pretrained(directory).piece_to_id("<|eom_id|>") == n + 8


def test_special_tokens_argument(tiktoken_dir: Path, ranks: dict[bytes, int]) -> None:
    n = len(ranks)
    path = tiktoken_dir / "tokenizer.model"
    tok = tokenizer_from_tiktoken(path, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"])
    assert tok.vocab_size == n + 2
    assert tok.eos_token_ids == {n + 1}
    # Not special here: plain text.
    assert tok.piece_to_id("<|eot_id|>") is None
    ids = tok.encode("<|eot_id|>", add_special_tokens=False)
    assert len(ids) > 1 and all(i < n for i in ids)
    assert tok.decode(ids) == "<|eot_id|>"
    tok = tokenizer_from_tiktoken(path, special_tokens={"<|end_of_text|>": n + 1, "<|x|>": n})
    assert tok.bos_token_id is None and not tok.add_bos
    assert tok.encode("a<|x|>", add_special_tokens=False)[-1] == n
    with pytest.raises(TokenizerError, match="without gaps"):
        tokenizer_from_tiktoken(path, special_tokens={"<|begin_of_text|>": n + 5})


def test_added_tokens_decoder_in_config(
    tiktoken_dir: Path, tmp_path: Path, ranks: dict[bytes, int]
) -> None:
    n = len(ranks)
    directory = tmp_path / "hf"
    shutil.copytree(tiktoken_dir, directory)
    added = {
        str(n): {"content": "<|begin_of_text|>", "special": True},
        str(n + 1): {"content": "<|eot_id|>", "special": True},
    }
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"added_tokens_decoder": added, "bos_token": "<|begin_of_text|>"})
    )
    tok = Tokenizer.from_pretrained(directory)
    assert tok.vocab_size == n + 2
    assert tok.eos_token_ids == {n + 1}
    assert tok.encode("a") == [n, ranks[b"a"]]


def test_detection(tmp_path: Path, tiktoken_dir: Path) -> None:
    assert is_tiktoken_file(tiktoken_dir / "tokenizer.model")
    spm_dir = tmp_path / "spm"
    write_llama_style_tokenizer(spm_dir, "sentencepiece")
    assert not is_tiktoken_file(spm_dir / "tokenizer.model")
    # A sentencepiece directory still loads through sentencepiece.
    assert Tokenizer.from_pretrained(spm_dir).piece_to_id("<s>") == 1
    for name, content in (
        ("empty", b""),
        ("text", b"hello world\n"),
        ("json", b'{"a": 1}\n'),
        ("binary", bytes(range(256))),
        ("no_rank", b"IQ==\n"),
    ):
        (tmp_path / name).write_bytes(content)
        assert not is_tiktoken_file(tmp_path / name), name
    assert not is_tiktoken_file(tmp_path / "does_not_exist")


def test_tokenizer_json_wins(tmp_path: Path, tiktoken_dir: Path) -> None:
    directory = tmp_path / "both"
    write_llama_style_tokenizer(directory, "byte_level_bpe", vocab_size=400)
    shutil.copy(tiktoken_dir / "tokenizer.model", directory / "tokenizer.model")
    assert Tokenizer.from_pretrained(directory).vocab_size == 400


def _bad_file(tmp_path: Path, lines: list[str]) -> Path:
    base = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(base + lines) + "\n", encoding="ascii")
    return path


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["aGk="], r"line 257: expected '<base64 token> <rank>'"),
        (["aGk= x"], r"line 257: expected"),
        (["aGk= 256 7"], r"line 257: expected"),
        (["a*k= 256"], r"line 257: expected"),
        (["aGk 256"], r"line 257: .* is not valid base64"),
        (["aGk= 256", "aGo= 256"], r"line 258: rank 256 was already given on line 257"),
        (["aGk= 256", "aGk= 257"], r"line 258: token b'hi' was already given rank 256"),
        (["aGk= 256", "aGo= 258"], r"line 258: rank 258 .*\(rank 257 is missing\)"),
        (["aGk= 1000"], r"line 257: rank 1000 but the file has 257 tokens"),
    ],
)
def test_malformed_files(tmp_path: Path, lines: list[str], message: str) -> None:
    path = _bad_file(tmp_path, lines)
    with pytest.raises(TokenizerError, match=message) as info:
        read_tiktoken_ranks(path)
    assert str(path) in str(info.value)
    # The same error through the model directory, when the file is detected as tiktoken.
    if is_tiktoken_file(path):
        with pytest.raises(TokenizerError, match=message):
            Tokenizer.from_pretrained(tmp_path)


def test_missing_bytes_and_empty(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_text("QQ== 0\nQg== 1\n", encoding="ascii")
    with pytest.raises(TokenizerError, match=r"no token for byte\(s\) 0x00, 0x01"):
        tokenizer_from_tiktoken(path)
    path.write_text("\n\n", encoding="ascii")
    with pytest.raises(TokenizerError, match="holds no tokens"):
        read_tiktoken_ranks(path)


def test_build_rejects_special_token_clash(ranks: dict[bytes, int]) -> None:
    n = len(ranks)
    with pytest.raises(TokenizerError, match="also a BPE token"):
        build_tiktoken_bpe(ranks, {"Ġthe": n})
    assert LLAMA3_CHAT_TEMPLATE.startswith("{{ bos_token }}")
