"""Meta's original Llama 3 ``tokenizer.model``: a tiktoken BPE file, read without tiktoken.

The file holds one ``<base64 token bytes> <rank>`` line per token. It is turned into a byte-level
BPE of the ``tokenizers`` library the way transformers' ``TikTokenConverter`` does: the vocabulary
is the ranks, the merges are recovered from them (every split of a token into two tokens, ordered by
the rank of the merged token), ``ignore_merges`` on, and the text is split by the Llama 3 regex
before the bytes are mapped to GPT-2's printable characters. This encodes exactly like tiktoken's
``Encoding(pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=...)`` with
``allowed_special="all"`` (special tokens written in the text become their ids, as with every other
ftengine tokenizer; Meta's own ``Tokenizer.encode`` defaults to encoding them as plain text).

The special tokens, BOS/EOS and chat template come from the files next to ``tokenizer.model`` when
they say so, else from Meta's reference tokenizer:

* special tokens: ``added_tokens_decoder`` of ``tokenizer_config.json`` if present; else Meta's
  Llama 3.1 list (``<|eom_id|>``, ``<|python_tag|>``, ...) when ``params.json`` has
  ``use_scaled_rope`` or ``config.json`` a ``llama3`` ``rope_scaling`` (Llama 3.1 and later), else
  Meta's Llama 3 list. Either way 256 tokens with ids from ``len(ranks)`` (128000 for Llama 3), so
  ``<|begin_of_text|>`` = 128000, ``<|end_of_text|>`` = 128001, ``<|eot_id|>`` = 128009.
* BOS: ``bos_token`` of ``tokenizer_config.json``, else ``bos_token_id`` of
  ``generation_config.json``/``config.json``, else ``<|begin_of_text|>``; added by ``encode``
  unless ``tokenizer_config.json`` has ``add_bos_token: false`` (Meta's tokenizer is called with
  ``bos=True``). ``add_eos_token`` defaults to false.
* EOS ids: ``eos_token`` of ``tokenizer_config.json`` and ``eos_token_id`` of
  ``generation_config.json``/``config.json``, always followed by ``<|end_of_text|>``,
  ``<|eom_id|>`` (when it exists) and ``<|eot_id|>`` (Meta's ``stop_tokens``), so an instruct model
  stops at the end of its turn even without a ``generation_config.json``. The first one is the
  ``eos_token`` of templates and of ``add_eos``; by default ``<|end_of_text|>``.
* chat template: ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template`` when
  present, else :data:`LLAMA3_CHAT_TEMPLATE`, Meta's ``ChatFormat.encode_dialog_prompt`` written in
  Jinja (BOS, then per message ``<|start_header_id|>role<|end_header_id|>\\n\\n`` + stripped
  content + ``<|eot_id|>``, then the assistant header). A Meta checkpoint ships no template file,
  and this format is part of Meta's tokenizer for every Llama 3 model (3.1's tool and date system
  prompts are the caller's to write). The rendered prompt starts with the BOS text, so encode it
  with ``add_special_tokens=False``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from .errors import TokenizerError
from .tokenizer import (
    HfTokenizersBackend,
    Tokenizer,
    _read_chat_templates,
    _read_json,
    _token_content,
    bytes_to_unicode,
)

# Meta's llama3 tokenizer.py pat_str (also transformers' TikTokenConverter default and the Split
# pattern of Llama 3's tokenizer.json).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_NUM_RESERVED_SPECIAL_TOKENS = 256


def _with_reserved(named: list[str], first_reserved: int) -> tuple[str, ...]:
    count = _NUM_RESERVED_SPECIAL_TOKENS - len(named)
    return tuple(named) + tuple(
        f"<|reserved_special_token_{first_reserved + i}|>" for i in range(count)
    )


# meta-llama/llama3 tokenizer.py (Llama 3, 3.0).
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = _with_reserved(
    [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ],
    first_reserved=5,
)

# meta-llama/llama-models llama3 tokenizer.py (Llama 3.1 and later).
LLAMA31_SPECIAL_TOKENS: tuple[str, ...] = _with_reserved(
    [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ],
    first_reserved=2,
)

_BOS = "<|begin_of_text|>"
_STOP_TOKENS = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

# Meta's ChatFormat.encode_dialog_prompt; the same as Meta-Llama-3-*-Instruct's tokenizer_config.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

_LINE = re.compile(rb"([A-Za-z0-9+/]*={0,2})[ \t]+([0-9]+)")
_DETECT_BYTES = 4096


def is_tiktoken_file(path: str | Path) -> bool:
    """Whether ``path`` looks like a tiktoken BPE file (ASCII ``<base64> <rank>`` lines), from its
    first few kilobytes. A sentencepiece model is a binary protobuf and never matches.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(_DETECT_BYTES)
    except OSError:
        return False
    lines = head.splitlines()
    if len(head) == _DETECT_BYTES and not head.endswith((b"\n", b"\r")):
        lines = lines[:-1]  # the last line may be cut off
    lines = [line for line in lines if line.strip()]
    if not lines:
        return False
    for line in lines:
        match = _LINE.fullmatch(line.strip())
        if match is None or not match.group(1):
            return False
    return True


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """The ``{token bytes: rank}`` of a tiktoken BPE file, checked: every line ``<base64> <rank>``
    (blank lines skipped, as tiktoken does), no token or rank twice, ranks ``0..N-1``, and every
    single byte a token (else some texts could not be encoded).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"{path} is not readable: {exc}") from exc
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for lineno, raw in enumerate(data.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        match = _LINE.fullmatch(line)
        if match is None or not match.group(1):
            raise TokenizerError(
                f"{path}, line {lineno}: expected '<base64 token> <rank>', found {raw[:80]!r}"
            )
        try:
            token = base64.b64decode(match.group(1), validate=True)
        except binascii.Error as exc:
            raise TokenizerError(
                f"{path}, line {lineno}: {match.group(1)[:60]!r} is not valid base64: {exc}"
            ) from exc
        rank = int(match.group(2))
        if token in ranks:
            raise TokenizerError(
                f"{path}, line {lineno}: token {token!r} was already given rank {ranks[token]} "
                f"(line {line_of_rank[ranks[token]]})"
            )
        if rank in line_of_rank:
            raise TokenizerError(
                f"{path}, line {lineno}: rank {rank} was already given on line {line_of_rank[rank]}"
            )
        ranks[token] = rank
        line_of_rank[rank] = lineno
    if not ranks:
        raise TokenizerError(f"{path} holds no tokens")
    n = len(ranks)
    # With no rank twice, ranks are 0..n-1 exactly when none is >= n.
    for rank, lineno in sorted(line_of_rank.items()):
        if rank >= n:
            missing = next(r for r in range(n) if r not in line_of_rank)
            raise TokenizerError(
                f"{path}, line {lineno}: rank {rank} but the file has {n} tokens, whose ranks "
                f"must be 0..{n - 1} without gaps (rank {missing} is missing)"
            )
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise TokenizerError(
            f"{path}: no token for byte(s) "
            + ", ".join(f"0x{b:02X}" for b in missing_bytes[:8])
            + (" ..." if len(missing_bytes) > 8 else "")
            + "; a byte-level BPE needs all 256 single bytes"
        )
    return ranks


def build_tiktoken_bpe(
    ranks: Mapping[bytes, int],
    special_tokens: Mapping[str, int] | None = None,
    pattern: str = LLAMA3_PATTERN,
) -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer`` encoding like tiktoken with ``ranks`` and ``pattern``
    (transformers' ``TikTokenConverter``, without a post-processor). ``special_tokens`` must have
    the ids ``len(ranks)``, ``len(ranks) + 1``, ... in some order.
    """
    byte_char = bytes_to_unicode()
    table = [byte_char[b] for b in range(256)]

    def to_str(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            left_rank, right_rank = ranks.get(left), ranks.get(right)
            if left_rank is not None and right_rank is not None:
                merges.append((rank, left_rank, right_rank, left, right))
    merges.sort()
    model = models.BPE(
        vocab,
        [(to_str(left), to_str(right)) for _, _, _, left, right in merges],
        fuse_unk=False,
        ignore_merges=True,  # a piece that is a token is that token, as in tiktoken
    )
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    if special_tokens:
        n = len(ranks)
        by_id = sorted(special_tokens.items(), key=lambda item: item[1])
        if [i for _, i in by_id] != list(range(n, n + len(by_id))):
            raise TokenizerError(
                f"special token ids must be {n}..{n + len(by_id) - 1} (right after the "
                f"{n} BPE ranks) without gaps, got {[i for _, i in by_id][:10]}..."
            )
        tokenizer.add_special_tokens(
            [AddedToken(content, special=True, normalized=False) for content, _ in by_id]
        )
        for content, token_id in by_id:
            if tokenizer.token_to_id(content) != token_id:
                raise TokenizerError(
                    f"special token {content!r} (id {token_id}) is also a BPE token or listed twice"
                )
    return tokenizer


def _is_llama31_or_later(model_dir: Path) -> bool:
    params = _read_json(model_dir / "params.json")
    if params.get("use_scaled_rope") is True:
        return True
    rope_scaling = _read_json(model_dir / "config.json").get("rope_scaling")
    if isinstance(rope_scaling, dict):
        return "llama3" in (rope_scaling.get("rope_type"), rope_scaling.get("type"))
    return False


def _special_tokens_from_config(config: Mapping[str, Any], where: Path) -> dict[str, int] | None:
    decoder = config.get("added_tokens_decoder")
    if not decoder:
        return None
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{where}: added_tokens_decoder must be an object")
    tokens: dict[str, int] = {}
    for key, value in decoder.items():
        content = _token_content(value, where, f"added_tokens_decoder[{key}]")
        if not key.isdigit() or content is None or content in tokens:
            raise TokenizerError(f"{where}: bad added_tokens_decoder entry {key!r}: {value!r}")
        tokens[content] = int(key)
    return tokens


def tokenizer_from_tiktoken(
    path: str | Path, *, special_tokens: Sequence[str] | Mapping[str, int] | None = None
) -> Tokenizer:
    """A :class:`Tokenizer` for the tiktoken BPE file ``path`` (Meta's Llama 3 ``tokenizer.model``).

    ``special_tokens``: token strings numbered from ``len(ranks)`` on, or a ``{token: id}`` mapping
    with those ids; by default taken from the files next to ``path`` or Meta's lists (see the
    module docstring, which also says where BOS, EOS and the chat template come from).
    """
    path = Path(path)
    model_dir = path.parent
    config_path = model_dir / "tokenizer_config.json"
    config = _read_json(config_path)
    ranks = read_tiktoken_ranks(path)

    if special_tokens is None:
        specials = _special_tokens_from_config(config, config_path)
        if specials is None:
            names = (
                LLAMA31_SPECIAL_TOKENS if _is_llama31_or_later(model_dir) else LLAMA3_SPECIAL_TOKENS
            )
            specials = {name: len(ranks) + i for i, name in enumerate(names)}
    elif isinstance(special_tokens, Mapping):
        specials = dict(special_tokens)
    else:
        if isinstance(special_tokens, str):
            raise TypeError("special_tokens must be a sequence of strings, not one string")
        if len(set(special_tokens)) != len(special_tokens):
            raise TokenizerError("special_tokens lists a token twice")
        specials = {name: len(ranks) + i for i, name in enumerate(special_tokens)}
    try:
        hf_tokenizer = build_tiktoken_bpe(ranks, specials)
    except TokenizerError as exc:
        raise TokenizerError(f"{path}: {exc}") from exc
    backend = HfTokenizersBackend(hf_tokenizer)

    def token_id(name: str) -> int | None:
        content = _token_content(config.get(name), config_path, name)
        if content is None:
            return None
        found = backend.piece_to_id(content)
        if found is None:
            raise TokenizerError(f"{config_path} names token {content!r}, not in the vocabulary")
        return found

    generation_config = _read_json(model_dir / "generation_config.json")
    model_config = _read_json(model_dir / "config.json")
    bos_id = token_id("bos_token")
    if bos_id is None:
        bos_id = generation_config.get("bos_token_id", model_config.get("bos_token_id"))
    if bos_id is None:
        bos_id = specials.get(_BOS)

    eos_ids: list[int] = []
    configured_eos = token_id("eos_token")
    if configured_eos is not None:
        eos_ids.append(configured_eos)
    for source in (generation_config, model_config):
        value = source.get("eos_token_id")
        eos_ids += [value] if isinstance(value, int) else list(value or [])
    eos_ids += [specials[t] for t in _STOP_TOKENS if t in specials]

    add_bos = bool(config.get("add_bos_token", True)) and bos_id is not None
    add_eos = bool(config.get("add_eos_token", False))
    templates = _read_chat_templates(model_dir, config) or {"default": LLAMA3_CHAT_TEMPLATE}
    token_strings = {}
    # Ids outside the vocabulary are left for Tokenizer to reject with a clear message.
    if bos_id is not None and 0 <= bos_id < backend.vocab_size:
        token_strings["bos_token"] = backend.id_to_piece(bos_id)
    if eos_ids and 0 <= eos_ids[0] < backend.vocab_size:
        token_strings["eos_token"] = backend.id_to_piece(eos_ids[0])
    for name in ("unk_token", "pad_token"):
        if (content := _token_content(config.get(name), config_path, name)) is not None:
            token_strings[name] = content
    return Tokenizer(
        backend,
        bos_token_id=bos_id,
        eos_token_ids=eos_ids,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=templates,
        special_tokens=token_strings,
    )
