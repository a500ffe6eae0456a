"""Atomic file and directory writes: a reader never sees half a file, and a failure leaves nothing behind.

Every temporary name MoEScope creates carries the writing process's PID and host
(``.<name>.moescope-<pid>-<random>@<host>.tmp``), so that the next run in the same folder can remove what a
killed process (``kill -9``, an OOM kill, a power cut) left behind, without touching temporaries of a live
process or of another machine sharing the folder. Files are created 0666 and folders 0777 before the umask
(so 0644 / 0755 under the usual umask), like any other program's output, not private as ``mkstemp`` makes them.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import MoEScopeError

_TEMP_NAME = re.compile(r"^\..+\.moescope-(?P<pid>\d+)-[0-9a-f]{8}@(?P<host>.+)\.(?:tmp|old)$")


def _host() -> str:
    return socket.gethostname().replace("/", "_") or "localhost"


def temporary_name(final: Path, suffix: str = "tmp") -> Path:
    """A fresh name beside ``final`` that :func:`remove_stale_temporaries` recognises as ours."""
    return final.with_name(f".{final.name}.moescope-{os.getpid()}-{secrets.token_hex(4)}@{_host()}.{suffix}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    except OSError:
        return True  # cannot tell: keep the file
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove temporaries in ``folder`` left by dead MoEScope processes on this host; return what was removed."""
    removed: list[Path] = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    host = _host()
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or match["host"] != host or _pid_alive(int(match["pid"])):
            continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def note(message: str) -> None:
    """A one-line notice on stderr (things MoEScope did on the user's behalf, such as removing stale files)."""
    print(f"note: {message}", file=sys.stderr)


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


def _make_parent(path: Path) -> None:
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise MoEScopeError(f"Cannot write {path}: {parent} is a file, not a folder; choose another output path.")
    for ancestor in parent.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise MoEScopeError(f"Cannot write {path}: {ancestor} is a file, not a folder; choose another "
                                    f"output path.")
            break
    parent.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(parent):
        note(f"removed {stale.name}, left in {parent} by an earlier MoEScope run that was killed")


def atomic_write_text(path: Path, text: str) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block finishes."""
    path = Path(path)
    _make_parent(path)
    tmp = temporary_name(path)
    _new_file(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def refuse_existing(target: Path, overwrite: bool) -> None:
    """Fail before any work is done when the output would replace something the user did not offer."""
    if Path(target).exists() and not overwrite:
        raise MoEScopeError(f"{target} already exists; choose another path or pass --overwrite.")


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` that becomes ``target`` only if the block finishes.

    Whether an existing ``target`` may be replaced is the caller's decision (``core.outputs``); it is
    replaced only after the new directory is complete, so an interrupted write never costs the old one.
    """
    target = Path(target)
    _make_parent(target)
    tmp = temporary_name(target)
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            trash = temporary_name(target, "old")
            os.replace(target, trash)
            os.replace(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
