"""ftengine: LLM inference built around FastAttention, from laptop CPU to multi-node GPUs."""

from .config import ModelConfig
from .engine import Engine, GenerationOutput, StreamEvent
from .errors import (
    ConfigError,
    ContextLengthError,
    FtengineError,
    InvalidTokenError,
    MissingWeightError,
    SamplingParamsError,
    TokenizerError,
    WeightFileError,
    WeightShapeError,
)
from .sampling import SamplingParams

__all__ = [
    "ConfigError",
    "ContextLengthError",
    "Engine",
    "FtengineError",
    "GenerationOutput",
    "InvalidTokenError",
    "MissingWeightError",
    "ModelConfig",
    "SamplingParams",
    "SamplingParamsError",
    "StreamEvent",
    "TokenizerError",
    "WeightFileError",
    "WeightShapeError",
]
