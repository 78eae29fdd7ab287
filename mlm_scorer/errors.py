"""Errors raised by mlm-scorer. Each message says what went wrong and, where there is one, the fix.

The library raises these; only the CLI turns them into exit codes (see ``cli.py``).
"""
from __future__ import annotations

import signal


class MlmScorerError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1


class UsageError(MlmScorerError):
    """Bad arguments: conflicting options, an unknown column, a missing file."""

    exit_code = 2


class SettingError(UsageError):
    """A setting out of range, or settings that cannot go together (``settings.ScoreSettings``). ``option``
    names the setting; ``cli`` is the message in the command line's terms (its flags), which ``mlm-score``
    prints."""

    def __init__(self, message: str, *, option: str | None = None, cli: str | None = None):
        super().__init__(message)
        self.option = option
        self.cli = cli or message


class InputError(MlmScorerError):
    """A row of the input cannot be scored. Carries where: file, line (1-based) and column."""

    exit_code = 3

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 column: int | None = None, reason: str = "bad_row"):
        self.path, self.line, self.column, self.reason = path, line, column, reason
        self.detail = message
        where = ":".join(str(p) for p in (path, line, column) if p is not None)
        super().__init__(f"{where}: {message}" if where else message)


class ModelError(MlmScorerError):
    """A model directory or checkpoint is missing, malformed, or does not match what is needed."""

    exit_code = 4


class EngineError(MlmScorerError):
    """The engine failed to run a batch (a server down past the retry budget, an out-of-memory...)."""

    exit_code = 5


class UnknownEngineError(UsageError):
    """``get_engine`` was asked for a name it does not know; the message lists the known ones."""


class MissingDependencyError(UsageError):
    """An optional extra is needed: the message says which ``pip install`` gives it."""


class StorageError(MlmScorerError, OSError):
    """The system refused a read or write (disk full, permission denied, an I/O error). Still an OSError;
    the original one is ``__cause__``."""

    exit_code = 1


class Interrupted(KeyboardInterrupt):
    """The run was stopped by SIGINT or SIGTERM (``signum``). A KeyboardInterrupt, so code that handles
    Ctrl-C keeps working; exit code 128 + signum. ``explained``: the message says what is committed and
    how to resume (set by the pipeline once it has stopped)."""

    def __init__(self, message: str = "interrupted", *, signum: int = signal.SIGINT, explained: bool = False):
        super().__init__(message)
        self.signum = int(signum)
        self.explained = explained

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
