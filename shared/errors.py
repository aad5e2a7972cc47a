"""Typed errors. Each message names the problem and what to do about it.

The CLI turns any :class:`FedRecError` into one line on stderr (no traceback).
"""


class FedRecError(Exception):
    """Base class for errors a user can fix (bad input, missing files, bad config)."""


class ConfigError(FedRecError, ValueError):
    """A configuration value is invalid or contradicts another one."""


class DataError(FedRecError, ValueError):
    """Input data is missing, malformed, or inconsistent."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset is not available locally and could not be downloaded."""


class ModelFileError(FedRecError):
    """A model artifact is corrupt, tampered with, or does not match this catalog."""


class PublishedVersionError(ModelFileError):
    """A model version is out already with another model: a published version never
    changes (devices may hold it, and they tell models apart by their version)."""


class PrivacyBudgetExceededError(FedRecError):
    """Training would spend more privacy than the configured budget allows."""


class RoundCapExceededError(FedRecError):
    """One round would take a client past one of its owner's per-round caps (the DP-SGD
    steps of a round, the epsilon a round spends): it declines that round, as it declines
    past its budget. ``cap`` names the cap's setting (``max-round-steps``,
    ``max-round-epsilon``), which is also the decline's kind on the wire."""

    def __init__(self, message: str, cap: str) -> None:
        super().__init__(message)
        self.cap = cap
