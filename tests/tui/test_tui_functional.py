"""Functional tests: the real app against the real worker and the embedded model. They wait on
the app's state (polling with pilot.pause in bounded loops), never on fixed sleeps."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from glmchat.tui.app import GlmchatApp, Options, make_app
from glmchat.tui.widgets.transcript import Reply
from textual.pilot import Pilot
from textual.widgets import Static

from glmchat.client import EngineClient
from glmchat.config import Config
from glmchat.params import GenerationParams
from tests.app_helpers import notices, plain, reply_done, send, wait_for

pytestmark = pytest.mark.slow
SIZE = (130, 40)


def run_app(config: Config, client: EngineClient | None,
            scenario: Callable[[GlmchatApp, Pilot[Any]], Awaitable[None]]) -> None:
    app = make_app(config, Options(client=client, history=False))

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.phase == "ready", "the model")
            await scenario(app, pilot)

    asyncio.run(main())


def config_with(**changes: Any) -> Config:
    return Config(generation=GenerationParams(**changes))


def test_a_reply_streams_and_the_panel_shows_speed_and_memory(client: EngineClient) -> None:
    async def scenario(app: GlmchatApp, pilot: Pilot[Any]) -> None:
        await send(app, pilot, "Say hello.")
        await reply_done(app, pilot)
        turn = app.conversation.turns[-1]
        assert turn.role == "assistant" and turn.content.strip() and turn.result is not None
        reply = app.query(Reply).last()
        stats = plain(reply.query_one(".reply-stats", Static))
        assert f"{len(turn.result.token_ids)} tokens" in stats and "tok/s" in stats
        assert "tok/s" in plain(app.query_one("#decode-rate", Static))
        assert "CPU RSS" in plain(app.query_one("#memory-rows", Static))
        assert "cpu" in plain(app.query_one("#placement-rows", Static))

    run_app(config_with(max_new_tokens=6), client, scenario)


def test_slash_commands_change_settings_and_bad_ones_say_why(client: EngineClient) -> None:
    async def scenario(app: GlmchatApp, pilot: Pilot[Any]) -> None:
        await send(app, pilot, "/set max_new_tokens 3")
        assert app.params.max_new_tokens == 3
        await send(app, pilot, "/set top_p 7")
        assert any("top_p = 7.0 is invalid" in n for n in notices(app, "error"))
        assert app.editor.text == "/set top_p 7"  # kept for fixing
        app.editor.clear()
        await send(app, pilot, "/frobnicate")
        assert any("unknown command /frobnicate" in n for n in notices(app, "error"))
        app.editor.clear()
        await send(app, pilot, "Count to ten.")
        await reply_done(app, pilot)
        result = app.conversation.turns[-1].result
        assert result is not None and result.params.max_new_tokens == 3
        assert len(result.token_ids) <= 3

    run_app(config_with(max_new_tokens=6), client, scenario)


def test_escape_stops_a_long_reply_and_keeps_the_text(client: EngineClient) -> None:
    async def scenario(app: GlmchatApp, pilot: Pilot[Any]) -> None:
        await send(app, pilot, "Write a long story about a lighthouse keeper.")
        await wait_for(pilot, lambda: app.in_flight is not None and len(app.in_flight.text) > 0,
                       "the first tokens")
        await pilot.press("escape")
        await reply_done(app, pilot)
        turn = app.conversation.turns[-1]
        assert turn.result is not None and turn.result.finish_reason == "cancelled"
        assert turn.content.strip() and len(turn.result.token_ids) < 200
        assert "stopped" in plain(app.query(Reply).last().query_one(".reply-stats", Static))

    run_app(config_with(max_new_tokens=200), client, scenario)


def test_regenerate_and_edit_replace_the_later_turns(client: EngineClient) -> None:
    async def scenario(app: GlmchatApp, pilot: Pilot[Any]) -> None:
        await send(app, pilot, "Name a colour.")
        await reply_done(app, pilot)
        await pilot.press("ctrl+r")
        await reply_done(app, pilot)
        assert [t.role for t in app.conversation.turns] == ["user", "assistant"]
        assert app.conversation.branches[-1].reason == "regenerate"
        assert len(app.query(Reply)) == 1
        await pilot.press("ctrl+e")
        assert app.editing == 0 and app.editor.text == "Name a colour."
        app.editor.load_text("Name a fruit.")
        await pilot.press("enter")
        await reply_done(app, pilot)
        assert [t.content for t in app.conversation.turns][:1] == ["Name a fruit."]
        assert len(app.conversation.turns) == 2 and app.conversation.branches[-1].reason == "edit"

    run_app(config_with(max_new_tokens=4), client, scenario)


def test_killing_the_worker_mid_reply_keeps_the_chat_and_recovers(isolated_xdg: Path) -> None:
    """The app owns this worker (the shared one must survive): kill it, see why, send again."""
    app = make_app(config_with(max_new_tokens=200), Options(history=False))

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.phase == "ready", "the model")
            await send(app, pilot, "Tell me about the sea.")
            await wait_for(pilot, lambda: app.in_flight is not None and bool(app.in_flight.text),
                           "the first tokens")
            pid = app.link.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await wait_for(pilot, lambda: app.phase == "crashed", "the crash to be noticed")
            assert any("killed" in n and "SIGKILL" in n for n in notices(app, "error"))
            assert [t.role for t in app.conversation.turns] == ["user", "assistant"]
            app.params = app.params.replace(max_new_tokens=3)
            await send(app, pilot, "Are you back?")
            await pilot.pause()
            await wait_for(pilot, lambda: app.phase == "ready" and app.in_flight is None,
                           "the restarted worker's reply")
            assert app.link.pid not in (None, pid)
            assert [t.role for t in app.conversation.turns] == [
                "user", "assistant", "user", "assistant"]
            assert app.conversation.turns[-1].result is not None

    try:
        asyncio.run(main())
    finally:
        app.link.close()
    assert not app.link.client.alive


def test_a_tui_chat_is_saved_and_replays_exactly(client: EngineClient, tmp_path: Path) -> None:
    from glmchat.cli import build_parser
    from glmchat.config import SessionsConfig
    from tests.conftest import run_cli

    config = Config(generation=GenerationParams(max_new_tokens=8),
                    sessions=SessionsConfig(dir=str(tmp_path)))
    app = make_app(config, Options(client=client, history=False,
                                   args=build_parser().parse_args([])))

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.phase == "ready", "the model")
            await send(app, pilot, "Name a colour.")
            await reply_done(app, pilot)
            await app.run_slash_command("/strategy beam 3")
            await send(app, pilot, "And another one?")
            await reply_done(app, pilot)

    asyncio.run(main())
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) == 1
    replay = run_cli("replay", str(files[0]), "--check")
    assert replay.returncode == 0, replay.stdout + replay.stderr
