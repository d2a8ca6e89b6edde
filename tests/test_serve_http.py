"""`glmchat serve` end to end over TCP loopback with an API key: the real command, the real
worker and the embedded model. The OpenAI-compatible API gives the local worker's tokens, speaks
SSE the way OpenAI does, answers errors with OpenAI's error bodies, and works with the official
`openai` package, a client we did not write."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from glmchat.bench.serve_load import RunningServer, request, run_load, started_server

from glmchat.client import EngineClient
from glmchat.params import GenerationParams
from glmchat.protocol import ChatMessage, Finished, ModelSpec

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def server(isolated_xdg: Path, tmp_path_factory: pytest.TempPathFactory,
           ) -> Iterator[RunningServer]:
    run = tmp_path_factory.mktemp("run-http")
    with started_server("--port", "0", "--max-tokens", "64", "--max-body-bytes", "20000",
                        api_key=secrets.token_hex(16), runtime_dir=run) as running:
        yield running
    assert not running.state_file.exists(), "the state file outlived the server"


def call(server: RunningServer, path: str, body: object = None, key: str | None = "",
         method: str = "POST") -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else (None if body is None else
                                                json.dumps(body).encode())
    status, data = request(server.url, method, path, raw,
                           key=server.api_key if key == "" else key)
    return status, json.loads(data)


def local_greedy(client: EngineClient, max_new_tokens: int, **kwargs: object) -> Finished:
    gen_id = client.generate(GenerationParams(strategy="greedy", max_new_tokens=max_new_tokens),
                             **kwargs)  # type: ignore[arg-type]
    return [e for e in client.stream(gen_id) if isinstance(e, Finished)][-1]


def test_models_and_health(server: RunningServer) -> None:
    status, body = call(server, "/v1/models", method="GET")
    assert status == 200
    (card,) = body["data"]
    assert card["id"] == "SmolLM2-135M-Instruct" and card["context_length"] == 8192
    status, body = call(server, "/health", method="GET", key=None)
    assert status == 200 and body["status"] == "ok"


def test_chat_gives_the_local_workers_tokens(server: RunningServer,
                                             client: EngineClient) -> None:
    status, body = call(server, "/v1/chat/completions", {
        "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 16, "temperature": 0, "return_token_ids": True})
    assert status == 200, body
    local = local_greedy(client, 16, messages=[ChatMessage("user", QUESTION)]).result
    (choice,) = body["choices"]
    assert choice["token_ids"] == local.token_ids
    assert choice["message"] == {"role": "assistant", "content": local.text}
    assert body["prompt_token_ids"] == local.prompt_token_ids
    assert body["usage"]["completion_tokens"] == len(local.token_ids)
    frames = _sse(server, {"messages": [{"role": "user", "content": QUESTION}],
                           "max_tokens": 16, "temperature": 0, "stream": True,
                           "return_token_ids": True})
    chunks = [json.loads(f[6:]) for f in frames if f.startswith("data: {")]
    assert [i for c in chunks for ch in c["choices"] for i in ch.get("token_ids", [])] == \
        local.token_ids
    assert [c["prompt_token_ids"] for c in chunks if "prompt_token_ids" in c] == [
        local.prompt_token_ids]


def test_the_native_client_over_tcp_with_a_key(server: RunningServer,
                                               client: EngineClient) -> None:
    from glmchat.errors import UsageError
    from glmchat.remote_native import GlmchatRemote

    remote = GlmchatRemote(server.url + "/v1", api_key=server.api_key)  # the OpenAI base URL
    remote.start()
    list(remote.load(ModelSpec()))
    params = GenerationParams(strategy="greedy", max_new_tokens=8)
    gen_id = remote.generate(params, prompt="Hello", raw=True)
    ours = [e for e in remote.stream(gen_id) if isinstance(e, Finished)][-1]
    assert ours.result.token_ids == local_greedy(client, 8, prompt="Hello",
                                                 raw=True).result.token_ids
    remote.close()
    with pytest.raises(UsageError, match="refused the API key"):
        GlmchatRemote(server.url, api_key="wrong").generate(params, prompt="Hello")


def test_completions_are_raw_continuations(server: RunningServer,
                                           client: EngineClient) -> None:
    status, body = call(server, "/v1/completions", {
        "model": "default", "prompt": "The capital of France is", "max_tokens": 8,
        "temperature": 0, "return_token_ids": True})
    assert status == 200, body
    local = local_greedy(client, 8, prompt="The capital of France is", raw=True).result
    assert body["choices"][0]["text"] == local.text
    assert body["choices"][0]["token_ids"] == local.token_ids


def _sse(server: RunningServer, body: dict) -> list[str]:
    import http.client

    from glmchat.bench.serve_load import connect

    conn: http.client.HTTPConnection = connect(server.url)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"Authorization": f"Bearer {server.api_key}"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("content-type", "").startswith("text/event-stream")
    text = response.read().decode()
    conn.close()
    return text.split("\n\n")


def test_streaming_is_sse_ending_in_done(server: RunningServer) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    frames = _sse(server, {"messages": messages, "max_tokens": 12, "temperature": 0,
                           "stream": True, "stream_options": {"include_usage": True}})
    assert frames[-1] == ""  # every frame ends with a blank line
    frames = frames[:-1]
    assert all(f.startswith("data: ") and "\n" not in f for f in frames)
    assert frames[-1] == "data: [DONE]"
    chunks = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *content, finish, usage = chunks
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    _, whole = call(server, "/v1/chat/completions",
                    {"messages": messages, "max_tokens": 12, "temperature": 0})
    assert streamed == whole["choices"][0]["message"]["content"]


def test_sampling_seed_n_stop_and_beam_search(server: RunningServer) -> None:
    ask = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
           "temperature": 1.0, "top_k": 40, "seed": 1234, "n": 2}
    first, again = call(server, "/v1/chat/completions", ask), call(server,
                                                                   "/v1/chat/completions", ask)
    assert first[0] == 200 and len(first[1]["choices"]) == 2
    assert [c["message"] for c in first[1]["choices"]] == [c["message"]
                                                           for c in again[1]["choices"]]
    status, body = call(server, "/v1/completions", {
        "prompt": "1, 2, 3, 4,", "max_tokens": 20, "temperature": 0, "stop": [" 7"]})
    assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    assert " 7" not in body["choices"][0]["text"]
    status, body = call(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
        "use_beam_search": True, "n": 2, "length_penalty": 1.0})
    assert status == 200, body
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(texts) == 2 and texts[0] != texts[1]


@pytest.mark.parametrize(("path", "body", "key", "status", "says"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, None, 401,
     "needs an API key"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "nope", 401,
     "not valid"),
    ("/v1/chat/completions", b'{"messages": [', "", 400, "not valid JSON"),
    ("/v1/chat/completions", {"model": "gpt-9", "messages": []}, "", 404, "does not exist"),
    ("/v1/nothing", {}, "", 404, "no such endpoint"),
    ("/v1/completions", {"prompt": "x" * 30000}, "", 413, "bytes"),
    ("/v1/chat/completions", {"messages": "hi"}, "", 422, "messages"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "9"}, "", 422, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 2}, "", 422, "not supported"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, "", 400, "allows (64"),
    ("/glmchat/v1/generate", {"type": "Load", "spec": {"path": "/etc"}}, "", 422,
     "not a Generate"),
])
def test_errors_are_openai_shaped(server: RunningServer, path: str, body: object,
                                  key: str | None, status: int, says: str) -> None:
    got, answer = call(server, path, body, key=key)
    assert got == status
    error = answer["error"]
    assert says in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_the_official_openai_client(server: RunningServer) -> None:
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key=server.api_key, max_retries=0)
    assert [m.id for m in sdk.models.list()] == ["SmolLM2-135M-Instruct"]
    messages = [{"role": "user", "content": QUESTION}]
    whole = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages,
                                        max_tokens=10, temperature=0)
    parts = [chunk.choices[0].delta.content or ""
             for chunk in sdk.chat.completions.create(
                 model="SmolLM2-135M-Instruct", messages=messages, max_tokens=10,
                 temperature=0, stream=True) if chunk.choices]
    assert whole.choices[0].message.content == "".join(parts) != ""
    text = sdk.completions.create(model="default", prompt="Once upon a time", max_tokens=5,
                                  temperature=0, extra_body={"top_k": 5, "min_tokens": 5})
    assert text.usage is not None and text.usage.completion_tokens == 5
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_concurrent_clients_are_each_answered(server: RunningServer) -> None:
    """The load test, tiny: 8 streaming clients, one hanging up, one malformed, one wrong key."""
    report = run_load(server.url, server.api_key, clients=8, requests=1, max_tokens=6)
    assert report.ok, report.lines()
    status, body = request(server.url, "GET", "/metrics", key=server.api_key)
    assert status == 200
    metrics = body.decode()
    assert 'glmchat_requests_total{outcome="cancelled"} 1' in metrics
    assert "glmchat_requests_waiting 0" in metrics and "glmchat_requests_running 0" in metrics
    assert "glmchat_time_to_first_token_seconds_count" in metrics
