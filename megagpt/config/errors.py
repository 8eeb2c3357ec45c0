"""The error type for settings a user got wrong."""

from megagpt.errors import MegagptError


class ConfigError(MegagptError):
    """A setting is unknown, of the wrong type, or does not fit with the others.

    The message always names the key, the value and what would work.
    """
