"""One-shot mode finds a running local `glmchat serve` by its state file, the way `ollama run`
finds `ollama serve`: the answer comes from the server (nothing is loaded), equals the local
worker's token for token, -v says who answered, and the session it records replays exactly.
The same server through its OpenAI-compatible API gives the same token ids, and the TUI shows
what a local worker would show (tokens, memory, placement) when the server answers it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from glmchat.bench.serve_load import RunningServer, started_server
from glmchat.tui.app import Options, make_app
from textual.widgets import Static

from glmchat.client import EngineClient
from glmchat.config import Config
from glmchat.params import GenerationParams
from glmchat.protocol import Finished

from .app_helpers import plain, reply_done, send, wait_for
from .conftest import run_cli

pytestmark = pytest.mark.slow
PROMPT = "Name a colour."


@pytest.fixture(scope="module")
def serving(isolated_xdg: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[RunningServer, Path]]:
    run = tmp_path_factory.mktemp("run")
    with started_server("--port", "0", runtime_dir=run) as running:
        yield running, run


def test_one_shot_uses_the_running_server_and_replays_its_session(
        serving: tuple[RunningServer, Path], client: EngineClient, tmp_path: Path) -> None:
    server, run = serving
    env = {"XDG_RUNTIME_DIR": str(run)}
    session = tmp_path / "s.jsonl"
    proc = run_cli("-v", "--max-new-tokens", "8", "--session", str(session), PROMPT, env=env)
    assert proc.returncode == 0, proc.stderr
    gen_id = client.generate(GenerationParams(max_new_tokens=8), prompt=PROMPT)
    local = next(e.result for e in client.stream(gen_id) if isinstance(e, Finished))
    assert proc.stdout == local.text + "\n"
    assert f"backend: glmchat serve at {server.url}" in proc.stderr
    assert "loaded SmolLM2" not in proc.stderr  # the server had it loaded already
    header = json.loads(session.read_text().splitlines()[0])
    assert header["model"]["backend"] == server.url and header["model"]["digest"]
    reply = json.loads(session.read_text().splitlines()[-1])
    assert reply["token_ids"] == local.token_ids

    replay = run_cli("replay", str(session), "--check", "-v", env=env)
    assert replay.returncode == 0, replay.stderr
    assert f"backend: glmchat serve at {server.url}" in replay.stderr
    assert "cannot guarantee" not in replay.stderr
    assert f"✓ {len(local.token_ids)} tokens match" in replay.stdout



def test_its_openai_api_gives_the_local_workers_token_ids(
        serving: tuple[RunningServer, Path], client: EngineClient, tmp_path: Path) -> None:
    server, _ = serving
    config = tmp_path / "openai.toml"
    config.write_text('[backend]\nprotocol = "openai"\n')
    proc = run_cli("--config", str(config), "--backend", server.url, "--json", "-v",
                   "--max-new-tokens", "8", PROMPT, env={"XDG_RUNTIME_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert f"backend: OpenAI-compatible server at {server.url}" in proc.stderr
    gen_id = client.generate(GenerationParams(max_new_tokens=8), prompt=PROMPT)
    local = next(e.result for e in client.stream(gen_id) if isinstance(e, Finished))
    reply = json.loads(proc.stdout)
    assert reply["token_ids"] == local.token_ids and reply["text"] == local.text


def test_the_tui_over_glmchat_serve_shows_what_a_local_worker_shows(
        serving: tuple[RunningServer, Path]) -> None:
    from glmchat.remote_native import GlmchatRemote

    server, _ = serving
    backend = GlmchatRemote(server.url, timeout=120)
    app = make_app(Config(generation=GenerationParams(max_new_tokens=4)),
                   Options(client=backend, history=False))

    async def main() -> None:
        async with app.run_test(size=(130, 40)) as pilot:
            await wait_for(pilot, lambda: app.phase == "ready", "the served model", 60)
            await send(app, pilot, PROMPT)
            await reply_done(app, pilot)
            turn = app.conversation.turns[-1]
            assert turn.result is not None and len(turn.result.token_ids) == 4
            assert "cpu" in plain(app.query_one("#placement-rows", Static))
            await wait_for(pilot, lambda: "CPU RSS" in plain(
                app.query_one("#memory-rows", Static)), "the memory panel", 30)

    try:
        asyncio.run(main())
    finally:
        backend.close()
