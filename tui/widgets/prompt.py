"""The prompt editor: multiline, Enter sends, Ctrl+J (or Alt+Enter, or Shift+Enter where the
terminal reports it) inserts a newline, pasted text is inserted as is, Up/Down on an empty
editor walk the prompt history."""

from __future__ import annotations

from dataclasses import dataclass

from glmchat.tui.history import PromptHistory
from textual import events
from textual.message import Message
from textual.widgets import TextArea

NEWLINE_KEYS = ("ctrl+j", "alt+enter", "shift+enter", "ctrl+enter")


class PromptEditor(TextArea):
    """Messages up: ``Submitted`` with the text; the app decides what it means."""

    @dataclass
    class Submitted(Message):
        editor: PromptEditor
        text: str

    def __init__(self, history: PromptHistory, *, id: str | None = None) -> None:
        super().__init__(id=id, soft_wrap=True, show_line_numbers=False, tab_behavior="focus",
                         compact=True, highlight_cursor_line=False)
        self.prompt_history = history
        self._recalled: str | None = None  # text last put here from history, unedited
        self.placeholder = "Type a prompt · Enter sends · Ctrl+J newline · /help for commands"

    def submit(self) -> None:
        text = self.text
        if not text.strip():
            return
        self.prompt_history.add(text)
        self._recalled = None
        self.clear()
        self.post_message(self.Submitted(self, text))

    def set_prompt(self, text: str) -> None:
        """Put ``text`` in the editor with the cursor at its end (edit a previous prompt)."""
        self.load_text(text)
        self.move_cursor(self.document.end)
        self._recalled = None

    def _browsing(self) -> bool:
        return not self.text or (self._recalled is not None and self.text == self._recalled)

    def _recall(self, entry: str | None) -> None:
        if entry is None:
            return
        self.load_text(entry)
        self.move_cursor(self.document.end)
        self._recalled = entry

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.submit()
            return
        if event.key in NEWLINE_KEYS:
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self._browsing():
            self._recall(self.prompt_history.older())
        else:
            super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if not select and self._browsing() and self.prompt_history.position is not None:
            self._recall(self.prompt_history.newer())
        else:
            super().action_cursor_down(select)
