"""SVG snapshots of what the user sees: the main screen, the settings screen and the beam view.
No worker: fixed events are fed to the app, so the pictures are deterministic. Update them with
``pytest tests/tui --snapshot-update`` after a deliberate change, and look at the diff."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from glmchat.tui.app import GlmchatApp, Options, make_app
from glmchat.tui.engine_link import EngineLink
from textual.pilot import Pilot
from textual.widgets import Input, TextArea
from tui_fixtures import (
    LOADED,
    MEMORY_CPU_ONLY,
    MEMORY_GPU,
    beam_result,
    greedy_result,
    infill_result,
    steps,
)

from glmchat.config import Config
from glmchat.protocol import Finished, LoadProgress, Token

SIZE = (140, 44)
SnapCompare = Callable[..., bool]


def fixed_app() -> GlmchatApp:
    return make_app(Config(), Options(start_engine=False, history=False))


async def feed(pilot: Pilot[Any], *events: Any) -> None:
    app = pilot.app
    assert isinstance(app, GlmchatApp)
    app.post_message(EngineLink.EventsReceived(list(events)))
    await pilot.pause()


async def conversation(pilot: Pilot[Any], prompt: str, gen_id: str, tokens: list[Token],
                       finished: Finished, memory: Any) -> None:
    """One exchange the way the worker would drive it: prompt, tokens, stats, finish."""
    app = pilot.app
    assert isinstance(app, GlmchatApp)
    app.editor.cursor_blink = False
    app.link.generate = lambda *a, **k: gen_id  # type: ignore[method-assign]
    await feed(pilot, LOADED, memory)
    await app.send_prompt(prompt)
    await feed(pilot, *tokens, *steps(gen_id), finished)
    await pilot.pause(0.2)


def test_main_screen(snap_compare: SnapCompare) -> None:
    result = greedy_result()

    async def run_before(pilot: Pilot[Any]) -> None:
        await conversation(pilot, "What is the capital of France?", "g1",
                           [Token("g1", result.text, 5)], Finished("g1", result), MEMORY_GPU)

    assert snap_compare(fixed_app(), terminal_size=SIZE, run_before=run_before)


def test_main_screen_without_gpu_while_loading(snap_compare: SnapCompare) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        app = pilot.app
        assert isinstance(app, GlmchatApp)
        app.editor.cursor_blink = False
        await feed(pilot, MEMORY_CPU_ONLY, LoadProgress(0, 4, "checking default"))
        await app.send_prompt("Hello! Are you there?")
        await pilot.pause(0.2)

    assert snap_compare(fixed_app(), terminal_size=SIZE, run_before=run_before)


def test_settings_screen_with_an_inline_error(snap_compare: SnapCompare) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        pilot.app.query_one("#editor", TextArea).cursor_blink = False
        await pilot.press("f2")
        await pilot.pause()
        settings = pilot.app.screen
        for field in settings.query(Input):
            field.cursor_blink = False
        settings.query_one("#field-top_p", Input).value = "7"
        await pilot.press("ctrl+s")
        await pilot.pause()

    assert snap_compare(fixed_app(), terminal_size=SIZE, run_before=run_before)


def test_beam_view(snap_compare: SnapCompare) -> None:
    result = beam_result()

    async def run_before(pilot: Pilot[Any]) -> None:
        await conversation(pilot, "What is the capital of France?", "g1",
                           [Token("g1", result.text, 5, provisional=True)],
                           Finished("g1", result), MEMORY_GPU)
        await pilot.press("ctrl+b")
        await pilot.pause()

    assert snap_compare(fixed_app(), terminal_size=SIZE, run_before=run_before)



def test_infilled_spans_are_highlighted(snap_compare: SnapCompare) -> None:
    result = infill_result()

    async def run_before(pilot: Pilot[Any]) -> None:
        await conversation(pilot, "The Eiffel Tower is in [MASK] and was finished in [MASK].",
                           "g1", [Token("g1", result.text, 5)], Finished("g1", result),
                           MEMORY_CPU_ONLY)

    assert snap_compare(fixed_app(), terminal_size=SIZE, run_before=run_before)
