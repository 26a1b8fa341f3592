"""Tokenizer, chat templates and streaming detokenizer, checked against transformers."""

import json
import random
import shutil
from pathlib import Path

import pytest
import sentencepiece
from ftengine.errors import TokenizerError
from ftengine.tokenizer import IncrementalDetokenizer, Tokenizer
from tokenizer_fixtures import TOKENIZER_KINDS, write_llama_style_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "hello world",
    " hello",
    "  two spaces",
    " ",
    "",
    "\n",
    "a\nb",
    "line\n\n  x",
    "naïve café 3.14 100%",
    "你好世界 龘 😀🚀 👍🏽",
    "<s>[INST] hi [/INST]",
    "Hello</s> there",
    "<s> x</s>y",
    "<|begin_of_text|>hi<|eot_id|> <|start_header_id|>",
    "<unk>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief.  "},
        {"role": "user", "content": "  你好 😀"},
        {"role": "assistant", "content": "hello", "tool_calls": None},
        {"role": "user", "content": "again\n"},
    ],
]

STREAM_TEXTS = ["你好世界 龘 😀🚀 hello", "naïve café 👍🏽 ß€ 齉𝔘", " world  spaced\n\nlines"]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {kind: root / kind for kind in TOKENIZER_KINDS}
    for kind, directory in dirs.items():
        write_llama_style_tokenizer(directory, kind)
    return dirs


@pytest.fixture(scope="module", params=TOKENIZER_KINDS)
def pair(request: pytest.FixtureRequest, tokenizer_dirs: dict[str, Path]) -> tuple:
    directory = tokenizer_dirs[request.param]
    return Tokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(
        directory
    )


def _copy_with(src: Path, dst: Path, config_edit=None, tokenizer_json_edit=None) -> Path:
    shutil.copytree(src, dst)
    for name, edit in (
        ("tokenizer_config.json", config_edit),
        ("tokenizer.json", tokenizer_json_edit),
    ):
        if edit is not None:
            value = json.loads((dst / name).read_text(encoding="utf-8"))
            edit(value)
            (dst / name).write_text(json.dumps(value), encoding="utf-8")
    return dst


def test_fixture_vocab_size(tokenizer_dirs: dict[str, Path]) -> None:
    for directory in tokenizer_dirs.values():
        assert Tokenizer.from_pretrained(directory).vocab_size == 512


def test_encode_matches_transformers(pair: tuple) -> None:
    ours, reference = pair
    for text in TEXTS:
        for add_special_tokens in (True, False):
            expected = reference.encode(text, add_special_tokens=add_special_tokens)
            assert ours.encode(text, add_special_tokens) == expected, (text, add_special_tokens)


def test_decode_matches_transformers(pair: tuple) -> None:
    ours, reference = pair
    rng = random.Random(0)
    sequences = [ours.encode(text) for text in TEXTS]
    sequences += [
        [rng.randrange(ours.vocab_size) for _ in range(rng.randint(1, 12))] for _ in range(500)
    ]
    for ids in sequences:
        for skip in (True, False):
            assert ours.decode(ids, skip) == reference.decode(ids, skip_special_tokens=skip), ids


def test_special_token_ids_match_transformers(pair: tuple) -> None:
    ours, reference = pair
    assert ours.bos_token_id == reference.bos_token_id
    assert ours.eos_token_id == reference.eos_token_id
    assert ours.vocab_size == len(reference)
    assert all(ours.is_special(i) for i in reference.all_special_ids)


def test_eos_ids_merge_generation_config(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    byte_level = Tokenizer.from_pretrained(tokenizer_dirs["byte_level_bpe"])
    eot, end_of_text = (
        byte_level.piece_to_id("<|eot_id|>"),
        byte_level.piece_to_id("<|end_of_text|>"),
    )
    assert byte_level.eos_token_ids == {eot, end_of_text}
    assert byte_level.eos_token_id == eot  # tokenizer_config's eos_token comes first

    directory = _copy_with(tokenizer_dirs["sentencepiece"], tmp_path / "m")
    (directory / "generation_config.json").unlink()
    (directory / "config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert Tokenizer.from_pretrained(directory).eos_token_ids == {2, 7}


def test_chat_template_matches_transformers(pair: tuple) -> None:
    ours, reference = pair
    assert ours.has_chat_template
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            kwargs = {"add_generation_prompt": add_generation_prompt, "date_string": "26 Jul 2024"}
            expected = reference.apply_chat_template(messages, tokenize=False, **kwargs)
            assert ours.apply_chat_template(messages, **kwargs) == expected


def test_chat_template_tools_and_strftime(tokenizer_dirs: dict[str, Path]) -> None:
    directory = tokenizer_dirs["byte_level_bpe"]
    ours = Tokenizer.from_pretrained(directory)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    tools = [
        {"type": "function", "function": {"name": "get_time", "description": "<now> & später"}}
    ]
    messages = CONVERSATIONS[1]
    expected = reference.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    rendered = ours.apply_chat_template(messages, tools=tools)
    assert rendered == expected
    assert '"<now> & später"' in rendered  # tojson neither HTML-escapes nor ASCII-escapes
    # Rendered prompts already hold the BOS text, so they are encoded without adding another one.
    assert ours.encode(rendered, add_special_tokens=False) == reference.encode(
        rendered, add_special_tokens=False
    )


def test_chat_template_raise_exception(tokenizer_dirs: dict[str, Path]) -> None:
    ours = Tokenizer.from_pretrained(tokenizer_dirs["sentencepiece"])
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TokenizerError, match="roles must alternate"):
        ours.apply_chat_template(messages)


def test_chat_template_sources(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    named = [
        {"name": "default", "template": "D{{ messages[0].content }}"},
        {"name": "tool_use", "template": "T"},
    ]
    directory = _copy_with(
        tokenizer_dirs["sentencepiece"], tmp_path / "named", lambda c: c.update(chat_template=named)
    )
    ours = Tokenizer.from_pretrained(directory)
    assert ours.chat_template_names == ["default", "tool_use"]
    assert ours.apply_chat_template([{"role": "user", "content": "x"}]) == "Dx"
    assert ours.apply_chat_template([{"role": "user", "content": "x"}], tools=[]) == "T"
    with pytest.raises(TokenizerError, match="no chat template named 'rag'"):
        ours.apply_chat_template([], template_name="rag")

    # chat_template.jinja, as transformers 5 saves it, wins over tokenizer_config.json.
    (directory / "chat_template.jinja").write_text("J{{ bos_token }}", encoding="utf-8")
    assert Tokenizer.from_pretrained(directory).apply_chat_template([]) == "J<s>"


def test_no_chat_template(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    directory = _copy_with(
        tokenizer_dirs["sentencepiece"], tmp_path / "m", lambda c: c.pop("chat_template")
    )
    ours = Tokenizer.from_pretrained(directory)
    assert not ours.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


# transformers 5 honours add_bos_token/add_eos_token only without tokenizer.json; with one, the
# post-processor alone decides, and a missing add_bos_token means no BOS.
BOS_VARIANTS = {
    "sp_flag_absent": ("sentencepiece", lambda c: c.pop("add_bos_token"), None),
    "sp_bos_false": ("sentencepiece", lambda c: c.update(add_bos_token=False), None),
    "sp_eos_true": ("sentencepiece", lambda c: c.update(add_eos_token=True), None),
    "sp_legacy": ("sentencepiece", lambda c: c.update(legacy=True), None),
    "json_bos_false_ignored": ("sentencepiece_json", lambda c: c.update(add_bos_token=False), None),
    "json_eos_true_ignored": ("sentencepiece_json", lambda c: c.update(add_eos_token=True), None),
    "json_no_post_processor": ("byte_level_bpe", None, lambda t: t.update(post_processor=None)),
    "json_no_post_processor_bos_true": (
        "byte_level_bpe",
        lambda c: c.update(add_bos_token=True),
        lambda t: t.update(post_processor=None),
    ),
}


@pytest.mark.parametrize("variant", sorted(BOS_VARIANTS))
def test_bos_eos_policy_matches_transformers(
    variant: str, tokenizer_dirs: dict[str, Path], tmp_path: Path
) -> None:
    kind, config_edit, json_edit = BOS_VARIANTS[variant]
    directory = _copy_with(tokenizer_dirs[kind], tmp_path / variant, config_edit, json_edit)
    ours = Tokenizer.from_pretrained(directory)
    reference = transformers.AutoTokenizer.from_pretrained(directory)
    for text in ["hello", "<s>[INST] hi", " x", ""]:
        assert ours.encode(text) == reference.encode(text), text


def test_constructor_from_backend_objects(tokenizer_dirs: dict[str, Path]) -> None:
    directory = tokenizer_dirs["sentencepiece"]
    loaded = Tokenizer.from_pretrained(directory)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    built = Tokenizer(processor, bos_token_id=1, eos_token_ids=[2], add_bos=True)
    assert built.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    for text in TEXTS:
        assert built.encode(text) == loaded.encode(text)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        Tokenizer(processor, bos_token_id=1, eos_token_ids=[9999], add_bos=True)


def _random_generations(tokenizer: Tokenizer, rng: random.Random, count: int) -> list[list[int]]:
    sequences = []
    for index in range(count):
        if index % 2:
            sequences.append(
                [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 16))]
            )
            continue
        # Slices of real text cut anywhere, so byte pieces of one character get split between
        # windows.
        ids = tokenizer.encode(rng.choice(STREAM_TEXTS), add_special_tokens=False)
        start = rng.randrange(len(ids))
        sequences.append(
            ids[start : start + rng.randint(1, len(ids))]
            + [tokenizer.eos_token_id] * (index % 4 == 0)
        )
    return sequences


def test_incremental_detokenizer_matches_decode(pair: tuple) -> None:
    ours, _ = pair
    rng = random.Random(1)
    prompt = ours.encode("hello 你好")
    prompt_text = {skip: ours.decode(prompt, skip) for skip in (True, False)}
    for ids in _random_generations(ours, rng, 600):
        for skip in (True, False):
            stream = IncrementalDetokenizer(ours, skip_special_tokens=skip)
            pieces = [stream.push(i) for i in ids]
            assert "".join(pieces) + stream.flush() == ours.decode(ids, skip), ids

            stream = IncrementalDetokenizer(ours, prompt, skip_special_tokens=skip)
            text = "".join(stream.push(i) for i in ids) + stream.flush()
            assert prompt_text[skip] + text == ours.decode(prompt + ids, skip), ids


def test_incremental_detokenizer_holds_partial_characters(pair: tuple) -> None:
    ours, _ = pair
    text = " 龘😀 ok 🚀"
    ids = ours.encode(text, add_special_tokens=False)
    stream = IncrementalDetokenizer(ours, ours.encode("hi"))
    # A trailing run of byte-fallback pieces is held until a later token (or flush) shows where it
    # ends.
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(ids) > len(text)  # the fixture really splits these characters over several tokens


def test_incremental_detokenizer_window_stays_small(pair: tuple) -> None:
    ours, _ = pair
    ids = ours.encode(" hello world" * 200, add_special_tokens=False)
    stream = IncrementalDetokenizer(ours)
    for token_id in ids:
        stream.push(token_id)
        assert len(stream._ids) < 8


def test_missing_and_malformed_files(tokenizer_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json, tokenizer.model or vocab.model"):
        Tokenizer.from_pretrained(tmp_path / "empty")

    bad_config = _copy_with(tokenizer_dirs["byte_level_bpe"], tmp_path / "bad_config")
    (bad_config / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(bad_config)

    bad_json = _copy_with(tokenizer_dirs["byte_level_bpe"], tmp_path / "bad_json")
    (bad_json / "tokenizer.json").write_text('{"model": 3}', encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_pretrained(bad_json)

    bad_model = _copy_with(tokenizer_dirs["sentencepiece"], tmp_path / "bad_model")
    (bad_model / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_pretrained(bad_model)

    bad_generation = _copy_with(tokenizer_dirs["sentencepiece"], tmp_path / "bad_generation")
    (bad_generation / "generation_config.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TokenizerError, match="generation_config.json"):
        Tokenizer.from_pretrained(bad_generation)

    unknown_bos = _copy_with(
        tokenizer_dirs["sentencepiece"],
        tmp_path / "unknown_bos",
        lambda c: c.update(bos_token="<bos>"),
    )
    with pytest.raises(TokenizerError, match="'<bos>'"):
        Tokenizer.from_pretrained(unknown_bos)

    bad_template = _copy_with(
        tokenizer_dirs["sentencepiece"],
        tmp_path / "bad_template",
        lambda c: c.update(chat_template="{% if %}"),
    )
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        Tokenizer.from_pretrained(bad_template)
