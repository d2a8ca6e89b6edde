"""Prompt history shared by the TUI and the REPL, in prompt_toolkit's FileHistory format
(``# timestamp`` line, then the entry's lines each prefixed with ``+``) so both front ends read
and extend the same file without the TUI importing prompt_toolkit."""

from __future__ import annotations

import datetime
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


def append_history(path: Path, entry: str) -> None:
    """Add one entry; a history that cannot be written is not worth failing a prompt over."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(f"\n# {datetime.datetime.now()}\n")
            for line in entry.split("\n"):
                f.write(f"+{line}\n")
    except OSError:
        pass


class PromptHistory:
    """Up/Down navigation over past prompts: ``older``/``newer`` walk from the newest entry."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: list[str] = load_history(path) if path is not None else []
        self.position: int | None = None  # index into entries while browsing

    def add(self, entry: str) -> None:
        self.position = None
        if not entry.strip() or (self.entries and self.entries[-1] == entry):
            return
        self.entries.append(entry)
        if self.path is not None:
            append_history(self.path, entry)

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
