"""Signals mid-reply and mid-load: the front end interrupted or killed, the worker killed.

The worker's GLMCHAT_DEBUG_STALL=slow:S makes each decode step S seconds slower, so a signal
surely lands while the reply is streaming."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.faults.cases import fault
from tests.faults.harness import (
    Live,
    assert_readable,
    assert_reported,
    make_session,
)

SLOW = {"GLMCHAT_DEBUG_STALL": "slow:0.3"}
LONG = ("--max-new-tokens", "200")


def _mid_reply(tmp_path: Path) -> tuple[Live, Path]:
    path = tmp_path / "s.jsonl"
    make_session(path, ("Name a colour.",))
    live = Live("--session", str(path), *LONG, "Tell me about the sea.", env=SLOW)
    live.wait_for_output(2)
    return live, path


@fault("Ctrl+C (SIGINT) of a one-shot mid-reply",
       "stops at the next token, `glmchat: interrupted`, exit 130; the worker exits",
       "the prompt and the partial reply, in the session")
def test_sigint_mid_reply(tmp_path: Path) -> None:
    live, path = _mid_reply(tmp_path)
    live.proc.send_signal(signal.SIGINT)
    run = live.finish()
    assert_reported(run, 130, "interrupted")
    session = assert_readable(path, events_at_least=3)
    reply = session.assistant_turns()[-1]
    assert reply.finish_reason == "cancelled" and reply.text and reply.text in run.stdout


@fault("SIGTERM of a one-shot mid-reply",
       "as Ctrl+C, exit 143", "the prompt and the partial reply, in the session")
def test_sigterm_mid_reply(tmp_path: Path) -> None:
    live, path = _mid_reply(tmp_path)
    live.proc.send_signal(signal.SIGTERM)
    run = live.finish()
    assert_reported(run, 143, "interrupted")
    session = assert_readable(path, events_at_least=3)
    assert session.assistant_turns()[-1].finish_reason == "cancelled"


@fault("SIGKILL of the front end mid-reply",
       "nothing can be said; the worker sees its parent die and exits within seconds",
       "every event saved before: the prompt")
def test_sigkill_front_end_mid_reply(tmp_path: Path) -> None:
    live, path = _mid_reply(tmp_path)
    live.proc.kill()
    run = live.finish()  # also: no process with this run's tag is left
    assert run.code == -signal.SIGKILL
    session = assert_readable(path, events_at_least=2)
    assert [e.content for e in session.user_turns()] == ["Name a colour.",
                                                         "Tell me about the sea."]


@fault("SIGKILL of the worker mid-reply",
       "`glmchat: error: the worker was killed (SIGKILL); the system may have run out of "
       "memory`, exit 1", "what was printed; the prompt, in the session")
def test_sigkill_worker_mid_reply(tmp_path: Path) -> None:
    live, path = _mid_reply(tmp_path)
    os.kill(live.worker_pid(), signal.SIGKILL)
    run = live.finish()
    assert_reported(run, 1, "worker was killed", "SIGKILL")
    assert_readable(path, events_at_least=2)


@fault("SIGKILL of the front end while the model loads",
       "the worker exits by itself (parent-death signal)", "—")
def test_sigkill_front_end_mid_load(tmp_path: Path) -> None:
    live = Live("--max-new-tokens", "4", "hi")
    deadline = time.monotonic() + 120
    while True:  # the worker is up (and loading) once it exists
        try:
            live.worker_pid()
            break
        except AssertionError:
            assert time.monotonic() < deadline, "the worker never started"
            time.sleep(0.05)
    live.proc.kill()
    live.finish()
