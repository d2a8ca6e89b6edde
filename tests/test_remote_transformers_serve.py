"""glmchat's front ends against a real OpenAI-compatible server that nobody on this project
wrote: `transformers serve` (transformers[serving], in the dev extra) on the embedded model,
offline, on CPU, on loopback. One server for the module; it is stopped at the end.

Checked: greedy answers equal the local worker's, streaming and not; what the server lacks
(beam search, [MASK] infill, token ids, memory) is said once, in place, in the real CLI and
the real TUI; sessions record the server (never the key) and replay against it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from glmchat.tui.app import GlmchatApp, Options, make_app
from textual.pilot import Pilot
from textual.widgets import Static

from glmchat.client import EngineClient
from glmchat.config import Config
from glmchat.errors import UsageError
from glmchat.params import GenerationParams
from glmchat.protocol import Finished, Memory, ModelSpec, Token
from glmchat.remote_openai import OpenAICompatRemote

from .app_helpers import notices, plain, reply_done, send, wait_for
from .conftest import run_cli

pytestmark = pytest.mark.slow
START_S = 180.0
PROMPT = "What is 2+2?"
TOKENS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(default_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, str]]:
    """(base URL, model id) of a running `transformers serve`."""
    home = tmp_path_factory.mktemp("hf")
    (home / "hub").mkdir()  # its /v1/models scans the hub cache, and fails on none
    port = _free_port()
    model = str(default_weights_dir)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    log = (home / "serve.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "transformers"), "serve", "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--dtype", "float32", model],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + START_S
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise AssertionError("transformers serve did not start: "
                                         + (home / "serve.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield url, model
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


# ---- the tests --------------------------------------------------------------------------------


def local_greedy(client: EngineClient, prompt: str, raw: bool = False) -> str:
    gen_id = client.generate(GenerationParams(max_new_tokens=TOKENS), prompt=prompt, raw=raw)
    result = next(e.result for e in client.stream(gen_id) if isinstance(e, Finished))
    return result.text


def remote(server: tuple[str, str], **kwargs: Any) -> OpenAICompatRemote:
    backend = OpenAICompatRemote(server[0], model=server[1], timeout=120, **kwargs)
    backend.start()
    list(backend.load(ModelSpec()))
    return backend


def test_the_cli_streams_the_same_greedy_answer_as_the_local_worker(
        server: tuple[str, str], client: EngineClient) -> None:
    proc = run_cli("--backend", server[0], "--backend-model", server[1], "-v",
                   "--max-new-tokens", str(TOKENS), PROMPT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == local_greedy(client, PROMPT) + "\n"
    assert f"backend: OpenAI-compatible server at {server[0]}" in proc.stderr
    assert proc.stderr.count("token ids: not reported by this server") == 1
    assert "Traceback" not in proc.stderr


def test_whole_replies_equal_streamed_ones_and_each_missing_feature_says_so(
        server: tuple[str, str], client: EngineClient) -> None:
    whole = remote(server, stream=False)
    gen_id = whole.generate(GenerationParams(max_new_tokens=TOKENS), prompt="Once upon a time",
                            raw=True)
    events = list(whole.stream(gen_id))
    tokens = [e for e in events if isinstance(e, Token)]
    assert len(tokens) == 1  # one body, one piece
    result = events[-1].result if isinstance(events[-1], Finished) else None
    assert result is not None and result.text == local_greedy(client, "Once upon a time", True)
    assert result.token_ids == [] and result.timings.decode_tokens == TOKENS
    assert any("token ids: not reported" in n for n in result.notes)

    with pytest.raises(UsageError, match="beam search"):
        list(whole.stream(whole.generate(GenerationParams(strategy="beam", num_beams=2),
                                         prompt=PROMPT)))
    infill = GenerationParams(max_new_tokens=2)
    first = next(e.result for e in whole.stream(whole.generate(
        infill, prompt="The capital of France is [MASK].")) if isinstance(e, Finished))
    again = next(e.result for e in whole.stream(whole.generate(
        infill, prompt="Paris is in [MASK].")) if isinstance(e, Finished))
    assert any("does not fill [MASK] blanks" in n for n in first.notes)
    assert not again.notes  # said once
    whole.request_stats()
    memory = next(e for e in iter(lambda: whole.recv(30), None) if isinstance(e, Memory))
    assert memory.note == "memory: not reported by this server"
    whole.close()


def test_a_session_records_the_server_without_the_key_and_replays_against_it(
        server: tuple[str, str], tmp_path: Path) -> None:
    session = tmp_path / "s.jsonl"
    env = {"GLMCHAT_API_KEY": "sk-never-saved-1234"}
    proc = run_cli("--backend", server[0], "--backend-model", server[1], "--session",
                   str(session), "--max-new-tokens", "4", PROMPT, env=env)
    assert proc.returncode == 0, proc.stderr
    text = session.read_text()
    header = json.loads(text.splitlines()[0])
    assert header["model"]["backend"] == server[0] and header["model"]["name"] == server[1]
    assert "sk-never-saved" not in text
    replay = run_cli("replay", str(session), "--check", env=env)
    assert replay.returncode == 0, replay.stderr
    assert "cannot guarantee identical tokens" in replay.stderr
    assert "✓ the text matches (the server sends no token ids)" in replay.stdout


def test_the_tui_says_what_the_server_does_not_report(server: tuple[str, str]) -> None:
    backend = OpenAICompatRemote(server[0], model=server[1], timeout=120)
    app = make_app(Config(generation=GenerationParams(max_new_tokens=3)),
                   Options(client=backend, history=False))

    async def main() -> None:
        async with app.run_test(size=(130, 40)) as pilot:
            await wait_for(pilot, lambda: app.phase == "ready", "the server's model", 60)
            await scenario(app, pilot)

    async def scenario(app: GlmchatApp, pilot: Pilot[Any]) -> None:
        await send(app, pilot, PROMPT)
        await reply_done(app, pilot)
        turn = app.conversation.turns[-1]
        assert turn.result is not None and turn.content.strip()
        assert "served by " + server[0] in plain(app.query_one("#model-info", Static))
        assert "not reported by this server" in plain(app.query_one("#placement-rows", Static))
        await wait_for(pilot, lambda: "not reported" in plain(
            app.query_one("#memory-rows", Static)), "the memory panel", 30)
        assert "CPU RSS" not in plain(app.query_one("#memory-rows", Static))
        assert sum("token ids: not reported" in n for n in notices(app)) == 1
        await send(app, pilot, "/strategy beam 2")
        await send(app, pilot, "Again?")
        await reply_done(app, pilot)
        assert any("beam search" in n for n in notices(app, "error"))

    try:
        asyncio.run(main())
    finally:
        backend.close()


def test_stop_cancels_a_streaming_reply_and_keeps_its_text(server: tuple[str, str]) -> None:
    # Last in the module: transformers serve finishes a reply whose client left (vLLM aborts
    # it), so a short max_new_tokens bounds how long the server stays busy after.
    backend = remote(server)
    gen_id = backend.generate(GenerationParams(max_new_tokens=24), prompt="Tell a long story.")
    stream = backend.stream(gen_id)
    first = next(e for e in stream if isinstance(e, Token))
    started = time.monotonic()
    backend.cancel(gen_id)
    result = next(e.result for e in stream if isinstance(e, Finished))
    assert result.finish_reason == "cancelled" and result.text.startswith(first.text)
    assert time.monotonic() - started < 10
    backend.close()
