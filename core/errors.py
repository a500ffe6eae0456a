"""The one exception type users see, and one sentence for every other error family a user can cause.

The CLI and the dashboard show these sentences instead of tracebacks (``user_message``).
"""

from __future__ import annotations

import errno
import json


class MoEScopeError(ValueError):
    """Bad input or an unsupported model; the message is meant to be shown to the user as is."""


def _named(exc: BaseException, *names: str) -> bool:
    """Whether ``exc`` is of a class named ``names`` (checked by name so that this module imports neither
    pyarrow nor safetensors)."""
    return any(cls.__name__ in names for cls in type(exc).__mro__)


def user_message(exc: BaseException) -> str | None:
    """One sentence saying what went wrong and what to do, for every error family bad input or a full disk
    can cause; ``None`` for an unexpected error (a bug: show its type and offer the traceback)."""
    if isinstance(exc, MoEScopeError):
        return str(exc)
    if isinstance(exc, UnicodeDecodeError):
        return (f"A file is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 and try again.")
    if isinstance(exc, json.JSONDecodeError):
        return f"A JSON input is not valid JSON ({exc}); fix the file and try again."
    if isinstance(exc, RecursionError):
        return "An input is nested too deeply to read; check the JSON file you gave."
    if isinstance(exc, MemoryError):
        return "Ran out of memory; use a smaller batch size, fewer texts or a machine with more memory."
    if isinstance(exc, OSError):
        where = f" {exc.filename}" if exc.filename else ""
        if exc.errno == errno.ENOSPC:
            return f"No space left on the device while writing{where}; nothing was kept, free some space and rerun."
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"Cannot write or read{where}: {exc.strerror}; choose a path you have access to."
        if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
            return f"{exc.strerror}:{where or ' a path you gave'}; choose another path."
        return f"{exc.strerror or exc}{':' + where if where else ''}."
    if _named(exc, "SafetensorError"):
        return f"A safetensors file is corrupt or truncated ({exc}); download or export the checkpoint again."
    if _named(exc, "ArrowException"):
        return f"A Parquet file could not be read ({exc}); it is corrupt or not a MoEScope file."
    return None


class UnsupportedFamilyFeature(MoEScopeError):
    """A MoE family (or one of its layers) has a feature MoEScope cannot record, mask or export; the message names
    the feature and why, in one sentence."""
