"""User errors: bad input that ``finetail`` reports in one line, never as a traceback.

Every error a user can cause and fix (a misspelt name, a missing or corrupt file, an unsafe
archive, a training run that diverged) is a :class:`UserError`, or one of the standard
``ValueError`` / ``FileNotFoundError`` that the CLI also reports in one line. Tracebacks are
for bugs (``FINETAIL_DEBUG=1`` shows them for user errors too).
"""

from __future__ import annotations

__all__ = ["DiskFull", "NonFiniteError", "UserError"]


class UserError(Exception):
    """Bad input or a failed precondition the user can fix; the message names the thing."""


class NonFiniteError(UserError):
    """Training produced a NaN or infinite loss or weights (e.g. a learning rate far too high)."""


class DiskFull(UserError):
    """A write failed because the device holding ``folder`` is full (or over quota).

    finetail writes every result atomically and every checkpoint and MLflow write is a
    transaction, so a full device loses nothing: the job stops, and a rerun when there is
    room continues it (see :func:`finetail.fileio.disk_full_error`, which builds one from
    the exception a write raised).

    Parameters
    ----------
    folder : str or None
        The folder whose device is full (None: not known).
    detail : str
        The first line of what the write raised (``[Errno 28] No space left on device``,
        SQLite's ``database or disk is full``).
    """

    def __init__(self, folder: str | None, detail: str = "") -> None:
        self.folder, self.detail = folder, detail
        super().__init__(folder, detail)  # both in args: the error pickles (a tracking process sends it)

    def __str__(self) -> str:
        where = f"the device holding {self.folder}" if self.folder else "a device finetail writes to"
        because = f" ({self.detail})" if self.detail else ""
        return f"{where} is full{because}; nothing was lost: rerun when there is room"
