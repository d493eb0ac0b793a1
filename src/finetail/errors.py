"""User errors: bad input that ``finetail`` reports in one line, never as a traceback.

Every error a user can cause and fix (a misspelt name, a missing or corrupt file, an unsafe
archive, a training run that diverged) is a :class:`UserError`, or one of the standard
``ValueError`` / ``FileNotFoundError`` that the CLI also reports in one line. Tracebacks are
for bugs (``FINETAIL_DEBUG=1`` shows them for user errors too).
"""

from __future__ import annotations

__all__ = ["NonFiniteError", "UserError"]


class UserError(Exception):
    """Bad input or a failed precondition the user can fix; the message names the thing."""


class NonFiniteError(UserError):
    """Training produced a NaN or infinite loss or weights (e.g. a learning rate far too high)."""
