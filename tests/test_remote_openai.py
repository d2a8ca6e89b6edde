"""OpenAICompatRemote and the backend seam, without a model: URL and key handling, the SSE
reader, and the stream's edge cases. The edge cases (comment lines, no [DONE], a stream cut
midway, a refused key, vLLM's /metrics) come from a loopback HTTP server that sends canned
bytes, because no real server here can be made to misbehave on cue; the real server is in
test_remote_transformers_serve.py."""

from __future__ import annotations

import io
import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from glmchat.backend import (
    Backend,
    BackendConfig,
    describe,
    make_backend,
    public_url,
    read_api_key,
    running_server,
    serve_state_file,
)
from glmchat.client import EngineClient
from glmchat.config import Config, load_config
from glmchat.errors import GlmchatError, UsageError
from glmchat.httpclient import sse_events
from glmchat.params import GenerationParams
from glmchat.protocol import Finished, Loaded, Memory, ModelSpec, Token
from glmchat.remote_openai import OpenAICompatRemote, kv_cache_note

from .conftest import run_cli


def chunk(text: str = "", finish: str | None = None) -> bytes:
    choice: dict[str, Any] = {"index": 0, "delta": {"content": text} if text else {}}
    if finish:
        choice["finish_reason"] = finish
    return f"data: {json.dumps({'choices': [choice]})}\n\n".encode()


class Canned(BaseHTTPRequestHandler):
    """Answers from the class-level ``routes``: path → (status, content type, body chunks)."""

    routes: ClassVar[dict[str, tuple[int, str, list[bytes]]]] = {}
    seen: ClassVar[list[tuple[str, str, dict[str, Any]]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else {}
        self.seen.append((self.path, self.headers.get("Authorization", ""), body))
        status, kind, parts = self.routes.get(self.path, (404, "application/json",
                                                           [b'{"detail": "Not Found"}']))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Connection", "close")
        self.end_headers()
        for part in parts:
            self.wfile.write(part)
            self.wfile.flush()

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def canned() -> Iterator[tuple[str, type[Canned]]]:
    handler = type("Handler", (Canned,), {"routes": {}, "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.routes["/v1/models"] = (200, "application/json",
                                    [b'{"data": [{"id": "m1", "max_model_len": 2048}]}'])
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def loaded(remote: OpenAICompatRemote) -> Loaded:
    remote.start()
    events = list(remote.load(ModelSpec()))
    assert isinstance(events[-1], Loaded)
    return events[-1]


def test_public_url_drops_credentials_and_queries() -> None:
    assert public_url("https://user:pw@gpu:8000/v1/?key=secret") == "https://gpu:8000/v1"
    assert public_url("http://[::1]:9/") == "http://[::1]:9"


def test_api_key_comes_from_env_or_file_and_a_literal_key_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "k-env")
    assert read_api_key("env:MY_KEY") == "k-env"
    (tmp_path / "key").write_text("k-file\n")
    assert read_api_key(f"file:{tmp_path / 'key'}") == "k-file"
    with pytest.raises(UsageError, match="NOPE_KEY is not set"):
        read_api_key("env:NOPE_KEY")
    config = tmp_path / "c.toml"
    config.write_text('[backend]\napi_key = "sk-literal"\n')
    with pytest.raises(UsageError, match="never the key itself") as info:
        load_config(config)
    assert "sk-literal" not in str(info.value)


def test_sse_reader_skips_comments_joins_lines_and_survives_a_missing_done() -> None:
    class Body(io.BytesIO):
        pass

    raw = (b": keep-alive\n\nevent: message\ndata: {\"a\":\ndata: 1}\n\n"
           b"id: 7\nretry: 10\n\ndata: two\n\ndata: [DONE]\n\ndata: after\n\n")
    assert list(sse_events(Body(raw))) == ['{"a":\n1}', "two"]  # type: ignore[arg-type]
    assert list(sse_events(Body(b"data: last"))) == ["last"]  # type: ignore[arg-type]


def test_kv_cache_usage_is_read_from_vllm_metrics() -> None:
    metrics = ('# HELP vllm:kv_cache_usage_perc KV-cache usage.\n'
               'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
               'vllm:num_requests_running{model_name="m"} 1.0\n')
    assert kv_cache_note(metrics) == "server KV cache 25% in use (vLLM /metrics)"
    assert kv_cache_note("process_cpu_seconds_total 3.0\n") is None


def test_a_stream_with_comments_and_no_done_finishes(canned: tuple[str, type[Canned]]) -> None:
    url, handler = canned
    handler.routes["/v1/chat/completions"] = (200, "text/event-stream", [
        b": ping\n\n", chunk("Hel"), b": ping\n\n", chunk("lo"), chunk(finish="stop"),
        b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}\n\n'])
    handler.routes["/metrics"] = (200, "text/plain",
                                  [b'vllm:kv_cache_usage_perc{engine="0"} 0.5\n'])
    remote = OpenAICompatRemote(url, api_key="k-123")
    info = loaded(remote).info
    assert (info.name, info.context_length, info.backend) == ("m1", 2048, url)
    gen_id = remote.generate(GenerationParams(max_new_tokens=4), prompt="Hi")
    events = list(remote.stream(gen_id))
    assert "".join(e.text for e in events if isinstance(e, Token)) == "Hello"
    result = events[-1].result if isinstance(events[-1], Finished) else None
    assert result is not None and result.finish_reason == "eos" and result.text == "Hello"
    assert result.timings.decode_tokens == 2 and result.timings.prefill_tokens == 5
    assert any("token ids: not reported" in n for n in result.notes)
    path, auth, body = handler.seen[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer k-123"
    assert body["messages"] == [{"role": "user", "content": "Hi"}] and body["temperature"] == 0
    remote.request_stats()
    memory = next(e for e in iter(lambda: remote.recv(5), None) if isinstance(e, Memory))
    assert memory.note == "server KV cache 50% in use (vLLM /metrics)" and not memory.devices
    remote.close()


def test_a_stream_cut_midway_fails_once_and_is_not_retried(
        canned: tuple[str, type[Canned]]) -> None:
    url, handler = canned
    handler.routes["/v1/completions"] = (200, "text/event-stream", [
        b'data: {"choices": [{"index": 0, "text": "Once"}]}\n\n'])
    remote = OpenAICompatRemote(url, model="m1")
    loaded(remote)
    gen_id = remote.generate(GenerationParams(), prompt="Tell", raw=True)
    with pytest.raises(GlmchatError, match="ended the stream before the reply finished"):
        list(remote.stream(gen_id))
    assert [p for p, _, _ in handler.seen].count("/v1/completions") == 1


def test_refusals_are_one_line_each(canned: tuple[str, type[Canned]]) -> None:
    url, handler = canned
    handler.routes["/v1/chat/completions"] = (
        401, "application/json", [b'{"error": {"message": "Invalid API key"}}'])
    remote = OpenAICompatRemote(url)
    loaded(remote)
    with pytest.raises(GlmchatError, match=r"refused the request \(401: Invalid API key\)"):
        list(remote.stream(remote.generate(GenerationParams(), prompt="Hi")))
    beam = GenerationParams(strategy="beam", num_beams=2)
    with pytest.raises(UsageError, match=r"beam search: .* which has none"):
        list(remote.stream(remote.generate(beam, prompt="Hi")))
    handler.routes["/v1/models"] = (200, "application/json",
                                    [b'{"data": [{"id": "a"}, {"id": "b"}]}'])
    with pytest.raises(UsageError, match=r"has 2 models \(a, b\); name the one"):
        loaded(OpenAICompatRemote(url))
    gone = OpenAICompatRemote("http://127.0.0.1:9")
    with pytest.raises(GlmchatError, match=r"cannot reach http://127\.0\.0\.1:9"):
        loaded(gone)


def test_a_backend_url_that_answers_nothing_is_one_line_in_the_cli() -> None:
    proc = run_cli("--backend", "http://127.0.0.1:9/v1", "hello", timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("glmchat: error: cannot reach http://127.0.0.1:9")
    assert "Traceback" not in proc.stderr


def test_the_local_worker_is_a_backend_and_the_default() -> None:
    assert isinstance(EngineClient(), Backend)
    assert isinstance(OpenAICompatRemote("http://127.0.0.1:9"), Backend)
    assert isinstance(make_backend(Config()), EngineClient)
    assert describe(EngineClient()) == "local worker"


def test_a_running_serve_is_found_by_its_state_file_only_for_its_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert serve_state_file() == tmp_path / "glmchat" / "serve.json"
    serve_state_file().parent.mkdir()
    state = {"url": "http://127.0.0.1:9", "socket": "", "pid": os.getpid(),
             "model": {"source": "default", "name": "SmolLM2", "digest": "", "context_length": 0},
             "started": "now"}
    serve_state_file().write_text(json.dumps(state))
    assert running_server("default") is not None
    assert running_server(str(tmp_path / "other-model")) is None
    serve_state_file().write_text(json.dumps({**state, "pid": 2**22 + 12345}))
    assert running_server("default") is None  # a stale file of a server that is gone
    config = Config(backend=BackendConfig(url="local"))
    serve_state_file().write_text(json.dumps(state))
    assert isinstance(make_backend(config, discover=True), EngineClient)


def test_tls_is_verified_and_a_ca_file_makes_a_private_certificate_trusted(
        canned: tuple[str, type[Canned]], tmp_path: Path) -> None:
    import ssl
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    _, handler = canned
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/v1"
    try:
        with pytest.raises(GlmchatError, match=r"TLS certificate is not trusted.*--ca-file"):
            loaded(OpenAICompatRemote(url))
        assert loaded(OpenAICompatRemote(url, ca_file=str(cert))).info.name == "m1"
        assert loaded(OpenAICompatRemote(url, verify=False)).info.name == "m1"
    finally:
        server.shutdown()
        server.server_close()
