"""Helpers for every test that drives the real app (the TUI, backend and fault tests): wait on
the app's state in bounded loops, never on fixed sleeps."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

from glmchat.tui.app import GlmchatApp
from glmchat.tui.widgets.transcript import Notice
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import Static

WAIT_S = 300.0  # the machine may be busy; a reply of a few tokens needs far less


async def wait_for(pilot: Pilot[Any], condition: Callable[[], bool], what: str,
                   timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.05)


async def send(app: GlmchatApp, pilot: Pilot[Any], text: str) -> None:
    app.editor.load_text(text)
    await pilot.press("enter")
    await pilot.pause()


async def reply_done(app: GlmchatApp, pilot: Pilot[Any]) -> None:
    await pilot.pause()
    await wait_for(pilot, lambda: app.in_flight is None, "the reply to finish")
    await pilot.pause(0.1)


def plain(widget: Static) -> str:
    """What a Static shows, as text (its content may be a Rich table)."""
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(widget.content)
    return console.file.getvalue()  # type: ignore[attr-defined, no-any-return]


def notices(app: GlmchatApp, kind: str = "") -> list[str]:
    return [plain(n) for n in app.query(Notice) if not kind or n.has_class(kind)]
