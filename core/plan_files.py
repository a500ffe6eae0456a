"""Reading a plan file's text safely: the path, the size bound, UTF-8 and JSON, each problem one sentence naming
the file. What the JSON must hold is ``plan_fields``' job."""

from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import MoEScopeError
from .plan_fields import too_deep

_T = TypeVar("_T")


def read_bounded(path: Path, limit: int) -> bytes:
    """The file's bytes, refusing folders and anything over ``limit`` bytes before reading it (and, for files that
    stat cannot size, such as pipes, after reading one byte more than the bound)."""
    info = _os_call(path, path.stat)
    if stat.S_ISDIR(info.st_mode):
        raise MoEScopeError(f"{path} is a folder, not a plan file; give the path of the plan JSON file.")
    if info.st_size > limit:
        raise too_large(str(path), limit)

    def read_head() -> bytes:
        with path.open("rb") as handle:
            return handle.read(limit + 1)

    data = _os_call(path, read_head)
    if len(data) > limit:
        raise too_large(str(path), limit)
    return data


def parse_plan_text(text: str | bytes, name: str, limit: int) -> Any:
    """The JSON document in ``text`` (at most ``limit`` long, UTF-8 when bytes); ``name`` is what messages call it."""
    if len(text) > limit:
        raise too_large(name, limit)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise MoEScopeError(f"{name} is not UTF-8 text (byte {exc.start} is 0x{text[exc.start]:02x}); "
                                f"save the plan as UTF-8 JSON.") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise too_deep(name) from None
    except json.JSONDecodeError as exc:
        raise MoEScopeError(f"{name} is not a MoEScope plan: it is not valid JSON ({exc}).") from None
    except ValueError:  # an integer longer than Python's 4300-digit limit
        raise MoEScopeError(f"{name} is not a MoEScope plan: it holds a number too long to read.") from None


def _os_call(path: Path, call: Callable[[], _T]) -> _T:
    """``call()``, with the ways the file system can refuse a plan path turned into one sentence."""
    try:
        return call()
    except (FileNotFoundError, NotADirectoryError):
        raise MoEScopeError(f"No plan file at {path}.") from None
    except IsADirectoryError:
        raise MoEScopeError(f"{path} is a folder, not a plan file; give the path of the plan JSON file.") from None
    except PermissionError:
        raise MoEScopeError(f"{path} cannot be read (permission denied); make the plan file readable.") from None
    except OSError as exc:
        raise MoEScopeError(f"{path} cannot be read ({exc.strerror or exc}); give a readable plan file.") from None
    except ValueError:  # a NUL byte in the path
        raise MoEScopeError(f"{str(path)!r} is not a valid file path; give the path of the plan JSON file.") from None


def too_large(name: str, limit: int) -> MoEScopeError:
    return MoEScopeError(f"{name} is larger than {limit // 2**20} MB, far more than any plan needs; "
                         f"check that it is a MoEScope plan.")
