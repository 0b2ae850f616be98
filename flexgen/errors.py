"""User-facing errors.

Every mistake a user can make (a bad config value, a missing file, an unknown plugin, a bad
prompt) is raised as a :class:`FlexGenError` whose message is one line naming the key, file or
value at fault. The CLI prints that line and exits non-zero; it never prints a traceback for
these.
"""


class FlexGenError(Exception):
    """A problem with the user's input, reported as one line."""


class PolicyError(FlexGenError, ValueError):
    """A policy value is out of range or inconsistent."""


class ConfigError(FlexGenError, ValueError):
    """A config key is unknown, or its value has the wrong type or range."""


class PluginError(FlexGenError, LookupError):
    """A plugin name is unknown, or its package failed to import."""


class CheckpointError(FlexGenError, OSError):
    """A checkpoint directory or weight file is missing, not OPT, truncated or corrupt."""


class PromptError(FlexGenError, ValueError):
    """A prompt is empty, too long, or holds a token id outside the vocabulary."""


class StorageError(FlexGenError, OSError):
    """A storage tier cannot keep what it is given: the offload folder is a file, not writable, or full."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the run stops as it does on Ctrl-C (finished blocks kept), with its own exit status.

    A KeyboardInterrupt so that Lightning's interrupt handling (callbacks' ``on_exception``, the
    strategy's teardown, stopping the processes it started) treats both signals alike.
    """
