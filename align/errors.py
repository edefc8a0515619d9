"""The one exception hierarchy of align. Imports nothing: it is the one module every layer may import
(align.kernels, align.tools, align.rewards, align.rollouts and the core), so every error of ours can share a base.

    AlignError                 every exception class under align.* derives from it
      UserError                the user can fix it: one line that names the fix; the CLI prints it, exit 2
        ConfigError            a bad config key or value
        CheckpointError        a missing or corrupt checkpoint
        MissingFileError       a path the user gave does not exist
      DistributedError         a rank died or stalled past the process-group timeout; the CLI prints it, exit 1

Classes that callers used to catch as a builtin (ValueError, KeyError, RuntimeError, FileNotFoundError) keep
that builtin as a second base, so `except ValueError` still catches them.
"""


class AlignError(Exception):
    """Base of every exception raised by align (catch this to catch all of ours)."""


class UserError(AlignError):
    """Something the user can fix (a bad config key, a missing file, an unknown name). One line, names the fix."""


class ConfigError(UserError, ValueError):
    """An invalid configuration value or key."""


class CheckpointError(UserError):
    """A missing or corrupt checkpoint; never silently replaced by a fresh start."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist; the message says what to give instead."""


class DistributedError(AlignError, RuntimeError):
    """Another rank died or stalled past `distributed.timeout_s`, or the process group could not form. One line."""
