"""Text <-> token ids for ftengine: Hugging Face ``tokenizer.json`` or sentencepiece
``tokenizer.model``, chat templates, and streaming detokenization.

Behaviour follows transformers 5's ``AutoTokenizer`` on the same directory, because that is what
produced the reference outputs models are evaluated against:

* with ``tokenizer.json`` the post-processor decides whether BOS/EOS are added; ``add_bos_token`` in
  ``tokenizer_config.json`` is ignored (transformers pops it when a ``tokenizer.json`` exists);
* with only ``tokenizer.model`` BOS/EOS are added only when ``add_bos_token``/``add_eos_token`` are
  true in ``tokenizer_config.json`` (absent means false in transformers 5, unlike 4.x), and the text
  is split like transformers' converted Llama tokenizer: special tokens matched in the text, "▁"
  prepended to the first segment only (to every segment with ``legacy: true``), one leading space
  stripped on decode.
"""

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.nodes
import sentencepiece
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import TokenizerError

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPIECE_UNDERLINE = "▁"
# Names transformers exposes to chat templates as strings (its SPECIAL_TOKENS_ATTRIBUTES).
_TEMPLATE_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (transformers' ``bytes_to_unicode``)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class TokenizerBackend(Protocol):
    """What :class:`Tokenizer` needs from a tokenization library. ``encode`` never adds BOS/EOS."""

    vocab_size: int
    special_ids: frozenset[int]
    byte_fallback_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...

    def id_to_piece(self, token_id: int) -> str: ...

    def piece_to_id(self, piece: str) -> int | None: ...


class HfTokenizersBackend:
    """A ``tokenizers.Tokenizer`` (``tokenizer.json``) used without its post-processor."""

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        added = tokenizer.get_added_tokens_decoder()
        self.special_ids = frozenset(i for i, token in added.items() if token.special)
        # Only a ByteFallback decoder turns "<0xE4>" pieces into bytes; in a byte-level BPE they are
        # plain text.
        decoder = tokenizer.decoder
        has_byte_fallback = decoder is not None and b'"ByteFallback"' in decoder.__getstate__()
        self.byte_fallback_ids = frozenset(
            i
            for piece, i in tokenizer.get_vocab().items()
            if has_byte_fallback and _BYTE_PIECE.fullmatch(piece)
        )

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            raise KeyError(token_id)
        return piece

    def piece_to_id(self, piece: str) -> int | None:
        return self.tokenizer.token_to_id(piece)

    def mark_special(self, pieces: Iterable[str]) -> None:
        """Make ``pieces`` special (skipped by ``decode``), as transformers does for the tokens its
        config names.
        """
        missing = [
            p
            for p in pieces
            if (i := self.piece_to_id(p)) is not None and i not in self.special_ids
        ]
        if missing:
            self.tokenizer.add_special_tokens(
                [tokenizers.AddedToken(p, special=True, normalized=False) for p in missing]
            )
            self.special_ids |= {self.tokenizer.token_to_id(p) for p in missing}


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _proto_fields(data: bytes) -> list[tuple[int, int, bytes, bytes]]:
    """Split a protobuf message into (field number, wire type, raw field bytes, payload) without a
    schema.
    """
    fields = []
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _read_varint(data, pos)
        wire_type = key & 7
        if wire_type == 0:
            _, pos = _read_varint(data, pos)
            payload = data[start:pos]
        elif wire_type == 2:
            length, pos = _read_varint(data, pos)
            payload = data[pos : pos + length]
            pos += length
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            payload = data[start:pos]
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type}")
        fields.append((key >> 3, wire_type, data[start:pos], payload))
    if pos != len(data):
        raise ValueError("truncated protobuf message")
    return fields


# ModelProto.normalizer_spec = 3; NormalizerSpec.add_dummy_prefix = 3 (sentencepiece_model.proto).
_NORMALIZER_SPEC_FIELD = 3
_ADD_DUMMY_PREFIX_FIELD = 3


def _without_dummy_prefix(model_proto: bytes) -> tuple[bytes, bool]:
    """Return ``model_proto`` with ``add_dummy_prefix`` off, and whether it was on.

    sentencepiece always prepends "▁" to the text it encodes; transformers prepends it only to the
    first segment between special tokens, so we encode with a copy of the model that never does and
    add it ourselves.
    """
    out = bytearray()
    dummy_prefix = True  # the proto default
    for number, wire_type, raw, payload in _proto_fields(model_proto):
        if number != _NORMALIZER_SPEC_FIELD or wire_type != 2:
            out += raw
            continue
        spec = bytearray()
        for sub_number, _, sub_raw, sub_payload in _proto_fields(payload):
            if sub_number == _ADD_DUMMY_PREFIX_FIELD:
                dummy_prefix = _read_varint(sub_payload, 1)[0] != 0
            else:
                spec += sub_raw
        spec += _encode_varint(_ADD_DUMMY_PREFIX_FIELD << 3) + b"\x00"
        out += _encode_varint(_NORMALIZER_SPEC_FIELD << 3 | 2) + _encode_varint(len(spec)) + spec
    return bytes(out), dummy_prefix


class SentencePieceBackend:
    """A sentencepiece model behaving like transformers' conversion of it to a ``tokenizers`` Llama
    tokenizer.

    ``prepend_scheme`` is "first" (transformers 5 default), "always" (``legacy: true``) or "never"
    (``add_prefix_space: false``); ``None`` takes "first" or "never" from the model's
    ``add_dummy_prefix``.
    """

    def __init__(
        self, processor: sentencepiece.SentencePieceProcessor, prepend_scheme: str | None = None
    ) -> None:
        no_prefix_proto, dummy_prefix = _without_dummy_prefix(processor.serialized_model_proto())
        if prepend_scheme is None:
            prepend_scheme = "first" if dummy_prefix else "never"
        if prepend_scheme not in ("first", "always", "never"):
            raise ValueError(
                f"prepend_scheme must be 'first', 'always' or 'never', got {prepend_scheme!r}"
            )
        self.prepend_scheme = prepend_scheme
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=no_prefix_proto)
        self.vocab_size = processor.get_piece_size()
        self.special_ids = frozenset(
            i for i in range(self.vocab_size) if processor.is_control(i) or processor.is_unknown(i)
        )
        self.byte_fallback_ids = frozenset(
            i for i in range(self.vocab_size) if processor.is_byte(i)
        )
        self._pieces = [processor.id_to_piece(i) for i in range(self.vocab_size)]
        # Longest first, so that a special token containing another one wins, as in tokenizers'
        # added vocabulary.
        specials = sorted((self._pieces[i] for i in self.special_ids), key=len, reverse=True)
        self._special_pattern = (
            re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        )

    def encode(self, text: str) -> list[int]:
        segments = self._special_pattern.split(text) if self._special_pattern else [text]
        ids: list[int] = []
        for index, segment in enumerate(segments):
            if index % 2 == 1:  # odd entries are the captured special tokens
                ids.append(self.processor.piece_to_id(segment))
                continue
            if not segment:
                continue
            at_start = index == 0
            prepend = self.prepend_scheme == "always" or (
                self.prepend_scheme == "first" and at_start
            )
            if prepend and not segment.startswith(" "):
                segment = " " + segment
            ids.extend(self.processor.encode(segment))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        # Mirrors the decoder transformers builds: Replace("▁", " "), ByteFallback, Fuse,
        # Strip(left=1). ByteFallback turns a run of byte pieces into text only if the whole run is
        # valid UTF-8, else into one U+FFFD per byte; Python's errors="replace" would differ.
        parts: list[str] = []
        byte_run = bytearray()
        for token_id in ids:
            # Ids past the tokenizer's pieces (embedding tables padded beyond the vocabulary)
            # decode to nothing, as the tokenizers library does.
            if not 0 <= token_id < len(self._pieces):
                continue
            if skip_special_tokens and token_id in self.special_ids:
                continue
            if token_id in self.byte_fallback_ids:
                byte_run.append(int(self._pieces[token_id][3:5], 16))
                continue
            if byte_run:
                parts.append(_decode_byte_run(byte_run))
                byte_run.clear()
            parts.append(self._pieces[token_id].replace(_SPIECE_UNDERLINE, " "))
        if byte_run:
            parts.append(_decode_byte_run(byte_run))
        text = "".join(parts)
        if self.prepend_scheme != "never" and text.startswith(" "):
            text = text[1:]
        return text

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        token_id = self.processor.piece_to_id(piece)
        # sentencepiece answers unk_id for unknown pieces.
        return token_id if self._pieces[token_id] == piece else None


def _decode_byte_run(run: bytearray) -> str:
    try:
        return run.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body; transformers uses it to mark
    assistant text.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes "<" and friends, which would change what the model sees.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_chat_template(source: str, name: str) -> jinja2.Template:
    # Templates come from model repositories, i.e. untrusted: sandboxed and immutable, as in
    # transformers.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TokenizerError(
            f"chat template {name!r} is not valid Jinja (line {exc.lineno}): {exc.message}"
        ) from exc


class Tokenizer:
    """Encodes prompts, decodes generated ids and renders chat templates for one model.

    ``backend`` is a ``tokenizers.Tokenizer``, a ``sentencepiece.SentencePieceProcessor`` or an
    already wrapped :class:`TokenizerBackend`; BOS/EOS are added by this class from
    ``add_bos``/``add_eos``, never by the backend, so a tokenizer built from GGUF metadata behaves
    the same as one read from files. ``chat_template`` is one template or a mapping of named
    templates (``"default"`` used unless another is asked for). ``special_tokens`` maps template
    variable names (``"bos_token"``, ``"eos_token"``, ...) to token strings; by default they are the
    pieces of the BOS and first EOS id.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer | sentencepiece.SentencePieceProcessor | TokenizerBackend,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool,
        add_eos: bool = False,
        chat_template: str | Mapping[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(backend, tokenizers.Tokenizer):
            backend = HfTokenizersBackend(backend)
        elif isinstance(backend, sentencepiece.SentencePieceProcessor):
            backend = SentencePieceBackend(backend)
        self.backend: TokenizerBackend = backend
        eos_ids = list(dict.fromkeys(eos_token_ids))
        self.bos_token_id = bos_token_id
        self.eos_token_ids = frozenset(eos_ids)
        # The first EOS id is the one add_eos appends and a template's eos_token names
        # (tokenizer_config's eos_token).
        self._primary_eos_id = eos_ids[0] if eos_ids else None
        if add_bos and bos_token_id is None:
            raise TokenizerError("add_bos is set but the tokenizer has no BOS token")
        if add_eos and not eos_ids:
            raise TokenizerError("add_eos is set but the tokenizer has no EOS token")
        for token_id in ([bos_token_id] if bos_token_id is not None else []) + eos_ids:
            if not 0 <= token_id < backend.vocab_size:
                raise TokenizerError(
                    f"special token id {token_id} is outside the vocabulary "
                    f"(size {backend.vocab_size})"
                )
        self.add_bos = add_bos
        self.add_eos = add_eos
        if special_tokens is None:
            special_tokens = {}
            if bos_token_id is not None:
                special_tokens["bos_token"] = backend.id_to_piece(bos_token_id)
            if self._primary_eos_id is not None:
                special_tokens["eos_token"] = backend.id_to_piece(self._primary_eos_id)
        self.special_tokens = dict(special_tokens)
        templates = (
            {"default": chat_template}
            if isinstance(chat_template, str)
            else dict(chat_template or {})
        )
        self._chat_templates = {
            name: _compile_chat_template(src, name) for name, src in templates.items()
        }

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "Tokenizer":
        """Load the tokenizer of a Hugging Face model directory (``tokenizer.json`` preferred over
        ``tokenizer.model``; ``tokenizer_config.json``, ``chat_template.jinja``,
        ``generation_config.json`` and ``config.json`` read when present).
        """
        from . import tiktoken_tokenizer  # here: it imports this module

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise TokenizerError(f"model directory {model_dir} does not exist")
        config = _read_json(model_dir / "tokenizer_config.json")
        token_strings = {
            name: _token_content(config.get(name), model_dir / "tokenizer_config.json", name)
            for name in _TEMPLATE_TOKEN_NAMES
        }
        token_strings = {name: value for name, value in token_strings.items() if value is not None}

        json_file, spm_file = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
        backend: TokenizerBackend
        if json_file.is_file():
            try:
                hf_tokenizer = tokenizers.Tokenizer.from_file(str(json_file))
            except Exception as exc:  # tokenizers raises a bare Exception for malformed files
                raise TokenizerError(f"{json_file} is not a valid tokenizers file: {exc}") from exc
            backend = HfTokenizersBackend(hf_tokenizer)
            backend.mark_special(token_strings.values())
            add_bos, add_eos = _probe_post_processor(
                hf_tokenizer, backend, token_strings, json_file
            )
        elif spm_file.is_file() and tiktoken_tokenizer.is_tiktoken_file(spm_file):
            # Meta's original Llama 3 checkpoints: tiktoken BPE ranks, not sentencepiece.
            return tiktoken_tokenizer.tokenizer_from_tiktoken(spm_file)
        elif spm_file.is_file():
            processor = sentencepiece.SentencePieceProcessor()
            try:
                processor.load(str(spm_file))
            except (OSError, RuntimeError) as exc:
                raise TokenizerError(
                    f"{spm_file} is not a valid sentencepiece model: {exc}"
                ) from exc
            if config.get("add_prefix_space") is False:
                scheme = "never"
            elif config.get("legacy") is True:
                scheme = "always"
            else:
                scheme = "first" if config.get("add_prefix_space") else None
            try:
                backend = SentencePieceBackend(processor, prepend_scheme=scheme)
            except (ValueError, IndexError) as exc:  # our protobuf reader met an unexpected layout
                raise TokenizerError(
                    f"{spm_file} is not a supported sentencepiece model: {exc}"
                ) from exc
            add_bos = bool(config.get("add_bos_token", False))
            add_eos = bool(config.get("add_eos_token", False))
        elif (model_dir / "vocab.model").is_file():
            # PanGu-alpha's PyTorch port: jieba segmentation in front of sentencepiece.
            from .pangu_tokenizer import pangu_alpha_tokenizer

            return pangu_alpha_tokenizer(model_dir)
        else:
            raise TokenizerError(
                f"{model_dir} has no tokenizer.json, tokenizer.model or vocab.model"
            )

        token_ids = {
            name: _piece_id(backend, piece, model_dir / "tokenizer_config.json")
            for name, piece in token_strings.items()
        }
        generation_config = _read_json(model_dir / "generation_config.json")
        model_config = _read_json(model_dir / "config.json")
        bos_token_id = token_ids.get("bos_token")
        if bos_token_id is None:
            bos_token_id = generation_config.get("bos_token_id", model_config.get("bos_token_id"))
        # tokenizer_config's eos_token first: it is the one a template's eos_token and add_eos refer
        # to.
        eos_ids = [token_ids["eos_token"]] if "eos_token" in token_ids else []
        for source in (generation_config, model_config):
            value = source.get("eos_token_id")
            eos_ids += [value] if isinstance(value, int) else list(value or [])
        if "eos_token" not in token_strings and eos_ids:
            token_strings["eos_token"] = backend.id_to_piece(eos_ids[0])
        if "bos_token" not in token_strings and bos_token_id is not None:
            token_strings["bos_token"] = backend.id_to_piece(bos_token_id)

        return cls(
            backend,
            bos_token_id=bos_token_id,
            eos_token_ids=eos_ids,
            add_bos=add_bos,
            add_eos=add_eos,
            chat_template=_read_chat_templates(model_dir, config),
            special_tokens=token_strings,
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (every id the tokenizer can produce is below
        it).
        """
        return self.backend.vocab_size

    @property
    def eos_token_id(self) -> int | None:
        """The EOS id appended by ``add_eos`` and named ``eos_token`` in templates."""
        return self._primary_eos_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text become their ids.
        ``add_special_tokens`` adds BOS/EOS as the model's files ask."""
        ids = self.backend.encode(text)
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_token_id)
            if self.add_eos:
                ids.append(self._primary_eos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (BOS, EOS, chat markers) are left out by default."""
        return self.backend.decode(ids, skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of ``token_id`` (e.g. "▁hello", "Ġhello", "<0x0A>")."""
        return self.backend.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        """The id of vocabulary entry ``piece``, or None when there is none."""
        return self.backend.piece_to_id(piece)

    def is_special(self, token_id: int) -> bool:
        """Whether ``decode(..., skip_special_tokens=True)`` leaves ``token_id`` out."""
        return token_id in self.backend.special_ids

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships a chat template."""
        return bool(self._chat_templates)

    @property
    def chat_template_names(self) -> list[str]:
        """Names of the chat templates ("default" for a single one)."""
        return sorted(self._chat_templates)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_name: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` (dicts with "role" and "content") into the prompt text the model was
        tuned on.

        Same variables as transformers: ``messages``, ``tools``, ``documents``,
        ``add_generation_prompt``, the special token strings, then ``template_kwargs``. The result
        still holds the BOS text if the template writes it, so encode it with
        ``add_special_tokens=False`` when the template does.
        """
        if not self._chat_templates:
            raise TokenizerError(
                "this model has no chat template "
                "(none in tokenizer_config.json or chat_template.jinja)"
            )
        if template_name is None:
            template_name = (
                "tool_use"
                if tools is not None and "tool_use" in self._chat_templates
                else "default"
            )
        if template_name not in self._chat_templates:
            raise TokenizerError(
                f"no chat template named {template_name!r}; "
                f"the model has {self.chat_template_names}"
            )
        # Many templates print "None" or fail on keys set to None (OpenAI-style content=None);
        # transformers drops them.
        conversation = [
            {key: value for key, value in message.items() if value is not None}
            for message in messages
        ]
        variables = {**self.special_tokens, **template_kwargs}
        try:
            return self._chat_templates[template_name].render(
                messages=conversation,
                tools=None if tools is None else list(tools),
                documents=variables.pop("documents", None),
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise TokenizerError(
                f"chat template {template_name!r} rejected the conversation: {exc}"
            ) from exc


def _read_json(path: Path) -> dict[str, Any]:
    """The object in ``path``, or {} if the file does not exist."""
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise TokenizerError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


def _token_content(value: Any, path: Path, name: str) -> str | None:
    # Tokens are strings or serialised AddedToken dicts ({"__type": "AddedToken", "content": ...}).
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(
        f"{path}: {name} must be a string or an AddedToken object, found {value!r}"
    )


def _piece_id(backend: TokenizerBackend, piece: str, path: Path) -> int:
    token_id = backend.piece_to_id(piece)
    if token_id is None:
        raise TokenizerError(f"{path} names token {piece!r}, which is not in the vocabulary")
    return token_id


def _probe_post_processor(
    hf_tokenizer: tokenizers.Tokenizer,
    backend: HfTokenizersBackend,
    token_strings: dict[str, str],
    path: Path,
) -> tuple[bool, bool]:
    """Whether the post-processor of ``tokenizer.json`` adds BOS and/or EOS; other additions are
    unsupported.
    """
    plain = hf_tokenizer.encode("a", add_special_tokens=False).ids
    full = hf_tokenizer.encode("a", add_special_tokens=True).ids
    start = next(
        (i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None
    )
    if start is None:
        raise TokenizerError(
            f"{path}: the post-processor changes the text's tokens, which is unsupported"
        )
    prefix, suffix = full[:start], full[start + len(plain) :]
    bos_id = (
        backend.piece_to_id(token_strings["bos_token"]) if "bos_token" in token_strings else None
    )
    eos_id = (
        backend.piece_to_id(token_strings["eos_token"]) if "eos_token" in token_strings else None
    )
    if len(prefix) > 1 or len(suffix) > 1:
        raise TokenizerError(
            f"{path}: the post-processor adds {prefix} before and {suffix} after the text; "
            "only a BOS before and an EOS after are supported"
        )
    if prefix and bos_id is None:
        token_strings["bos_token"] = backend.id_to_piece(prefix[0])
    elif prefix and prefix[0] != bos_id:
        raise TokenizerError(
            f"{path}: the post-processor adds token {prefix[0]}, not the BOS token {bos_id}"
        )
    if suffix and eos_id is None:
        token_strings["eos_token"] = backend.id_to_piece(suffix[0])
    elif suffix and suffix[0] != eos_id:
        raise TokenizerError(
            f"{path}: the post-processor appends token {suffix[0]}, not the EOS token {eos_id}"
        )
    return bool(prefix), bool(suffix)


def _read_chat_templates(model_dir: Path, config: Mapping[str, Any]) -> dict[str, str]:
    # transformers 5 saves templates as chat_template.jinja plus
    # additional_chat_templates/<name>.jinja, which take priority over the older "chat_template"
    # entry of tokenizer_config.json (a string or [{name, template}]).
    templates: dict[str, str] = {}
    files = [
        model_dir / "chat_template.jinja",
        *sorted((model_dir / "additional_chat_templates").glob("*.jinja")),
    ]
    for path in files:
        if path.is_file():
            name = "default" if path.parent == model_dir else path.stem
            try:
                templates[name] = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise TokenizerError(f"{path} is not readable: {exc}") from exc
    if templates:
        return templates
    value = config.get("chat_template")
    where = model_dir / "tokenizer_config.json"
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
        isinstance(t, dict)
        and isinstance(t.get("name"), str)
        and isinstance(t.get("template"), str)
        for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError(
        f"{where}: chat_template must be a string or a list of {{name, template}} objects"
    )


# Prompt tokens decoded along with the first generated ones, so that e.g. a leading "▁" is rendered
# as the space it is after the prompt instead of being stripped as at the start of a text (vLLM uses
# the same 5).
_PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    """Turns generated ids into text one token at a time, for streaming.

    Each :meth:`push` decodes only a short window (the ids since the last emitted text plus the ones
    before it for context, as vLLM and TGI do) and returns the text that became final. Text is held
    back while it ends in an incomplete UTF-8 character (U+FFFD) or in a run of byte-fallback
    pieces, whose text depends on how the run ends. The pushes followed by :meth:`flush` concatenate
    to ``decode(generated)`` without a prompt, and to ``decode(prompt +
    generated)[len(decode(prompt)):]`` with one.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._byte_ids = tokenizer.backend.byte_fallback_ids
        context = list(prompt_ids or [])[-_PROMPT_CONTEXT_TOKENS:]
        # Never start the window inside a run of byte pieces: the run decodes as a whole.
        while context and context[0] in self._byte_ids:
            context.pop(0)
        self._ids = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._in_byte_run = False

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (often "", never half a character)."""
        self._ids.append(token_id)
        if token_id in self._byte_ids:
            self._in_byte_run = True
        elif not (self._skip_special_tokens and self._tokenizer.is_special(token_id)):
            # A skipped special token is invisible to the decoder, so it does not end a byte run.
            self._in_byte_run = False
        if self._in_byte_run:
            return ""
        prefix_text = self._tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset], self._skip_special_tokens
        )
        new_text = self._tokenizer.decode(
            self._ids[self._prefix_offset :], self._skip_special_tokens
        )
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        # Drop the ids before the new window so that memory and work per token stay bounded.
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Return the text still held back (an unfinished character renders as U+FFFD) at the end of
        a stream.
        """
        prefix_text = self._tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset], self._skip_special_tokens
        )
        new_text = self._tokenizer.decode(
            self._ids[self._prefix_offset :], self._skip_special_tokens
        )
        del self._ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(self._ids)
        self._in_byte_run = False
        return new_text[len(prefix_text) :]
