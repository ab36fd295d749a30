"""Exceptions a user can cause. Each message names the problem and the fix in one line."""


class MuddError(ValueError):
    """Base class of every error caused by user input (config, files, token ids)."""


class ConfigError(MuddError):
    """An impossible or unknown configuration value."""


class CheckpointError(MuddError):
    """A model folder or weights file that cannot be loaded or written."""


class InputError(MuddError):
    """Model inputs out of range: token ids >= vocab_size, sequences longer than the context."""


class DependencyError(MuddError):
    """An installed dependency whose API differs from every version muddformer knows how to speak."""


class DataError(MuddError):
    """Missing, empty or inconsistent data."""
