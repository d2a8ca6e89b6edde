"""Build a directory in full, then publish it in one rename: a reader (a later start) sees the
old directory or the whole new one, never a half-made one. Used by every conversion that
writes into the cache (GGUF → safetensors, GLM-130B shards, quantized and packed copies).

The temporary directory's name says who builds it (``<prefix><pid>.<start time>-…``): a
conversion that was killed leaves it behind, and the next conversion into the same place
removes every such directory whose owner is no longer running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from glmchat.errors import GlmchatError, UsageError

# A leftover from before names carried their owner: stale once this old (untouched so long).
LEGACY_STALE_S = 24 * 3600
CACHE_HINT = "set XDG_CACHE_HOME to a writable directory with room for the model"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc cannot say): a pid
    that was reused belongs to a process with another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def owner_tag(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}.{_start_time(pid)}"


def _running(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    return not start or not sys.platform.startswith("linux") or _start_time(pid) == start


def is_stale(path: Path, prefix: str) -> bool:
    """Whether ``path`` (a ``prefix…`` leftover) belongs to no running process."""
    owner = path.name[len(prefix):].split("-", 1)[0]
    pid, _, start = owner.partition(".")
    if pid.isdigit() and "-" in path.name[len(prefix):]:
        return not _running(int(pid), start)
    try:
        return time.time() - path.stat().st_mtime > LEGACY_STALE_S
    except OSError:
        return False


def remove_stale(parent: Path, prefix: str) -> list[Path]:
    """Remove the ``prefix*`` directories in ``parent`` that killed conversions left."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in parent.iterdir():
            if entry.name.startswith(prefix) and entry.is_dir() and is_stale(entry, prefix):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def _debug_stall() -> None:
    """A fault injector for the tests (tests/faults): GLMCHAT_DEBUG_STALL="convert:S" waits S
    seconds with the conversion written but not yet published, so a test can kill it there."""
    kind, _, value = os.environ.get("GLMCHAT_DEBUG_STALL", "").partition(":")
    if kind == "convert":
        time.sleep(float(value))


@contextmanager
def building(target: Path, prefix: str, parent: Path | None = None,
             hint: str = CACHE_HINT) -> Iterator[Path]:
    """Yield a fresh temporary directory in ``parent`` (default: beside ``target``); when the
    block ends without an exception it replaces ``target``, else it is removed. A directory
    that cannot be made is a UsageError, a write into it that fails (disk full, a size limit)
    a GlmchatError: one line naming the place and ``hint``."""
    parent = parent or target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale(parent, prefix)
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}-", dir=parent))
    except OSError as exc:
        why = "a file is where a directory should be" if isinstance(
            exc, (FileExistsError, NotADirectoryError)) else exc.strerror or str(exc)
        raise UsageError(f"cannot write {parent} ({why}); {hint}") from None
    try:
        try:
            yield tmp
        except OSError as exc:
            if exc.filename is None or str(tmp) in str(exc.filename):
                raise GlmchatError(f"cannot write {parent} ({exc.strerror or exc}); "
                                   f"{hint}") from None
            raise
        except Exception as exc:  # safetensors says I/O errors in its own words
            why = str(exc).partition("I/O error: ")[2]
            if type(exc).__name__ != "SafetensorError" or not why:
                raise
            raise GlmchatError(f"cannot write {parent} ({why.split(' (os error')[0]}); "
                               f"{hint}") from None
        _debug_stall()
        aside = tmp.with_name(tmp.name + ".old")
        try:
            if target.exists():  # moved away whole, so a kill never leaves a half of it
                os.replace(target, aside)
            os.replace(tmp, target)
        except OSError as exc:
            raise UsageError(f"cannot write {target} ({exc.strerror or exc}); "
                             f"{hint}") from None
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
