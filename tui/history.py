"""Prompt history shared by the TUI and the REPL, in prompt_toolkit's FileHistory format
(``# timestamp`` line, then the entry's lines each prefixed with ``+``) so both front ends read
and extend the same file without the TUI importing prompt_toolkit."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from pathlib import Path


def load_history(path: Path, limit: int = 1000) -> list[str]:
    """Entries oldest first (at most the last ``limit``); a missing file is an empty history."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    entries: list[str] = []
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith("+"):
            lines.append(line[1:])
        elif lines:
            entries.append("\n".join(lines))
            lines = []
    if lines:
        entries.append("\n".join(lines))
    return entries[-limit:]


def append_history(path: Path, entry: str) -> OSError | None:
    """Add one entry; a history that cannot be written is not worth failing a prompt over:
    the error is returned, not raised."""
    size: int | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            size = f.tell()
            f.write(f"\n# {datetime.datetime.now()}\n")
            for line in entry.split("\n"):
                f.write(f"+{line}\n")
    except OSError as exc:
        take_back(path, size)
        return exc
    return None


def take_back(path: Path, size: int | None) -> None:
    """Cut a failed append off again, so the file ends with its last whole entry."""
    if size is not None:
        with contextlib.suppress(OSError):
            os.truncate(path, size)


class PromptHistory:
    """Up/Down navigation over past prompts: ``older``/``newer`` walk from the newest entry."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: list[str] = load_history(path) if path is not None else []
        self.position: int | None = None  # index into entries while browsing
        # A write that failed (a full disk, a directory there): said once through this, then
        # the history is kept in memory only.
        self.on_error: Callable[[str], None] | None = None
        self.failed = False

    def add(self, entry: str) -> None:
        self.position = None
        if not entry.strip() or (self.entries and self.entries[-1] == entry):
            return
        self.entries.append(entry)
        if self.path is None or self.failed:
            return
        error = append_history(self.path, entry)
        if error is not None:
            self.failed = True
            if self.on_error is not None:
                self.on_error(f"the prompt history {self.path} cannot be written "
                              f"({error.strerror or error}); history is kept for this run "
                              "only")

    def older(self) -> str | None:
        if not self.entries:
            return None
        self.position = (len(self.entries) if self.position is None else self.position) - 1
        self.position = max(self.position, 0)
        return self.entries[self.position]

    def newer(self) -> str | None:
        """The next newer entry, or '' past the newest (back to an empty editor)."""
        if self.position is None:
            return None
        self.position += 1
        if self.position >= len(self.entries):
            self.position = None
            return ""
        return self.entries[self.position]
