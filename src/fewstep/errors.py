"""Errors a user can cause. Each carries one message that names the thing to fix; the CLI prints it on
one line and exits with status 2, having written nothing."""


class FewstepError(Exception):
    """Base class of user-facing errors."""


class ConfigError(FewstepError):
    """A bad recipe: unknown key, wrong type, missing file, impossible value."""


class CheckpointError(FewstepError):
    """A checkpoint or model folder that cannot be read (missing, corrupt, wrong format)."""


class DataError(FewstepError):
    """Data of the wrong shape or kind for the model or method it is given to."""


class TrainingDiverged(FewstepError):
    """The loss or the weights became NaN/Inf; the last good checkpoint is kept."""
