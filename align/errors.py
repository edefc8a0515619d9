"""Errors a user can cause. The CLI prints these as one line (no traceback) and exits with status 2."""


class UserError(Exception):
    """Something the user can fix (a bad config key, a missing file, an unknown name). One line, names the fix."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value or key."""


class CheckpointError(UserError):
    """A missing or corrupt checkpoint; never silently replaced by a fresh start."""
