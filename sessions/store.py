"""SessionStore: the one way in to saved sessions (create, append, load, list, resolve, export,
remove).

Writing: a file is only ever appended to. Each append opens the file with O_APPEND, takes an
exclusive flock, writes its lines with one write(), fsyncs and closes, so a crash loses at most
the event being written and two processes appending to one file never interleave their lines.
A file is created by its first append, so a conversation with no turns leaves no file.

Reading: the header line must say it is a glmchat session of a version this glmchat knows;
a damaged line (a torn last line after a crash, say) is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from glmchat import __version__

from .domain import ModelRecord, PlacementSummary, Session, SessionEvent, SessionHeader
from .records import (
    FORMAT_NAME,
    FORMAT_VERSION,
    BadRecord,
    SessionFileError,
    SessionWriteError,
    dump_line,
    event_from_record,
    event_to_record,
    header_from_record,
    header_to_record,
)

SUFFIX = ".jsonl"
MAX_HEADER_BYTES = 1 << 20  # a longer first line is not a session header


def utc_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_event_id(prefix: str) -> str:
    """Random, so two processes appending to one file never make the same id."""
    return prefix + secrets.token_hex(5)


@dataclass
class SessionSummary:
    """One row of `glmchat sessions`."""

    id: str
    path: Path
    created: str
    model: str
    turns: int  # user turns, edits included
    first_prompt: str
    problem: str = ""  # why the file could not be read, if it could not


# ---- low level: one locked, appending write ------------------------------------------------------


@contextlib.contextmanager
def _locked_append_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)  # read: the last byte
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # closing drops the lock


def append_lines(path: Path, lines: bytes, header: bytes | None = None) -> bool:
    """Append ``lines`` to ``path``; write ``header`` first if the file is new or empty.
    Returns True when this call created the session (wrote the header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked_append_fd(path) as fd:
        size = os.fstat(fd).st_size
        data = lines
        created = False
        if size == 0:
            if header is None:
                raise SessionFileError(f"{path} is empty: it has no session header to append to")
            data = header + lines
            created = True
        elif os.pread(fd, 1, size - 1) != b"\n":
            # A torn last line (a crash mid-write): end it, so our line stays whole. The loader
            # skips the fragment with a warning.
            data = b"\n" + lines
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        except OSError:
            # Disk full, size limit, I/O error: take back the part that was written, so the
            # file ends with the last whole event as it did before.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    if created:
        _fsync_dir(path.parent)
    return created


def check_writable(path: Path, *, new: bool = False) -> None:
    """Raise SessionFileError (a usage error) unless a session can be appended to ``path``
    (``new``: created there, nothing there yet). Its directory must exist: a typo in a
    --session path is an error, not a new directory tree."""
    where = path.parent
    if path.is_dir():
        raise SessionFileError(f"{path} is a directory; pass a session file path")
    if not where.exists():
        raise SessionFileError(f"cannot save to {path}: the directory {where} does not exist; "
                               "create it or pass another --session path")
    if not where.is_dir():
        raise SessionFileError(f"cannot save to {path}: {where} is not a directory")
    if path.exists():
        if new:
            raise SessionFileError(f"{path} exists already; pick a new file name")
        probe_target: Path | None = None
        flags = os.O_WRONLY | os.O_APPEND
    else:
        probe_target = where / f".glmchat-probe-{os.getpid()}-{secrets.token_hex(3)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        os.close(os.open(probe_target or path, flags, 0o600))
    except OSError as exc:
        raise SessionFileError(f"cannot save to {path} ({exc.strerror or exc}); pass a "
                               "writable --session path, or --no-save") from None
    finally:
        if probe_target is not None:
            with contextlib.suppress(OSError):
                probe_target.unlink()


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---- reading -------------------------------------------------------------------------------------


def _not_a_session(path: Path, why: str) -> SessionFileError:
    return SessionFileError(f"{path} is not a glmchat session file ({why})")


def read_header(path: Path) -> SessionHeader:
    """Only the first line: cheap, and enough to refuse a file that is not a session."""
    try:
        with path.open("rb") as f:
            first = f.readline(MAX_HEADER_BYTES)
    except FileNotFoundError:
        raise SessionFileError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise SessionFileError(f"{path} is a directory, not a session file") from None
    except OSError as exc:
        raise SessionFileError(f"{path} cannot be read ({exc.strerror})") from None
    return _parse_header(path, first)


def _parse_header(path: Path, first: bytes) -> SessionHeader:
    if not first:
        raise SessionFileError(f"{path} is empty: not a glmchat session (no header line)")
    if not first.endswith(b"\n"):
        raise _not_a_session(path, "its first line is incomplete or not text")
    try:
        record = json.loads(first.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _not_a_session(path, "its first line is not a JSON session header") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise _not_a_session(path, "its first line is not a session header")
    version = record.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _not_a_session(path, f"its header has no valid format version ({version!r})")
    if version > FORMAT_VERSION:
        raise SessionFileError(
            f"{path} was written by a newer glmchat (session format {version}; this glmchat "
            f"{__version__} reads up to format {FORMAT_VERSION}); upgrade glmchat to open it")
    try:
        return header_from_record(record)
    except BadRecord as exc:
        raise _not_a_session(path, f"its header is damaged: {exc}") from None


def load_session(path: Path) -> Session:
    header = read_header(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SessionFileError(f"{path} cannot be read ({exc.strerror})") from None
    lines = data.split(b"\n")
    torn = lines[-1]  # b"" when the file ends with a newline, as a whole file does
    session = Session(path=path, header=header)
    for number, line in enumerate(lines[1:-1], start=2):
        if not line.strip():
            continue
        try:
            session.events.append(event_from_record(json.loads(line.decode("utf-8"))))
        except (UnicodeDecodeError, ValueError) as exc:
            why = str(exc) if isinstance(exc, BadRecord) else "not valid JSON"
            session.warnings.append(f"{path}: line {number} is damaged ({why}); skipped it")
    if torn:
        session.warnings.append(
            f"{path}: the last line is incomplete (glmchat stopped while writing it?); "
            "skipped it")
    return session


# ---- the facade ----------------------------------------------------------------------------------


class SessionStore:
    """Sessions in ``directory`` (files named <id>.jsonl), and session files anywhere else."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    # ---- creating and appending

    def new_session(self, model: ModelRecord, placement: PlacementSummary | None = None,
                    path: Path | None = None) -> Session:
        """A session in memory; its file appears with the first ``append``."""
        now = dt.datetime.now(dt.UTC)
        session_id = now.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
        header = SessionHeader(id=session_id, created=now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                               format_version=FORMAT_VERSION, glmchat_version=__version__,
                               model=model, placement=placement)
        return Session(path=path or self.directory / f"{session_id}{SUFFIX}", header=header)

    def append(self, session: Session, *events: SessionEvent) -> None:
        """Write ``events`` to the session's file (creating it with its header) and add them to
        ``session.events``."""
        lines = b"".join(dump_line(event_to_record(e)) for e in events)
        try:
            append_lines(session.path, lines, dump_line(header_to_record(session.header)))
        except OSError as exc:
            raise SessionWriteError(f"cannot save to {session.path} "
                                    f"({exc.strerror or exc})") from None
        session.events.extend(events)

    def write_copy(self, session: Session, path: Path) -> None:
        """Write the whole session (header and every event) to a new file ``path``: to a
        temporary file next to it, fsynced, then renamed, so ``path`` is whole or absent."""
        check_writable(path, new=True)
        data = dump_line(header_to_record(session.header)) + b"".join(
            dump_line(event_to_record(e)) for e in session.events)
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(3)}.tmp")
        try:
            with temporary.open("xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(temporary, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise SessionWriteError(f"cannot save to {path} ({exc.strerror or exc})") from None
        _fsync_dir(path.parent)

    # ---- finding and reading

    def load(self, path: Path) -> Session:
        return load_session(path)

    def open(self, ref: str) -> Session:
        return load_session(self.resolve(ref))

    def paths(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir()
                      if p.suffix == SUFFIX and p.is_file())

    def resolve(self, ref: str) -> Path:
        """A session file from an id (or a unique start of one) or a path."""
        as_path = Path(ref).expanduser()
        if as_path.is_file() or os.sep in ref or ref.endswith(SUFFIX):
            return as_path
        exact = self.directory / f"{ref}{SUFFIX}"
        if exact.is_file():
            return exact
        matches = [p for p in self.paths() if p.stem.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            names = ", ".join(p.stem for p in matches[:5])
            raise SessionFileError(f"{ref!r} matches {len(matches)} sessions ({names}); "
                                   "type more of the id")
        raise SessionFileError(f"no session {ref!r} in {self.directory} and no such file; "
                               "`glmchat sessions` lists them")

    def summaries(self) -> list[SessionSummary]:
        """Every session in the directory, newest first; unreadable files say why."""
        out = []
        for path in self.paths():
            try:
                session = load_session(path)
            except SessionFileError as exc:
                out.append(SessionSummary(id=path.stem, path=path, created="", model="",
                                          turns=0, first_prompt="", problem=str(exc)))
                continue
            out.append(SessionSummary(
                id=session.id if session.id == path.stem else path.stem, path=path,
                created=session.header.created, model=session.latest_model().name,
                turns=len(session.user_turns()), first_prompt=session.first_prompt()))
        out.sort(key=lambda s: (bool(s.created), s.created), reverse=True)
        return out

    # ---- export and removal

    def export(self, session: Session, fmt: str) -> str:
        from .export import to_json, to_markdown

        if fmt == "md":
            return to_markdown(session)
        if fmt == "json":
            return to_json(session)
        raise SessionFileError(f"unknown export format {fmt!r}; use md or json")

    def remove(self, session: Session) -> None:
        """Delete a session's file (only a file that loaded as a session gets here)."""
        try:
            session.path.unlink()
        except OSError as exc:
            raise SessionFileError(f"cannot remove {session.path} ({exc.strerror})") from None
