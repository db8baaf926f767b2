"""Exceptions that carry a message meant for the user.

The CLI prints ``str(error)`` of any :class:`FlaxcnnError` without a traceback and exits with
status 2, so every message must say what was wrong and what is accepted.
"""


class FlaxcnnError(Exception):
    """Base class of every user-facing error raised by flaxcnn."""


class DataError(FlaxcnnError, ValueError):
    """A data folder, file or array is missing, malformed or inconsistent."""


class ConversionError(FlaxcnnError, ValueError):
    """A PyTorch state_dict does not match the Flax model it is converted to or from."""


class InputShapeError(FlaxcnnError, ValueError):
    """A model was called with an input of the wrong rank, channels, size or dtype."""


class ConfigError(FlaxcnnError, ValueError):
    """A command-line option or training setting is out of range or unknown."""


class TrainingError(FlaxcnnError, RuntimeError):
    """Training cannot go on (non-finite loss, unwritable run directory, ...)."""
