"""Typed errors of ftengine. Every failure a user can cause with bad input is one of these,
with a message that names the file, tensor or value at fault and says what to do."""


class FtengineError(Exception):
    """Base class of every error ftengine raises on purpose."""


class ConfigError(FtengineError, ValueError):
    """config.json (or another model description) is missing, malformed or unsupported."""


class WeightFileError(FtengineError):
    """A weight file is unreadable: truncated, corrupt header, offsets out of bounds."""


class MissingWeightError(WeightFileError):
    """A tensor the model needs is in none of the weight files."""


class WeightShapeError(WeightFileError):
    """A tensor's shape or dtype disagrees with what the config implies."""


class TokenizerError(FtengineError):
    """The tokenizer files are missing, malformed or unsupported."""


class InvalidTokenError(FtengineError, ValueError):
    """A token id is negative or not below the vocabulary size."""


class ContextLengthError(FtengineError, ValueError):
    """Prompt plus requested new tokens do not fit the model's context."""


class SamplingParamsError(FtengineError, ValueError):
    """A sampling parameter is out of its valid range."""
