"""The one error type for settings a user got wrong."""


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type, or does not fit with the others.

    The message always names the key, the value and what would work.
    """
