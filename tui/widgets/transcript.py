"""The transcript: prompts, replies rendered as Markdown with a stats line each, and notices
(help, errors, crashes) that are not part of the conversation. Stays scrolled to the bottom while
a reply streams, until the user scrolls up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.events import Click
from textual.message import Message
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Static

if TYPE_CHECKING:
    from markdown_it import MarkdownIt

RENDER_EVERY_S = 1 / 15  # a fast model's tokens are coalesced into at most this many repaints


def chat_markdown_parser() -> MarkdownIt:
    """Markdown as chat models write it: a single newline is a line break, not a space."""
    from markdown_it import MarkdownIt

    return MarkdownIt("gfm-like", {"breaks": True})


class UserPrompt(Static, can_focus=True):
    """One prompt. Enter or a click asks to edit it (the turns after it will be replaced)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter,e", "edit", "Edit & resend")]

    @dataclass
    class EditRequested(Message):
        turn_index: int

    def __init__(self, text: str, turn_index: int) -> None:
        super().__init__(Text(text), classes="prompt")
        self.turn_index = turn_index
        self.border_title = "You"

    def action_edit(self) -> None:
        self.post_message(self.EditRequested(self.turn_index))

    def on_click(self, event: Click) -> None:
        if event.chain == 2:
            self.action_edit()


class Reply(Vertical):
    """One reply. Text arrives as appended fragments or (beam search) whole replacements; the
    Markdown is re-rendered on a timer, so a fast stream costs a bounded number of repaints."""

    def __init__(self, turn_index: int) -> None:
        # Imported with the first reply, not at start: markdown-it is a good part of a first
        # paint's budget.
        from textual.widgets import Markdown

        super().__init__(classes="reply")
        self.turn_index = turn_index
        self.text = ""
        self._rendered = 0  # characters of self.text the Markdown already holds
        self._replaced = False  # the text was replaced, not appended: render it whole
        self._timer: Timer | None = None
        self.border_title = "Assistant"
        # Held, not queried: the app may set the status before the children are mounted.
        self.markdown = Markdown("", classes="reply-text", parser_factory=chat_markdown_parser)
        self.stats = Static("", classes="reply-stats")

    def compose(self) -> ComposeResult:
        yield self.markdown
        yield self.stats

    def on_mount(self) -> None:
        self._timer = self.set_interval(RENDER_EVERY_S, self._render_pending)

    def append_text(self, fragment: str) -> None:
        self.text += fragment

    def replace_text(self, text: str) -> None:
        self.text = text
        self._replaced = True

    def set_status(self, status: str, error: bool = False) -> None:
        self.stats.update(Text(status))
        self.stats.set_class(error, "error")

    async def _render_pending(self) -> None:
        markdown = self.markdown
        if not markdown.is_mounted:
            return
        if self._replaced:
            self._replaced = False
            self._rendered = len(self.text)
            await markdown.update(self.text)
        elif len(self.text) > self._rendered:
            fragment = self.text[self._rendered:]
            self._rendered = len(self.text)
            await markdown.append(fragment)

    async def finish(self, text: str, stats: str, error: bool = False,
                     spans: list[tuple[int, int]] | None = None) -> None:
        """The reply is over: render ``text`` exactly and show ``stats`` under it. ``spans``:
        character ranges that infilling wrote, shown highlighted in the plain text."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.text = text
        self._rendered = len(text)
        self._replaced = False
        markdown = self.markdown
        if spans:
            markdown.display = False
            highlighted = Text(text)
            for start, end in spans:
                highlighted.stylize("bold reverse", start, end)
            await self.mount(Static(highlighted, classes="reply-infill"), before=markdown)
        else:
            await markdown.update(text)
        self.set_status(stats, error)


class Notice(Static):
    """Something the app tells the user: command output, errors, a crash and what to do."""

    def __init__(self, text: str, kind: str = "info") -> None:
        super().__init__(Text(text), classes=f"notice {kind}")


class Transcript(VerticalScroll):
    """Attributes down: the app mounts prompts, replies and notices through these methods."""

    def on_mount(self) -> None:
        self.anchor()

    async def add_prompt(self, text: str, turn_index: int) -> UserPrompt:
        prompt = UserPrompt(text, turn_index)
        await self.mount(prompt)
        self.anchor()
        return prompt

    async def add_reply(self, turn_index: int) -> Reply:
        reply = Reply(turn_index)
        await self.mount(reply)
        self.anchor()
        return reply

    async def add_notice(self, text: str, kind: str = "info") -> Notice:
        notice = Notice(text, kind)
        await self.mount(notice)
        self.anchor()
        return notice

    def turn_widgets(self) -> list[UserPrompt | Reply]:
        return [w for w in self.children if isinstance(w, UserPrompt | Reply)]

    def reply_for(self, turn_index: int) -> Reply | None:
        for widget in self.children:
            if isinstance(widget, Reply) and widget.turn_index == turn_index:
                return widget
        return None

    async def remove_from_turn(self, turn_index: int) -> None:
        """Remove turn ``turn_index``, every later turn and the notices between them."""
        children = list(self.children)
        for position, widget in enumerate(children):
            if isinstance(widget, UserPrompt | Reply) and widget.turn_index >= turn_index:
                doomed: list[Widget] = children[position:]
                await self.remove_children(doomed)
                return

