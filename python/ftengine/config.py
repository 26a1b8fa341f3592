"""Model configuration: config.json (either transformers layout) normalised into one dataclass."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError

# model_type -> architecture, for config.json files saved without an "architectures" list.
_ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "PanguEmbedded": "PanguEmbeddedForCausalLM",
    "gpt_pangu": "GPTPanguForCausalLM",
}


def _pangu_alpha_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """GPTPanguConfig's keys under the names the rest of this module reads."""
    activation = raw.get("activation_function", "gelu")
    if activation != "gelu":
        raise ConfigError(f"{source}: activation_function {activation!r} is not supported (gelu)")
    if raw.get("scale_attn_weights", True) is not True:
        raise ConfigError(f"{source}: scale_attn_weights false is not supported")
    try:
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_heads"])
        return dict(
            raw,
            num_hidden_layers=raw["num_layers"],
            num_attention_heads=heads,
            num_key_value_heads=heads,
            head_dim=hidden // max(heads, 1),
            intermediate_size=raw.get("intermediate_size") or 4 * hidden,
            rms_norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            max_position_embeddings=raw.get("max_position_embeddings", 1024),
            tie_word_embeddings=True,
            hidden_act="silu",  # checked above as activation_function
        )
    except KeyError as missing:
        raise ConfigError(f"{source}: required key {missing} is missing") from None
    except (TypeError, ValueError) as bad:
        raise ConfigError(f"{source}: malformed value: {bad}") from None
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The decoder hyper-parameters the native core needs, with transformers' meanings."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rope_interleaved: bool = False
    rope_freq_factors: tuple[float, ...] = ()  # GGUF rope_freqs: inv_freq[i] /= factor[i]
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def parameter_count(self) -> int:
        """Parameters of a Llama-shaped decoder with these sizes (an estimate for PanGu-alpha)."""
        h, q = self.hidden_size, self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_layers * layer + self.vocab_size * h + head + h

    def native_dict(self, weight_dtype: str) -> dict[str, Any]:
        """The flat dict the native Runtime takes."""
        fields = dataclasses.asdict(self)
        fields.pop("bos_token_id")
        fields.pop("eos_token_ids")
        fields["weight_dtype"] = weight_dtype
        fields["rope_freq_factors"] = list(self.rope_freq_factors)
        return fields


def _rope_settings(raw: dict[str, Any], source: str) -> dict[str, Any]:
    # transformers >= 5 writes rope_parameters (theta inside); older files have rope_theta plus
    # an optional rope_scaling whose kind is "rope_type" (or "type" before 4.45).
    parameters = raw.get("rope_parameters")
    if parameters is None:
        parameters = dict(raw.get("rope_scaling") or {})
        parameters.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(parameters, dict):
        raise ConfigError(f"{source}: rope parameters must be an object, got {parameters!r}")
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ConfigError(
            f"{source}: rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(_ROPE_TYPES)})"
        )
    settings: dict[str, Any] = {
        "rope_theta": float(parameters["rope_theta"]),
        "rope_type": rope_type,
    }
    if rope_type in ("linear", "llama3"):
        if "factor" not in parameters:
            raise ConfigError(f"{source}: rope_type {rope_type!r} needs a 'factor'")
        settings["rope_factor"] = float(parameters["factor"])
    if rope_type == "llama3":
        try:
            settings["rope_low_freq_factor"] = float(parameters["low_freq_factor"])
            settings["rope_high_freq_factor"] = float(parameters["high_freq_factor"])
            settings["rope_original_max_position"] = int(
                parameters["original_max_position_embeddings"]
            )
        except KeyError as missing:
            raise ConfigError(f"{source}: llama3 rope scaling lacks {missing}") from None
        if settings["rope_high_freq_factor"] <= settings["rope_low_freq_factor"]:
            raise ConfigError(f"{source}: llama3 high_freq_factor must exceed low_freq_factor")
    return settings


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> ModelConfig:
    """Validates a transformers-style config dict; `source` names it in error messages."""
    architectures = raw.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture is None:
        architecture = _ARCHITECTURE_BY_MODEL_TYPE.get(raw.get("model_type", ""))
    from . import _C

    supported = _C.supported_architectures()
    if architecture not in supported:
        raise ConfigError(
            f"{source}: architecture {architecture or raw.get('model_type')!r} is not supported "
            f"(supported: {', '.join(supported)})"
        )
    if architecture == "GPTPanguForCausalLM":
        raw = _pangu_alpha_keys(raw, source)
    activation = raw.get("hidden_act", "silu")
    if activation != "silu":
        raise ConfigError(f"{source}: hidden_act {activation!r} is not supported (silu)")
    try:
        hidden_size = int(raw["hidden_size"])
        num_heads = int(raw["num_attention_heads"])
        values = dict(
            architecture=architecture,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden_size // max(num_heads, 1)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            # openPangu-Embedded names its q/k/v/o bias flag `bias`.
            attention_bias=bool(raw.get("attention_bias", raw.get("bias", False))),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            # ftengine's own key: weights converted from Meta checkpoints without permuting q/k
            # rotate interleaved pairs (python -m ftengine.convert writes it).
            rope_interleaved=bool(raw.get("rope_interleaved", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=_token_ids(raw.get("eos_token_id")),
            **_rope_settings(raw, source),
        )
    except KeyError as missing:
        raise ConfigError(f"{source}: required key {missing} is missing") from None
    except (TypeError, ValueError) as bad:
        raise ConfigError(f"{source}: malformed value: {bad}") from None
    config = ModelConfig(**values)
    _check_sizes(config, source)
    return config


def _check_sizes(config: ModelConfig, source: str) -> None:
    for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
        "num_kv_heads", "head_dim", "max_position_embeddings",
    ):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{source}: {name} must be positive, got {getattr(config, name)}")
    if config.num_heads % config.num_kv_heads:
        raise ConfigError(
            f"{source}: num_attention_heads ({config.num_heads}) is not a multiple of "
            f"num_key_value_heads ({config.num_kv_heads})"
        )
    if config.head_dim % 2 and config.architecture != "GPTPanguForCausalLM":
        raise ConfigError(f"{source}: head_dim must be even for rotary embedding")
    for name in ("rope_theta", "rope_factor", "norm_eps", "rope_original_max_position"):
        value = getattr(config, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{source}: {name} must be a positive number, got {value}")


def read_config_json(model_dir: str | Path, kind: str = "model") -> dict[str, Any]:
    """`model_dir/config.json` as a dict; ConfigError names the file when it is missing or not
    a JSON object. `kind` says what the directory should be, for the message."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: is {model_dir} a {kind} directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as bad:
        raise ConfigError(f"{path} is not valid JSON: {bad}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return raw


def load_config(model_dir: str | Path) -> ModelConfig:
    """Reads and validates `model_dir/config.json`."""
    return config_from_dict(read_config_json(model_dir), str(Path(model_dir) / "config.json"))
