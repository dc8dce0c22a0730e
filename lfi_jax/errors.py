"""Errors that are the user's to fix (a bad config key, a missing file, data that does not fit
the model), as distinct from bugs.

Entry points run under `lfi_jax.cli.run_cli`, which prints a `UserError` (and the built-in
ValueError, KeyError, FileNotFoundError, NotADirectoryError) as one `error: ...` line with exit
code 2, and a traceback only for anything else (or with `--debug`). Raise `UserError` with a
message that names the config key, file or example id and what was expected.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message (one line) names the key, file or example and both sides."""


class ConfigKeyError(UserError, KeyError):
    """An unknown config key (`--config.model.foo=1`); also a KeyError for older callers."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


__all__ = ["ConfigKeyError", "UserError"]
