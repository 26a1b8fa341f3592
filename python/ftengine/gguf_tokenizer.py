"""The tokenizer a GGUF file describes in its metadata, built with the ``tokenizers`` library.

A GGUF file carries no ``tokenizer.json``: llama.cpp stores the vocabulary, merges, scores, token
types and special token ids as ``tokenizer.ggml.*`` metadata. This module rebuilds from them the
same ``tokenizers.Tokenizer`` that transformers 5 builds for ``AutoTokenizer.from_pretrained(dir,
gguf_file=...)`` (``transformers/integrations/gguf/gguf_tokenizer_mapping.py``), so that encodes and
decodes match it on the same file:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE from tokens and merges; tokens written outside
  the byte alphabet are respelled byte by byte; CONTROL tokens (type 3) become special added tokens
  (only those spelled in the byte alphabet), USER_DEFINED ones (type 4) plain added tokens; the
  split regex follows ``tokenizer.ggml.pre`` where transformers knows it (else GPT-2's).
* ``tokenizer.ggml.model == "llama"``: sentencepiece-style BPE with byte fallback; merges from the
  file or, as in every Llama-2 style file, rebuilt from the scores; "▁" prepended to the first
  segment and one leading space stripped on decode.

Where llama.cpp and transformers differ, we follow transformers except for
``tokenizer.ggml.add_space_prefix == False`` (transformers ignores it; we prepend no "▁", as
llama.cpp does) and the EOT/EOM ids, which are added to the stop ids as llama.cpp stops on them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from .errors import TokenizerError, WeightFileError
from .tokenizer import HfTokenizersBackend, Tokenizer, bytes_to_unicode

# GGUF token types (llama.cpp's llama_token_type, the same numbers as sentencepiece's).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = range(
    1, 7
)

_SPIECE_UNDERLINE = "▁"

# Split regexes transformers installs for these tokenizer.ggml.pre values (set_split_regex); any
# other value keeps GPT-2's regex built into pre_tokenizers.ByteLevel.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}

# Architectures whose "llama" (sentencepiece) vocabulary transformers builds differently (Gemma
# respells whitespace tokens and orders merges by position, Phi-3 prefixes through a normalizer).
_UNSUPPORTED_SPM_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "phi3")


_BYTE_SPELLING = bytes_to_unicode()
_BYTE_ALPHABET = frozenset(_BYTE_SPELLING.values())


# --------------------------------------------------------------------------------------------------
# GGUF reader -> plain dict


def gguf_metadata(reader: Any, source: str = "GGUF file") -> dict[str, Any]:
    """The metadata of a ``gguf.GGUFReader`` as ``{key: value}``: strings decoded (UTF-8), numbers
    as Python ints/floats/bools, arrays as lists. The reader's own ``GGUF.*`` header entries
    (version, counts) are left out.

    A value that cannot be decoded raises :class:`TokenizerError` for ``tokenizer.*`` keys and
    :class:`WeightFileError` otherwise, naming the key and ``source``.
    """
    try:
        fields = reader.fields
        items = list(fields.items())
    except Exception as exc:  # noqa: BLE001 - a broken reader object
        raise WeightFileError(f"{source}: cannot read the GGUF metadata: {exc}") from exc
    metadata: dict[str, Any] = {}
    for key, field in items:
        if not isinstance(key, str) or key.startswith("GGUF."):
            continue
        metadata[key] = _field_value(field, key, source)
    return metadata


def _field_value(field: Any, key: str, source: str) -> Any:
    error = TokenizerError if key.startswith("tokenizer.") else WeightFileError
    try:
        types = list(field.types)
        if not types:
            raise ValueError("the field has no value type")
        if types[0] == 9 and len(types) > 1 and types[1] == 9:
            # GGUFValueType.ARRAY (9) nested in an array: gguf-py flattens it, so it is unreadable.
            raise ValueError("arrays of arrays are not supported")
        if hasattr(field, "contents"):
            value = field.contents()
        else:  # older gguf-py: decode the parts ourselves
            value = _decode_parts(field, types)
    except UnicodeDecodeError as exc:
        raise error(
            f"{source}: GGUF metadata {key!r} holds a string that is not UTF-8: {exc}"
        ) from exc
    except Exception as exc:  # noqa: BLE001 - gguf-py raises many types on malformed fields
        raise error(f"{source}: GGUF metadata {key!r} is malformed: {exc}") from exc
    if value is None:
        raise error(f"{source}: GGUF metadata {key!r} has no value")
    return value


def _decode_parts(field: Any, types: list[Any]) -> Any:
    def as_string(part: Any) -> str:
        return bytes(part.tobytes()).decode("utf-8")

    if types[0] == 9:  # ARRAY
        if len(types) > 1 and types[1] == 8:  # STRING
            return [as_string(field.parts[i]) for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if types[0] == 8:
        return as_string(field.parts[-1])
    return field.parts[-1].tolist()[0]


# --------------------------------------------------------------------------------------------------
# metadata -> Tokenizer


def tokenizer_from_gguf(fields: Mapping[str, Any], source: str) -> Tokenizer:
    """The :class:`Tokenizer` described by the ``tokenizer.*`` entries of GGUF metadata ``fields``
    (as returned by :func:`gguf_metadata`); ``source`` names the file in error messages.
    """
    meta = _Metadata(fields, source)
    model = meta.get("tokenizer.ggml.model", str)
    if model is None:
        raise TokenizerError(
            f"{source}: the GGUF file describes no tokenizer (tokenizer.ggml.model is missing)"
        )
    tokens = meta.string_list("tokenizer.ggml.tokens")
    if tokens is None or not tokens:
        raise TokenizerError(f"{source}: GGUF metadata tokenizer.ggml.tokens is missing or empty")
    token_types = meta.number_list("tokenizer.ggml.token_type", int, len(tokens))
    token_types = token_types or []

    if model == "gpt2":
        hf_tokenizer = _byte_level_bpe(meta, tokens, token_types)
    elif model == "llama":
        architecture = fields.get("general.architecture")
        if architecture in _UNSUPPORTED_SPM_ARCHITECTURES:
            raise TokenizerError(
                f"{source}: sentencepiece vocabularies of {architecture} GGUF files are not "
                "supported (they need architecture-specific handling)"
            )
        hf_tokenizer = _sentencepiece_bpe(meta, tokens, token_types)
    else:
        raise TokenizerError(
            f"{source}: GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not supported; "
            "supported: 'gpt2' (byte-level BPE) and 'llama' (sentencepiece)"
        )
    _add_gguf_special_tokens(hf_tokenizer, tokens, token_types, byte_level=model == "gpt2")
    if model == "gpt2":
        split = PRE_TOKENIZER_SPLITS.get(fields.get("tokenizer.ggml.pre"))
        if split is not None:
            hf_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )

    ids = {
        name: meta.token_id(f"tokenizer.ggml.{key}", len(tokens))
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
            ("eot", "eot_token_id"),
            ("eom", "eom_token_id"),
        )
    }
    # transformers names these tokens by their text in the file; they become special (skipped by
    # decode) like the tokens a tokenizer_config.json names.
    special_tokens = {
        name: tokens[token_id]
        for name, token_id in ids.items()
        if token_id is not None and name.endswith("_token")
    }
    backend = HfTokenizersBackend(hf_tokenizer)
    backend.mark_special(special_tokens.values())

    add_bos = meta.get("tokenizer.ggml.add_bos_token", bool)
    add_eos = meta.get("tokenizer.ggml.add_eos_token", bool)
    bos_id = ids["bos_token"]
    if add_bos is None:
        # transformers (like llama.cpp) adds BOS to a sentencepiece vocabulary that does not say.
        add_bos = model == "llama" and bos_id is not None
    if add_bos and bos_id is None:
        raise TokenizerError(
            f"{source}: tokenizer.ggml.add_bos_token is set but tokenizer.ggml.bos_token_id is "
            "missing"
        )
    eos_ids = [i for i in (ids["eos_token"], ids["eot"], ids["eom"]) if i is not None]
    if add_eos and ids["eos_token"] is None:
        raise TokenizerError(
            f"{source}: tokenizer.ggml.add_eos_token is set but tokenizer.ggml.eos_token_id is "
            "missing"
        )

    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        add_bos=bool(add_bos),
        add_eos=bool(add_eos),
        chat_template=_chat_templates(meta) or None,
        special_tokens=special_tokens,
    )


class _Metadata:
    """Typed access to GGUF metadata, raising TokenizerError that names the key and file."""

    def __init__(self, fields: Mapping[str, Any], source: str) -> None:
        self.fields = fields
        self.source = source

    def _fail(self, key: str, what: str) -> TokenizerError:
        return TokenizerError(f"{self.source}: GGUF metadata {key} {what}")

    def get(self, key: str, kind: type) -> Any:
        value = self.fields.get(key)
        if value is None:
            return None
        if kind is bool:
            if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
                return bool(value)
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif isinstance(value, kind):
            return value
        raise self._fail(key, f"must be a {kind.__name__}, found {type(value).__name__}")

    def string_list(self, key: str) -> list[str] | None:
        value = self.fields.get(key)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            raise self._fail(key, f"must be an array of strings, found {type(value).__name__}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise self._fail(key, f"must hold strings; entry {index} is {item!r}")
        return list(value)

    def number_list(self, key: str, kind: type, length: int) -> list[Any] | None:
        value = self.fields.get(key)
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            raise self._fail(key, f"must be an array, found {type(value).__name__}")
        if len(value) != length:
            raise self._fail(key, f"has {len(value)} entries for {length} tokens")
        accepted = (int,) if kind is int else (int, float)
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, accepted):
                raise self._fail(key, f"must hold {kind.__name__}s; entry {index} is {item!r}")
        return [kind(item) for item in value]

    def token_id(self, key: str, vocab_size: int) -> int | None:
        value = self.get(key, int)
        if value is not None and not 0 <= value < vocab_size:
            raise self._fail(key, f"is {value}, outside the vocabulary of {vocab_size} tokens")
        return value


def _parse_merges(meta: _Metadata, key: str) -> list[tuple[str, str]] | None:
    merges = meta.string_list(key)
    if merges is None:
        return None
    pairs = []
    for index, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise meta._fail(
                key, f"entry {index} ({merge!r}) is not two tokens separated by a space"
            )
        pairs.append((parts[0], parts[1]))
    return pairs


def _bpe(meta: _Metadata, **kwargs: Any) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer(models.BPE(dropout=None, **kwargs))
    except Exception as exc:  # tokenizers raises a bare Exception on merges naming unknown tokens
        raise TokenizerError(
            f"{meta.source}: the GGUF vocabulary and merges do not form a BPE model: {exc}"
        ) from exc


def _byte_level_bpe(
    meta: _Metadata, tokens: list[str], token_types: Sequence[int]
) -> tokenizers.Tokenizer:
    """transformers' ``byte_level_tokenizer`` (a GPT2Tokenizer from vocab and merges)."""
    merges = _parse_merges(meta, "tokenizer.ggml.merges")
    if merges is None:
        raise TokenizerError(
            f"{meta.source}: GGUF metadata tokenizer.ggml.merges is missing; a 'gpt2' tokenizer "
            "needs its merges"
        )
    vocab = {_byte_spelling(token): index for index, token in enumerate(tokens)}
    tokenizer = _bpe(
        meta,
        vocab=vocab,
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix="",
        fuse_unk=False,
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_spelling(token: str) -> str:
    if set(token) <= _BYTE_ALPHABET:
        return token
    return "".join(_BYTE_SPELLING[byte] for byte in token.encode("utf-8"))


def _sentencepiece_bpe(
    meta: _Metadata, tokens: list[str], token_types: Sequence[int]
) -> tokenizers.Tokenizer:
    """transformers' ``sentencepiece_tokenizer`` (a LlamaTokenizer from vocab and merges)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = _parse_merges(meta, "tokenizer.ggml.merges")
    if merges is None:
        scores = meta.number_list("tokenizer.ggml.scores", float, len(tokens))
        if scores is None:
            raise TokenizerError(
                f"{meta.source}: a 'llama' GGUF tokenizer needs tokenizer.ggml.scores (or "
                "tokenizer.ggml.merges); neither is present"
            )
        merges = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
    tokenizer = _bpe(meta, vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True)
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", bool)
    add_prefix = True if add_prefix is None else add_prefix
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_SPIECE_UNDERLINE,
        prepend_scheme="first" if add_prefix else "never",
        split=False,
    )
    sequence = [decoders.Replace(_SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        sequence.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(sequence)
    return tokenizer


def _merges_from_scores(
    vocab: Mapping[str, int], scores: Mapping[str, float]
) -> list[tuple[str, str]]:
    """transformers' ``generate_merges(vocab, scores)``: every split of a token into two tokens,
    best score first (ties: longer left, then longer right piece first).
    """
    merges = []
    for merge, score in scores.items():
        local = [
            (merge[:i], merge[i:], score)
            for i in range(1, len(merge))
            if merge[:i] in vocab and merge[i:] in vocab
        ]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_gguf_special_tokens(
    tokenizer: tokenizers.Tokenizer,
    tokens: list[str],
    token_types: Sequence[int],
    byte_level: bool,
) -> None:
    """transformers' ``add_gguf_special_tokens``: CONTROL tokens become special added tokens (in a
    byte-level vocabulary only those spelled in the byte alphabet: others are llama.cpp mislabels),
    USER_DEFINED ones plain added tokens matched whole in the text.
    """
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types, strict=False)  # no types: none special
        if kind == TOKEN_CONTROL and (not byte_level or set(token) <= _BYTE_ALPHABET)
    ]
    if control:
        tokenizer.add_special_tokens(control)
    vocab = tokenizer.get_vocab()
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types, strict=False)  # no types: none special
        if kind == TOKEN_USER_DEFINED and token in vocab
    ]
    if user_defined:
        tokenizer.add_tokens(user_defined)


def _chat_templates(meta: _Metadata) -> dict[str, str]:
    """``tokenizer.chat_template`` as "default", plus llama.cpp's named templates
    (``tokenizer.chat_templates`` lists names, each in ``tokenizer.chat_template.<name>``).
    """
    templates = {}
    default = meta.get("tokenizer.chat_template", str)
    if default is not None:
        templates["default"] = default
    for name in meta.string_list("tokenizer.chat_templates") or []:
        template = meta.get(f"tokenizer.chat_template.{name}", str)
        if template is not None:
            templates[name] = template
    return templates
