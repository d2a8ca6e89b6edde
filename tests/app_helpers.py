"""Helpers for tests that drive the real app (as tests/tui/test_tui_functional.py does; that
directory is no package, so they are here for the backend tests): wait on the app's state in
bounded loops, never on fixed sleeps."""

from __future__ import annotations

import io
import time
from typing import Any

from glmchat.tui.app import GlmchatApp
from glmchat.tui.widgets.transcript import Notice
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import Static


async def wait_for(pilot: Pilot[Any], condition: Any, what: str, timeout: float) -> None:
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
    await wait_for(pilot, lambda: app.in_flight is None, "the reply to finish", 120)
    await pilot.pause(0.1)


def plain(widget: Static) -> str:
    console = Console(file=io.StringIO(), width=80, color_system=None)
    console.print(widget.content)
    return console.file.getvalue()  # type: ignore[attr-defined, no-any-return]


def notices(app: GlmchatApp, kind: str = "") -> list[str]:
    return [plain(n) for n in app.query(Notice) if not kind or n.has_class(kind)]
