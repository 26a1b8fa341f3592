"""Tiny tokenizer directories for tests, built locally (no download) in a few hundred milliseconds.

Import from a test file as ``from tokenizer_fixtures import write_llama_style_tokenizer``: pytest
puts the directory of a test file that has no ``__init__.py`` on ``sys.path`` (rootdir-based
"prepend" import mode).
"""

import json
import random
from pathlib import Path

import sentencepiece as spm
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HfTokenizer

TOKENIZER_KINDS = ("sentencepiece", "sentencepiece_json", "byte_level_bpe")

# Llama-2 chat template, shortened; it exercises raise_exception, bos_token/eos_token and whitespace
# control.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# Llama-3.1 style: a dated system header (strftime_now), tools serialised with tojson,
# trim/lstrip-sensitive layout.
LLAMA3_CHAT_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=2) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'
        + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)

_WORDS = (
    "the quick brown fox jumps over lazy dog inference engine attention kernel tensor model token "
    "stream batch cache prefill decode sample weight layer matrix vector hello world naïve café "
    "résumé Straße don't it's we'll 2024 3.14 100% x+y=z (a) [b] {c} <tag> a_b c-d e/f"
).split()
# Frequent enough to become pieces of their own.
_COMMON_CJK = "你好世界模型推理的是在我们"
# Appear once each, so character_coverage drops them and they are only reachable through byte
# fallback.
_RARE = "龘齉𝔘😀🚀👍🏽ß€"


def _training_text(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(600):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), "".join(rng.sample(_COMMON_CJK, 3)))
        lines.append(" ".join(words))
    lines.extend(_RARE)
    return lines


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2), encoding="utf-8")


def _train_sentencepiece(directory: Path, vocab_size: int) -> None:
    text_file = directory / "corpus.txt"
    text_file.write_text("\n".join(_training_text()), encoding="utf-8")
    # The settings of Llama's tokenizer.model: BPE with byte fallback, digits split, unk/bos/eos =
    # 0/1/2.
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(directory / "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=0.9995,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    text_file.unlink()
    (directory / "tokenizer.vocab").unlink()


def _sentencepiece_config() -> dict:
    return {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": {
            "__type": "AddedToken",
            "content": "<s>",
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "special": True,
        },
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "chat_template": LLAMA2_CHAT_TEMPLATE,
    }


def _write_sentencepiece(directory: Path, vocab_size: int) -> int:
    _train_sentencepiece(directory, vocab_size)
    _write_json(directory / "tokenizer_config.json", _sentencepiece_config())
    _write_json(directory / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return vocab_size


def _write_sentencepiece_json(directory: Path, vocab_size: int) -> int:
    # transformers' own conversion, so the tokenizer.json is what a Hub Llama-2 checkpoint ships.
    from transformers import LlamaTokenizer

    _train_sentencepiece(directory, vocab_size)
    _write_json(directory / "tokenizer_config.json", _sentencepiece_config())
    LlamaTokenizer.from_pretrained(str(directory)).backend_tokenizer.save(
        str(directory / "tokenizer.json")
    )
    (directory / "tokenizer.model").unlink()
    _write_json(directory / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    return vocab_size


def _write_byte_level_bpe(directory: Path, vocab_size: int) -> int:
    # Llama-3 / SmolLM layout: GPT-2 byte-level BPE, special tokens after the merges, BOS added by
    # the post-processor.
    tokenizer = HfTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(LLAMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL_TOKENS]
    )
    bos_id = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos_id)],
    )
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "clean_up_tokenization_spaces": False,
            "chat_template": LLAMA3_CHAT_TEMPLATE,
        },
    )
    eos_ids = [tokenizer.token_to_id("<|end_of_text|>"), tokenizer.token_to_id("<|eot_id|>")]
    _write_json(
        directory / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_ids}
    )
    return tokenizer.get_vocab_size(with_added_tokens=True)


def write_llama_style_tokenizer(
    directory: str | Path, kind: str = "sentencepiece", vocab_size: int = 512
) -> int:
    """Write a tiny Llama-style tokenizer into ``directory`` and return its vocabulary size (ids are
    < it).

    ``kind``:
      * ``"sentencepiece"``: ``tokenizer.model`` (BPE, byte fallback, ``<unk>``/``<s>``/``</s>`` =
        0/1/2) only, Llama-2 chat template, ``add_bos_token`` true;
      * ``"sentencepiece_json"``: the same model converted by transformers to ``tokenizer.json`` (no
        ``tokenizer.model``), as Hub Llama-2 checkpoints ship it;
      * ``"byte_level_bpe"``: GPT-2 style byte-level BPE ``tokenizer.json`` with Llama-3 special
        tokens, post-processor adding ``<|begin_of_text|>``, eos ``<|eot_id|>`` plus
        ``<|end_of_text|>`` in ``generation_config.json``, Llama-3.1 style chat template.

    Also writes ``tokenizer_config.json`` and ``generation_config.json`` but never ``config.json``,
    which belongs to the caller's model. ``vocab_size`` must be at least 400 for the sentencepiece
    kinds (259 control and byte pieces plus every frequent character of the training text).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "sentencepiece":
        return _write_sentencepiece(directory, vocab_size)
    if kind == "sentencepiece_json":
        return _write_sentencepiece_json(directory, vocab_size)
    if kind == "byte_level_bpe":
        return _write_byte_level_bpe(directory, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {TOKENIZER_KINDS}")
