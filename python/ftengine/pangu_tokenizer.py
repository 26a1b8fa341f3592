"""PanGu-α's tokenizer: jieba word segmentation, then sentencepiece (`vocab.model`), as the
PyTorch port's GPTPanguTokenizer does. Spaces and newlines inside segments become U+2582 and
U+2583 before sentencepiece sees them, and segments are joined with spaces; decoding drops the
spaces sentencepiece puts back and maps U+2582/U+2583 to space and newline again."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece

from .errors import TokenizerError
from .tokenizer import Tokenizer

_TO_PIECES = str.maketrans(" \n", "\u2582\u2583")
SPECIAL_PIECES = ("<s>", "</s>", "<eot>", "<unk>", "<sep>", "<pad>")


class PanguAlphaBackend:
    """The TokenizerBackend of PanGu-α."""

    def __init__(self, model_file: Path) -> None:
        try:
            import jieba
        except ImportError:
            raise TokenizerError(
                "PanGu-alpha's tokenizer segments words with jieba: pip install jieba"
            ) from None
        jieba.setLogLevel(60)  # no "Building prefix dict" chatter on stderr
        self._jieba = jieba.Tokenizer()
        self.processor = sentencepiece.SentencePieceProcessor()
        try:
            self.processor.Load(model_file=str(model_file))
        except (OSError, RuntimeError) as bad:
            raise TokenizerError(f"{model_file} is not a sentencepiece model: {bad}") from None
        self.vocab_size = self.processor.vocab_size()
        specials = [self.processor.piece_to_id(p) for p in SPECIAL_PIECES]
        self.special_ids = frozenset(i for p, i in zip(SPECIAL_PIECES, specials, strict=True)
                                     if self.processor.id_to_piece(i) == p)
        self.byte_fallback_ids = frozenset()

    def encode(self, text: str) -> list[int]:
        # Special-token strings typed into text stay text: jieba splits them at "<" and ">",
        # which is what the port's tokenizer does too.
        words = [word.translate(_TO_PIECES) for word in self._jieba.cut(text, cut_all=False)]
        return self.processor.encode(" ".join(words))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        kept = [i for i in ids if 0 <= i < self.vocab_size
                and not (skip_special_tokens and i in self.special_ids)]
        text = self.processor.decode(kept)
        return text.replace(" ", "").replace("\u2582", " ").replace("\u2583", "\n")

    def id_to_piece(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id)

    def piece_to_id(self, piece: str) -> int | None:
        token_id = self.processor.piece_to_id(piece)
        return token_id if self.processor.id_to_piece(token_id) == piece else None


def pangu_alpha_tokenizer(model_dir: Path) -> Tokenizer:
    """The tokenizer of a PanGu-α directory (its `vocab.model`). Generation stops at <eot>;
    prompts get no BOS, as the port's generation examples encode them."""
    backend = PanguAlphaBackend(model_dir / "vocab.model")
    eot = backend.piece_to_id("<eot>")
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=[eot] if eot is not None else [],
                     add_bos=False)
