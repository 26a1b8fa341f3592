"""Sampling parameters of a generation request."""

from __future__ import annotations

import dataclasses
import math

from .errors import SamplingParamsError


@dataclasses.dataclass
class SamplingParams:
    """How to pick each new token, and when to stop.

    temperature 0 (the default) is greedy decoding; otherwise logits are divided by the
    temperature, cut to the top_k most likely tokens (0: no cut) and to the smallest set whose
    probability reaches top_p (1.0: no cut), then sampled. repetition_penalty > 1 discourages
    tokens already in the prompt or output (as in transformers). Generation stops at
    max_new_tokens, at an end-of-sequence token (unless ignore_eos), at any of stop_token_ids,
    or when the text produced so far contains one of the stop strings (which is cut off).
    A seed makes sampling reproducible; without one each call draws a fresh seed.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = dataclasses.field(default_factory=list)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raises SamplingParamsError naming the first invalid field."""

        def fail(message: str) -> None:
            raise SamplingParamsError(f"invalid sampling parameter: {message}")

        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            fail(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            fail(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(f"{name} must be a finite number, got {value!r}")
        if self.temperature < 0:
            fail(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            fail(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            fail(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
            or not 0 <= self.seed < 2**64
        ):
            fail(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        if isinstance(self.stop, str):
            fail("stop must be a list of strings, not a single string")
        if not isinstance(self.stop, (list, tuple)) or any(
            not isinstance(s, str) or not s for s in self.stop
        ):
            fail(f"stop strings must be non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or any(
            isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids
        ):
            fail(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
