"""Errors a user can cause. The CLI prints their message as one line and exits 2."""


class TrimeError(Exception):
    """Base class: a user-facing problem (bad input, missing file, mismatch), never a bug."""


class ConfigError(TrimeError):
    """An invalid option, preset or combination of options."""


class DataError(TrimeError):
    """Missing, empty, malformed or mismatched data."""


class CheckpointError(TrimeError):
    """A checkpoint that is missing, incomplete or does not fit the data."""


class DatastoreError(TrimeError):
    """A datastore or index that is missing, incomplete or does not fit the model."""


class NetworkError(TrimeError):
    """A download that could not be made or did not verify."""
