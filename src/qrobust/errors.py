"""User-facing errors.

Every problem a user can cause (a bad name, a missing file, a bad number) raises
:class:`QrobustError` with a message that says what is wrong and how to fix it. The CLI
prints these messages without a traceback; anything else is a bug and keeps its traceback.
"""


class QrobustError(Exception):
    """An error caused by user input; its message says what is wrong and how to fix it."""


class ConfigError(QrobustError, ValueError):
    """A bad configuration value, key or combination."""


class DataError(QrobustError):
    """A data set is missing, truncated or fails its checksum."""


class CheckpointError(QrobustError):
    """A checkpoint cannot be loaded (other architecture, unsafe or corrupt file)."""


class RunFolderError(QrobustError):
    """An output folder holds a different run."""


class TrainingDiverged(QrobustError):
    """The loss became NaN/inf; the last good checkpoint was kept."""
