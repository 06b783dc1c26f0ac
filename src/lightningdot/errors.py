"""Errors a user can act on. The CLI prints their message without a traceback."""


class LightningDotError(Exception):
    """Base class for errors caused by input (files, configs, queries), not by bugs."""


class DataError(LightningDotError):
    """A missing, empty or malformed data file or folder."""


class ConfigMismatchError(LightningDotError):
    """A checkpoint, feature store or index made with a different configuration."""
