"""The plain REPL driven for real: keystrokes through prompt_toolkit's pipe input, replies from
the shared worker, output captured."""

from __future__ import annotations

import argparse
import io
import threading
from pathlib import Path

import pytest
from glmchat.tui.plain import PlainRepl
from prompt_toolkit.application import create_app_session
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from glmchat.client import EngineClient
from glmchat.config import Config, SessionsConfig
from glmchat.params import GenerationParams

pytestmark = pytest.mark.slow


def run_repl(client: EngineClient, keys: str, config: Config | None = None,
             args: argparse.Namespace | None = None,
             **params: object) -> tuple[int, str, PlainRepl]:
    out = io.StringIO()
    config = config or Config(generation=GenerationParams(**params))  # type: ignore[arg-type]
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        repl = PlainRepl(config, args, client=client, out=out, input=pipe,
                         output=DummyOutput(), history=InMemoryHistory())
        pipe.send_text(keys)
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(repl.run()), daemon=True)
        thread.start()
        thread.join(300)
        assert not thread.is_alive(), "the REPL did not finish: " + out.getvalue()
    return result[0], out.getvalue(), repl


def test_chat_with_commands_multiline_and_stats(client: EngineClient) -> None:
    keys = ("/set max_new_tokens 4\r"
            "/set top_p 7\r"
            "Say \\\rhello.\r"          # a backslash continues the prompt on the next line
            "/strategy beam 2\r"
            "Name a colour.\r"
            "/beams\r"
            "/pick 2\r"
            "/quit\r")
    code, out, repl = run_repl(client, keys, max_new_tokens=8)
    assert code == 0
    assert "max_new_tokens = 4" in out
    assert "top_p = 7.0 is invalid" in out
    turns = repl.conversation.turns
    assert turns[0].content == "Say \nhello."
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[1].result is not None and len(turns[1].result.token_ids) <= 4
    assert out.count("tok/s") >= 2 and "TTFT" in out
    assert "#1 score" in out and "#2 score" in out
    assert turns[3].beam_index == 1 and "continuing with beam 2" in out


def test_ctrl_d_leaves(client: EngineClient) -> None:
    code, _out, repl = run_repl(client, "\x04")
    assert code == 0 and len(repl.conversation) == 0


def test_the_conversation_is_saved_and_resumed(client: EngineClient, tmp_path: Path) -> None:
    def config() -> Config:
        return Config(generation=GenerationParams(max_new_tokens=3),
                      sessions=SessionsConfig(dir=str(tmp_path)))

    args = argparse.Namespace(resume=None, session=None, no_save=False)
    code, _out, first = run_repl(client, "/set max_new_tokens 2\rHello there.\r/quit\r",
                                 config(), args)
    assert code == 0
    saved = sorted(tmp_path.glob("*.jsonl"))
    assert len(saved) == 1
    resume = argparse.Namespace(resume=str(saved[0]), session=None, no_save=False)
    code, out, second = run_repl(client, "/quit\r", config(), resume)
    assert [(t.role, t.content) for t in second.conversation.turns] == [
        (t.role, t.content) for t in first.conversation.turns]
    assert second.params.max_new_tokens == 2  # the settings the last reply was made with
    assert "> Hello there." in out
