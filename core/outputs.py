"""What MoEScope may write over, and one writer per output at a time.

**Overwriting.** ``--overwrite`` replaces a target only when the target is an earlier MoEScope output of the
same kind (:func:`check_output`): an export directory holding ``moescope-plan.json`` and nothing but
checkpoint files, a profile whose sidecar says ``moescope-profile``, a plan JSON, a sweep table, an HTML
report whose head names MoEScope as its generator, a compare folder holding ``moescope-compare.json``
and its CSVs only. Anything else
is refused even with ``--overwrite``: a folder holding the source model (compared by resolved path and by
inode, so symlinks, ``..`` and bind mounts do not hide it), the current or home directory, a folder with
other files, a foreign ``config.json`` that a profile's sidecar would replace.

**Locking.** :func:`output_lock` holds an OS lock (``fcntl.flock``) on ``.<name>.moescope-lock`` beside the
output for the whole run; a second run refuses at once, naming the holder's PID and host. The OS releases the
lock when its process dies, so a lock left by a killed process never blocks. Ranks of one sharded job
(torchrun, a Slurm array) share the lock when they present the same job fingerprint; another job is refused.
We use ``fcntl`` directly rather than ``filelock`` because sharing between ranks needs shared (``LOCK_SH``)
locks, which ``filelock`` does not offer; ``filelock`` also truncates the lock file when it tries, which would
erase the holder's name.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import MoEScopeError

try:  # POSIX; MoEScope's writers need it (Linux and macOS)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

EXPORT_MARKER = "moescope-plan.json"
PROFILE_FORMAT = "moescope-profile"
PLAN_FORMAT = "moescope-plan"
KINDS = ("export", "profile", "plan", "table", "report", "compare")
COMPARE_MARKER = "moescope-compare.json"  # in every folder ``moescope compare --out`` writes
COMPARE_FILES = (COMPARE_MARKER, "usage_diff.csv", "divergence.csv", "flows.csv")
REPORT_MARKER = '<meta name="generator" content="moescope-report">'  # in the head of every HTML report

# Files an export directory may hold besides the marker: what save_pretrained and tokenizers write.
_EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                 "README.md", EXPORT_MARKER)


def _same_file(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.stat(), b.stat()
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _ancestors(path: Path) -> list[Path]:
    """``path`` resolved and every folder above it."""
    resolved = path.resolve()
    return [resolved, *resolved.parents]


def _overlaps(target: Path, source: Path) -> str | None:
    """How ``target`` overlaps ``source`` ("is", "contains", "is inside"), by resolved path and by inode (a bind
    mount or hard link shows the same inode under another path); else None."""
    above_source, above_target = _ancestors(source), _ancestors(target)
    if above_target[0] == above_source[0] or _same_file(target, source):
        return "is"
    if above_target[0] in above_source[1:] or any(_same_file(target, p) for p in above_source[1:]):
        return "contains"
    if above_source[0] in above_target[1:] or any(_same_file(p, source) for p in above_target[1:]):
        return "is inside"
    return None


def _reads_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def is_profile_sidecar(path: Path) -> bool:
    data = _reads_json(path)
    return isinstance(data, dict) and data.get("format") == PROFILE_FORMAT


def _is_moescope_output(target: Path, kind: str) -> str | None:
    """None when ``target`` is an earlier MoEScope output of ``kind``; else why it is not."""
    if kind == "export":
        if not target.is_dir():
            return "it is not a directory"
        if not (target / EXPORT_MARKER).is_file():
            return f"it holds no {EXPORT_MARKER}, so MoEScope did not write it"
        foreign = sorted(p.name for p in target.iterdir()
                         if p.name not in _EXPORT_FILES and not (p.name.startswith("model-") and p.suffix == ".safetensors"))
        if foreign:
            return f"it also holds {', '.join(foreign[:3])}{' …' if len(foreign) > 3 else ''}, which an export does not write"
        return None
    if kind == "compare":
        if not target.is_dir():
            return "it is not a directory"
        if not (target / COMPARE_MARKER).is_file():
            return f"it holds no {COMPARE_MARKER}, so MoEScope did not write it"
        foreign = sorted(p.name for p in target.iterdir() if p.name not in COMPARE_FILES)
        if foreign:
            more = " …" if len(foreign) > 3 else ""
            return f"it also holds {', '.join(foreign[:3])}{more}, which a compare does not write"
        return None
    if not target.is_file():
        return "it is not a file"
    if kind == "profile":
        side = target.with_suffix(".json")
        if not is_profile_sidecar(side):
            return f"{side.name} beside it is not a MoEScope profile sidecar"
        return None
    if kind == "plan":
        data = _reads_json(target)
        return None if isinstance(data, dict) and data.get("format") == PLAN_FORMAT else "it is not a MoEScope plan"
    if kind == "table":
        from .results import load_table

        try:
            load_table(target)
        except MoEScopeError:
            return "it is not a MoEScope sweep table"
        return None
    if kind == "report":
        try:
            with target.open(encoding="utf-8", errors="replace") as f:
                head = f.read(4096)
        except OSError:
            head = ""
        return None if REPORT_MARKER in head else "it is not a MoEScope report"
    raise ValueError(f"unknown output kind {kind!r}")


def check_output(target: str | Path, kind: str, overwrite: bool = False, sources: Iterable[str | Path] = (),
                 source_label: str = "source model") -> Path:
    """Refuse, in one sentence, an output path that would destroy something MoEScope did not write.

    ``sources`` are inputs of the run (the model directory, the profiles being merged): the target may never
    be, contain or lie inside a source directory, nor be a source file. Returns the absolute target path.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    target = Path(target).expanduser().absolute()
    for source in sources:
        source = Path(source).expanduser()
        if not source.exists():
            continue  # a hub id, not a local path
        how = _overlaps(target, source)
        if how:
            raise MoEScopeError(f"{target} {how} the {source_label} {source}; MoEScope never writes over its "
                                f"inputs, so choose an output outside it.")
    if kind == "profile":
        side = target.with_suffix(".json")
        if target.suffix != ".parquet":
            raise MoEScopeError(f"Profile path {target} must end in .parquet (the sidecar goes beside it as .json).")
        if side.exists() and not is_profile_sidecar(side):
            raise MoEScopeError(f"{side} exists and is not a MoEScope profile sidecar; a profile at {target.name} would "
                                f"replace it, so choose another profile name.")
    for ancestor in target.parents:  # an output "under a file" cannot be written
        if ancestor.exists():
            if not ancestor.is_dir():
                raise MoEScopeError(f"Cannot write {target}: {ancestor} is a file, not a folder; choose another "
                                    f"output path.")
            break
    if not target.exists() and not target.is_symlink():
        return target
    if not overwrite:
        noun = "directory" if kind in ("export", "compare") else "path"
        raise MoEScopeError(f"{target} already exists; choose another {noun} or pass --overwrite.")
    protected = {Path.cwd(): "the current directory", Path.home(): "your home directory", Path("/"): "the root"}
    for folder, what in protected.items():
        if _same_file(target, folder) or target.resolve() == folder.resolve():
            raise MoEScopeError(f"{target} is {what}; --overwrite never replaces it, so choose a new directory.")
    why = _is_moescope_output(target, kind)
    if why:
        raise MoEScopeError(f"{target} exists and {why}; --overwrite replaces only an earlier MoEScope {kind}, so "
                            f"choose another path.")
    return target


# ----- one writer per output ---------------------------------------------------------------------------
def lock_path(target: str | Path) -> Path:
    target = Path(target).absolute()
    return target.with_name(f".{target.name}.moescope-lock")


def _flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _still_at(fd: int, path: Path) -> bool:
    """Whether the locked file is still the one at ``path`` (a releasing holder may have unlinked it)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _acquire(path: Path, me: dict, target: Path) -> int:
    """Open and lock ``path``: exclusively, or shared with the ranks of ``me["job"]``. Returns the fd."""
    job = me["job"]
    for _attempt in range(50):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if _flock(fd, fcntl.LOCK_EX):  # nobody holds it
            if not _still_at(fd, path):
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            if job is None:
                return fd
            # Let this job's other ranks in. Linux converts a flock by dropping it first, so another process
            # may slip in: then SH fails or the record names another job, and this rank refuses.
            if _flock(fd, fcntl.LOCK_SH) and _holder(fd).get("job") == job and _still_at(fd, path):
                return fd
        else:
            holder = _holder(fd)
            if job is not None and holder.get("job") == job:
                if _flock(fd, fcntl.LOCK_SH):
                    if _still_at(fd, path):
                        return fd
                    os.close(fd)
                    continue
                os.close(fd)  # the job's first rank is converting its lock: try again shortly
                time.sleep(0.02)
                continue
            os.close(fd)
            who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
            raise MoEScopeError(f"{target} is being written by {who}; wait for it to finish or choose another output.")
        holder = _holder(fd)
        os.close(fd)
        who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
        raise MoEScopeError(f"{target} is being written by {who}; wait for it to finish or choose another output.")
    raise MoEScopeError(f"Could not lock {target} (its lock file {path} keeps changing); try again.")


@contextlib.contextmanager
def output_lock(target: str | Path, job: str | None = None) -> Iterator[None]:
    """Hold the output's lock for the block; refuse at once if another run holds it.

    ``job``: the fingerprint of a sharded job whose ranks write the same output together; ranks presenting
    the same fingerprint share the lock, any other run is refused. ``None``: this process alone. The lock file
    is removed by the last holder, so nothing stays behind (a killed holder's file is reused, never obeyed).
    """
    if fcntl is None:  # pragma: no cover - no OS locks on this platform: proceed unlocked
        yield
        return
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, {"pid": os.getpid(), "host": socket.gethostname(), "job": job}, Path(target))
    try:
        yield
    finally:
        try:
            if _flock(fd, fcntl.LOCK_EX) and _still_at(fd, path):  # the last holder: remove the file
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # releases the flock
