"""The plain REPL driven for real: keystrokes through prompt_toolkit's pipe input, replies from
the shared worker, output captured."""

from __future__ import annotations

import io
import threading

import pytest
from glmchat.tui.plain import PlainRepl
from prompt_toolkit.application import create_app_session
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from glmchat.client import EngineClient
from glmchat.config import Config
from glmchat.params import GenerationParams

pytestmark = pytest.mark.slow


def run_repl(client: EngineClient, keys: str, **params: object) -> tuple[int, str, PlainRepl]:
    out = io.StringIO()
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        repl = PlainRepl(Config(generation=GenerationParams(**params)), client=client, out=out,
                         input=pipe, output=DummyOutput(), history=InMemoryHistory())
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
