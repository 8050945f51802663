"""Errors the command line reports as such (exit code 2, no traceback), in a module that imports nothing, so
``mthl-ds --help`` and argument errors need no torch. ``ConfigError`` (mthl_ds.config) and ``ShardError``
(mthl_ds.data.shards) live with what raises them; both import light modules only."""


class ExportError(ValueError):
    """A file or checkpoint that cannot be exported or loaded; the message names it and what is wrong."""


class CheckpointError(ValueError):
    """A run's checkpoint that cannot be resumed from or read: a pointer to an incomplete step, a step DeepSpeed
    cannot find; the message names the folder."""


class InputError(ValueError):
    """An input given to predict or evaluate that cannot be used: a file that is not an image, an unknown
    dataset; the message names it."""
