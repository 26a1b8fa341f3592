"""PanGu-α's jieba + sentencepiece tokenizer against the port's algorithm, written out here."""

from __future__ import annotations

import random
from pathlib import Path

import jieba
import pytest
import sentencepiece as spm
from ftengine.pangu_tokenizer import pangu_alpha_tokenizer
from ftengine.tokenizer import IncrementalDetokenizer

TEXTS = [
    "今天天气很好，我们去公园散步吧。",
    "PanGu-α 是一个中文预训练语言模型。\n第二行 with English",
    "数字 12345 和 符号 !?",
    "  多个  空格  ",
    "<eot>之后的文本",
]


@pytest.fixture(scope="module")
def pangu_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pangu-tokenizer")
    rng = random.Random(0)
    lines = [rng.choice(TEXTS) + " " + str(rng.randint(0, 999)) for _ in range(400)]
    segmented = [" ".join(w.translate(str.maketrans(" \n", "\u2582\u2583"))
                          for w in jieba.cut(line)) for line in lines]
    (directory / "corpus.txt").write_text("\n".join(segmented), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "vocab"),
        vocab_size=400, model_type="bpe", character_coverage=1.0,
        user_defined_symbols=["<eot>", "<sep>", "<pad>"], minloglevel=2)
    return directory


def reference_encode(processor, text):
    """The port's GPTPanguTokenizer.tokenize + convert_tokens_to_ids (jieba splits "<eot>"
    typed into text, so no segment is a special token)."""
    translator = str.maketrans(" \n", "\u2582\u2583")
    tokens = [x.translate(translator) for x in jieba.cut(text, cut_all=False)]
    return processor.encode(" ".join(tokens))


def test_encode_decode_follow_the_port(pangu_dir):
    tokenizer = pangu_alpha_tokenizer(pangu_dir)
    processor = spm.SentencePieceProcessor(model_file=str(pangu_dir / "vocab.model"))
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == reference_encode(processor, text), text
        expected = processor.decode(ids).replace(" ", "").replace("\u2582", " ")
        assert tokenizer.decode(ids, skip_special_tokens=False) == expected.replace("\u2583", "\n")
    assert tokenizer.eos_token_ids == {processor.piece_to_id("<eot>")}
    assert tokenizer.bos_token_id is None


def test_a_directory_with_vocab_model_loads_it(pangu_dir):
    from ftengine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(pangu_dir)
    assert tokenizer.encode(TEXTS[0]) == pangu_alpha_tokenizer(pangu_dir).encode(TEXTS[0])


def test_streaming_concatenates_to_decode(pangu_dir):
    tokenizer = pangu_alpha_tokenizer(pangu_dir)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        detokenizer = IncrementalDetokenizer(tokenizer)
        streamed = "".join(detokenizer.push(i) for i in ids) + detokenizer.flush()
        assert streamed == tokenizer.decode(ids)
