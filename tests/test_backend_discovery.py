"""One-shot mode finds a running local `glmchat serve` by its state file, the way `ollama run`
finds `ollama serve`: the answer comes from the server (nothing is loaded), equals the local
worker's token for token, -v says who answered, and the session it records replays exactly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from glmchat.bench.serve_load import RunningServer, started_server

from glmchat.client import EngineClient
from glmchat.params import GenerationParams
from glmchat.protocol import Finished

from .conftest import run_cli

pytestmark = pytest.mark.slow
PROMPT = "Name a colour."


@pytest.fixture(scope="module")
def serving(isolated_xdg: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[tuple[RunningServer, Path]]:
    run = tmp_path_factory.mktemp("run")
    with started_server(runtime_dir=run) as running:
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

