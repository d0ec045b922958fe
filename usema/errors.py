"""The one error contract: UsemaError (printed by the CLI as one line, exit 2) and os_reason."""

from __future__ import annotations



class UsemaError(Exception):
    """An error caused by the user's input (file, key, flag); the CLI prints it as one line and exits 2."""


def os_reason(exc: BaseException) -> str:
    """One line describing an OS / stream error (``strerror`` when set; torch's messages span lines)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return " ".join(str(text).split())[:200]
