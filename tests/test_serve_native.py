"""`glmchat serve` on its default Unix socket, through GlmchatRemote (the native event stream):
the same events as the local worker (tokens, beams, infill spans, memory, placement), the
state file and permissions, Stop and hang-ups that cancel only their own generation, and the
refusal to listen beyond loopback without a key."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from glmchat.bench.serve_load import RunningServer, connect, request, started_server

from glmchat.client import EngineClient
from glmchat.errors import UsageError
from glmchat.params import GenerationParams
from glmchat.protocol import (
    ChatMessage,
    Finished,
    Load,
    Loaded,
    Memory,
    ModelSpec,
    StepStats,
    Token,
)
from glmchat.remote_native import GlmchatRemote
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(isolated_xdg: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[RunningServer]:
    run = tmp_path_factory.mktemp("run")
    with started_server("--max-tokens", "256", runtime_dir=run) as running:
        yield running
    assert not running.state_file.exists(), "the state file outlived the server"
    assert not (run / "glmchat" / "serve.sock").exists(), "the socket outlived the server"


@pytest.fixture
def remote(server: RunningServer) -> Iterator[GlmchatRemote]:
    backend = GlmchatRemote(server.url)
    backend.start()
    list(backend.load(ModelSpec()))
    yield backend
    backend.close()


def finished(backend: EngineClient | GlmchatRemote, params: GenerationParams,
             **kwargs: object) -> tuple[Finished, list[object]]:
    gen_id = backend.generate(params, **kwargs)  # type: ignore[arg-type]
    events = list(backend.stream(gen_id))
    assert isinstance(events[-1], Finished)
    return events[-1], events


def test_state_file_and_private_socket(server: RunningServer) -> None:
    state = json.loads(server.state_file.read_text())
    sock = Path(state["socket"])
    assert state["url"] == f"unix:{sock}" and state["pid"] == server.pid
    assert state["model"]["source"] == "default" and state["model"]["context_length"] == 8192
    assert len(state["model"]["digest"]) == 64
    assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(server.state_file).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(sock).st_mode)


def test_remote_events_match_the_local_worker(remote: GlmchatRemote,
                                              client: EngineClient) -> None:
    assert remote.pid is None and remote.alive
    assert remote.loaded is not None and client.loaded is not None
    assert remote.loaded.info.digest == client.loaded.info.digest
    assert remote.loaded.placement == client.loaded.placement
    messages = [ChatMessage("user", "Name three rivers.")]
    params = GenerationParams(strategy="greedy", max_new_tokens=12)
    ours, events = finished(remote, params, messages=messages)
    local, local_events = finished(client, params, messages=messages)
    assert ours.result.token_ids == local.result.token_ids
    assert ours.result.text == local.result.text
    assert [e.text for e in events if isinstance(e, Token)] == [
        e.text for e in local_events if isinstance(e, Token)]
    assert any(isinstance(e, StepStats) for e in events)
    remote.send(Load(ModelSpec()))  # the TUI's way: the answer comes on recv
    while not isinstance(event := remote.recv(timeout=10), Loaded):
        assert event is not None
    assert event.info.backend == remote.shown_url
    remote.request_stats()
    deadline = time.monotonic() + 10
    while not isinstance(event := remote.recv(timeout=1), Memory):
        assert time.monotonic() < deadline
    assert event.cpu_rss > 0


def test_beams_and_infill_spans_arrive_as_locally(remote: GlmchatRemote,
                                                  client: EngineClient) -> None:
    beam = GenerationParams(strategy="beam", num_beams=3, num_return_sequences=2,
                            max_new_tokens=6)
    ours, events = finished(remote, beam, prompt="Hi")
    local, _ = finished(client, beam, prompt="Hi")
    assert [(b.text, b.token_ids) for b in ours.result.beams] == [
        (b.text, b.token_ids) for b in local.result.beams]
    assert any(isinstance(e, Token) and e.provisional for e in events)
    infill = GenerationParams(max_new_tokens=8)
    prompt = "The capital of [MASK] is Paris."
    ours, _ = finished(remote, infill, prompt=prompt)
    local, _ = finished(client, infill, prompt=prompt)
    assert ours.result.text == local.result.text
    assert ours.result.spans == local.result.spans and ours.result.spans


def test_stop_cancels_within_a_token_and_not_the_next_request(remote: GlmchatRemote) -> None:
    long = GenerationParams(strategy="greedy", max_new_tokens=200, min_new_tokens=200)
    first = remote.generate(long, prompt="Tell me a long story about the sea.")
    second = remote.generate(GenerationParams(strategy="greedy", max_new_tokens=5),
                             prompt="Say hello.")  # waits behind the first
    seen = 0
    results: dict[str, Finished] = {}
    while len(results) < 2:
        event = remote.recv(timeout=60)
        assert event is not None
        if isinstance(event, Token) and event.id == first:
            seen += 1
            if seen == 3:
                remote.cancel(first)
                seen_at_cancel = seen
        elif isinstance(event, Finished):
            results[event.id] = event
    assert results[first].result.finish_reason == "cancelled"
    assert len(results[first].result.token_ids) <= seen_at_cancel + 1
    assert results[second].result.finish_reason in ("eos", "length")
    assert results[second].result.text


def test_each_conversation_keeps_its_kv_cache(remote: GlmchatRemote) -> None:
    """Two conversations taking turns on one server: each turn 2 prefills only its new part."""
    params = GenerationParams(strategy="greedy", max_new_tokens=6)
    first: dict[str, Finished] = {}
    for who in ("Alice", "Bob"):
        first[who], _ = finished(remote, params, messages=[
            ChatMessage("user", f"My name is {who}. Greet me in one sentence.")])
    for who in ("Alice", "Bob"):
        turn1 = first[who].result
        messages = [ChatMessage("user", f"My name is {who}. Greet me in one sentence."),
                    ChatMessage("assistant", turn1.text), ChatMessage("user", "And again?")]
        turn2, _ = finished(remote, params, messages=messages)
        new_part = len(turn2.result.prompt_token_ids) - len(turn1.prompt_token_ids)
        assert turn2.result.timings.prefill_tokens <= new_part, who


def test_a_client_that_hangs_up_cancels_its_generation(server: RunningServer) -> None:
    def cancelled() -> int:
        _, body = request(server.url, "GET", "/metrics")
        for line in body.decode().splitlines():
            if line.startswith('glmchat_requests_total{outcome="cancelled"}'):
                return int(line.split()[-1])
        return 0

    before = cancelled()
    conn = connect(server.url)
    body = {"type": "Generate", "id": "mine", "prompt": "Count to a thousand.",
            "params": {"strategy": "greedy", "max_new_tokens": 250, "min_new_tokens": 250}}
    conn.request("POST", "/glmchat/v1/generate", body=json.dumps(body))
    response = conn.getresponse()
    assert response.status == 200
    first = json.loads(response.readline())
    assert first["type"] in ("Token", "StepStats", "Memory") and first.get("id", "mine") == "mine"
    conn.close()  # hang up mid-reply
    deadline = time.monotonic() + 20
    while cancelled() == before:
        assert time.monotonic() < deadline, "the generation went on after its client left"
        time.sleep(0.1)
    status, body_bytes = request(server.url, "GET", "/health")
    assert status == 200 and json.loads(body_bytes)["running"] == 0


def test_the_remote_refuses_what_the_server_refuses(remote: GlmchatRemote) -> None:
    with pytest.raises(UsageError, match="more than this server allows"):
        remote.generate(GenerationParams(max_new_tokens=10_000), prompt="x")
    loaded = next(iter(remote.load(ModelSpec(path="/somewhere/else"))))
    assert isinstance(loaded, Loaded) and loaded.info.source == "default"  # cannot load others


def test_a_dead_server_is_one_clear_error(tmp_path: Path) -> None:
    from glmchat.errors import GlmchatError

    backend = GlmchatRemote(f"unix:{tmp_path}/nobody.sock", timeout=2)
    with pytest.raises(GlmchatError, match="cannot reach glmchat serve"):
        backend.start()


@pytest.mark.parametrize(("flags", "says"), [
    (["--host", "0.0.0.0"], "can be reached from other machines"),
    (["--api-key", "a", "--api-key-file", "k"], "not both"),
    (["--socket", "/tmp/x.sock", "--port", "1"], "drop --host/--port"),
    (["--api-key-file", "/nonexistent/key", "--host", "0.0.0.0"], "cannot read"),
])
def test_unsafe_or_contradictory_flags_are_refused(flags: list[str], says: str) -> None:
    done = run_cli("serve", *flags, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("glmchat: error: ") and says in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_last_a_dead_worker_makes_the_server_say_503(server: RunningServer) -> None:
    """Runs last in this module: it kills the module's server's worker."""
    import psutil

    (worker,) = [child for child in psutil.Process(server.pid).children()
                 if "spawn_main" in " ".join(child.cmdline())]
    worker.kill()
    worker.wait(10)
    deadline = time.monotonic() + 10
    while (status := request(server.url, "GET", "/health")[0]) == 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status == 503
    status, body = request(server.url, "POST", "/v1/completions",
                           json.dumps({"prompt": "hi"}).encode())
    assert status == 503 and "stopped" in json.loads(body)["error"]["message"]
    assert b"glmchat_up 0" in request(server.url, "GET", "/metrics")[1]
