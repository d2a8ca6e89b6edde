"""The front ends show what the offload runtime streams: the embedded model with a CPU memory
limit that puts most layers on disk, a real worker, the real TUI and REPL."""

from __future__ import annotations

import io
from typing import Any

import pytest
from glmchat.tui.app import GlmchatApp
from glmchat.tui.format import streaming, streaming_summary
from rich.console import Console
from textual.pilot import Pilot
from textual.widgets import Static

from glmchat.config import Config, ModelConfig
from glmchat.params import GenerationParams
from tests.app_helpers import plain, reply_done, send
from tests.tui.test_tui_functional import run_app
from tests.tui.test_tui_plain_repl import run_repl

pytestmark = pytest.mark.slow


def offloaded(reader: str) -> Config:
    return Config(model=ModelConfig(cpu_memory=0.1, offload_reader=reader),
                  generation=GenerationParams(max_new_tokens=6))


def test_tui_layers_box_shows_streaming_stats_offloaded_default_model() -> None:
    async def scenario(app: GlmchatApp, pilot: Pilot[Any]) -> None:
        stream = app.query_one("#stream-rows", Static)
        assert not stream.display  # nothing has streamed yet
        assert "glmchat" in str(app.query_one("#placement-box").border_subtitle)
        await send(app, pilot, "Say hello.")
        await reply_done(app, pilot)
        shown = plain(stream)
        assert stream.display
        assert "streamed" in shown and "layers" in shown and "GB/s" in shown
        assert "direct" in shown
        # one line per row at the panel's width: nothing wraps
        console = Console(file=io.StringIO(), width=stream.size.width, color_system=None)
        console.print(stream.content)
        assert len(console.file.getvalue().splitlines()) == 4  # type: ignore[attr-defined]

    run_app(offloaded("direct"), None, scenario)


def test_repl_stats_line_says_what_streamed_offloaded_default_model() -> None:
    code, out, repl = run_repl(None, "Say hello.\r/quit\r", offloaded("mmap"))  # type: ignore[arg-type]
    assert code == 0
    assert "streamed" in out and "/token at" in out and "(mmap reader)" in out
    assert repl.last_step_extra["streamed_layers"] > 0  # type: ignore[operator]


def test_streaming_rows_are_empty_without_streaming() -> None:
    assert streaming({}) == [] and streaming_summary({}) == ""
    assert streaming({"streamed_layers": 0}) == []
    rows = dict(streaming({"streamed_layers": 3, "resident_layers": 1,
                           "bytes_streamed_per_token": 3 << 30, "stream_gb_per_s": 2.5,
                           "reader": "direct"}))
    assert rows == {"streamed": "3/4 layers", "per token": "3.0 GiB",
                    "stream rate": "2.50 GB/s", "reader": "direct"}
    assert streaming_summary({"streamed_layers": 3, "bytes_streamed_per_token": 3 << 30,
                              "stream_gb_per_s": 2.5, "reader": "mmap"}) == (
        "streamed 3.0 GiB/token at 2.50 GB/s (mmap reader)")
