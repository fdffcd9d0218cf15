"""The project's own exception types.

Every error a user can act on is one of these. The CLI prints ``str(err)`` as a
single line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class GpuMdfError(Exception):
    """Base class: a problem the user can fix (bad file, bad option, no GPU...)."""


class DataError(GpuMdfError):
    """Missing, corrupt or ill-shaped input data."""


class ConfigError(GpuMdfError):
    """Unknown or mistyped configuration key or value."""


class ModelFileError(GpuMdfError):
    """A model file (Keras or MDF) that is missing, unreadable or not a model."""


class UnsupportedLayerError(GpuMdfError):
    """A Keras layer kind or option that the converter cannot translate."""


class CompileError(GpuMdfError):
    """An MDF graph that the batch engine refuses (unsafe expression, cycle, state...)."""


class DeviceError(GpuMdfError):
    """A device that was asked for but cannot be used (no GPU, bad index...)."""


class OutputError(GpuMdfError):
    """An output folder that cannot be used (holds another job's files...)."""
