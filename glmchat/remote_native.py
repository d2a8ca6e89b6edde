"""GlmchatRemote: a `glmchat serve` as a backend, with the local worker's events.

It offers what the front ends use of EngineClient (start, close, alive, load, generate,
stream, cancel, request_stats, recv), so the TUI, the REPL and pipe mode cannot tell it from a
local worker: the server sends the worker protocol's own events as JSON lines
(glmchat/wire.py) on POST /glmchat/v1/generate, and beams, infill spans, token ids, step stats,
memory and placement arrive as they would over the local pipe.

Standard library only (http.client: a Unix socket or TCP, TLS with a CA file), so importing it
costs nothing noticeable. Each generation is one streaming HTTP request read by its own thread
into one event queue; ``recv`` takes from that queue, as EngineClient's reads the pipe.
``url``: "unix:/path/to/serve.sock", or "http(s)://host:port".
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import itertools
import json
import queue
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

from glmchat import wire
from glmchat.conveniences import EventConveniences
from glmchat.errors import GlmchatError, UsageError, WorkerCrashed
from glmchat.params import GenerationParams
from glmchat.protocol import (
    Cancel,
    ChatMessage,
    Event,
    Failed,
    Finished,
    Generate,
    GetStats,
    Load,
    Loaded,
    Memory,
    ModelSpec,
    Ready,
    Request,
    Shutdown,
)


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def public_url(url: str) -> str:
    """``url`` without credentials, for messages and sessions."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https") and "@" in parts.netloc:
        return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return url


class GlmchatRemote(EventConveniences):
    """A `glmchat serve` (at ``url``) that looks like an EngineClient to the front ends."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0,
                 ca_file: str | None = None, verify: bool = True) -> None:
        self.url = url
        self.shown_url = public_url(url)
        self.description = f"glmchat serve at {self.shown_url}"
        self.timeout = timeout
        self._headers = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._target = self._parse(url, ca_file, verify)
        self.stderr_path: str | None = None
        self.ready: Ready | None = None
        self.loaded: Loaded | None = None
        self.crash: str | None = None
        self._events: queue.Queue[Event] = queue.Queue()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._streams: dict[str, tuple[http.client.HTTPConnection, str]] = {}
        self._started = False

    def _parse(self, url: str, ca_file: str | None, verify: bool) -> tuple[str, Any, Any]:
        if url.startswith("unix:"):
            path = url.removeprefix("unix:")
            path = "/" + path.lstrip("/") if path.startswith("//") else path
            return ("unix", path, None)
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"backend URL {self.shown_url!r} is not http(s)://HOST[:PORT] or "
                             "unix:/PATH")
        context = None
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=ca_file)
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        # the OpenAI base URL (…/v1) names the same server: our paths start at its root
        prefix = parts.path.rstrip("/").removesuffix("/v1")
        return (parts.scheme, (parts.hostname, parts.port, prefix), context)

    # ---- HTTP ------------------------------------------------------------------------------------

    def _connect(self, timeout: float | None = None) -> tuple[http.client.HTTPConnection, str]:
        kind, where, context = self._target
        wait = self.timeout if timeout is None else timeout
        if kind == "unix":
            return _UnixConnection(where, wait), ""
        host, port, prefix = where
        if kind == "https":
            return http.client.HTTPSConnection(host, port, timeout=wait, context=context), prefix
        return http.client.HTTPConnection(host, port, timeout=wait), prefix

    def _open(self, method: str, path: str, body: Any = None,
              timeout: float | None = None) -> tuple[http.client.HTTPConnection,
                                                     http.client.HTTPResponse]:
        conn, prefix = self._connect(timeout)
        data = None if body is None else json.dumps(body).encode()
        try:
            conn.request(method, prefix + path, body=data, headers=self._headers)
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise GlmchatError(f"cannot reach glmchat serve at {self.shown_url} "
                               f"({_reason(exc)}); is it running?") from None
        if response.status >= 400:
            text = response.read()
            conn.close()
            raise _http_error(response.status, text, self.shown_url)
        return conn, response

    def _get_json(self, path: str, timeout: float = 30.0) -> Any:
        conn, response = self._open("GET", path, timeout=timeout)
        try:
            return json.loads(response.read())
        except (OSError, ValueError) as exc:
            raise GlmchatError(f"glmchat serve at {self.shown_url} sent a bad answer to "
                               f"{path} ({_reason(exc)})") from None
        finally:
            conn.close()

    # ---- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        health = self._get_json("/health", timeout=min(self.timeout, 10.0))
        if not isinstance(health, dict) or health.get("status") != "ok":
            raise GlmchatError(f"glmchat serve at {self.shown_url} is not ready: "
                               f"{health.get('error') if isinstance(health, dict) else health}")
        self.crash = None
        self._started = True

    @property
    def alive(self) -> bool:
        return self._started and self.crash is None

    @property
    def pid(self) -> int | None:
        return None  # no local process

    def close(self, timeout: float = 5.0) -> None:
        with self._lock:
            streams = list(self._streams.items())
        for gen_id, _ in streams:
            with contextlib.suppress(GlmchatError):
                self.cancel(gen_id)
        for _, (conn, _server_id) in streams:
            with contextlib.suppress(OSError):
                conn.close()  # a dropped connection cancels on the server too
        self._started = False

    def restart(self) -> None:
        self.close()
        self.start()

    def __enter__(self) -> GlmchatRemote:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- messages --------------------------------------------------------------------------------

    def send(self, request: Request) -> None:
        """EngineClient's ``send``: Load, Generate, Cancel, GetStats, Shutdown."""
        if isinstance(request, Load):  # the answer comes on recv, as from a worker
            loaded, memory = self._served()
            self._events.put(loaded)
            if memory is not None:
                self._events.put(memory)
        elif isinstance(request, Generate):
            self._generate(request)
        elif isinstance(request, Cancel):
            self.cancel(request.id)
        elif isinstance(request, GetStats):
            self.request_stats()
        elif isinstance(request, Shutdown):
            self.close()

    def recv(self, timeout: float | None = None) -> Event | None:
        """The next event of any generation, or None after ``timeout`` seconds."""
        if not self._started:
            raise WorkerCrashed(self.crash or f"not connected to {self.description}; "
                                              "start it again")
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(event, Loaded):
            self.loaded = event
        return event

    def load(self, spec: ModelSpec) -> Iterator[Event]:
        """The served model, as Loaded (a server loads what it was started with); its memory
        report follows on ``recv``."""
        loaded, memory = self._served()
        if memory is not None:
            self._events.put(memory)
        yield loaded

    def _served(self) -> tuple[Loaded, Memory | None]:
        state = self._get_json("/glmchat/v1/model")
        try:
            loaded: Loaded = wire.from_wire(state["loaded"], Loaded)
            memory = state.get("memory")
            memory = None if memory is None else wire.from_wire(memory, Memory)
        except (KeyError, TypeError, wire.WireError) as exc:
            raise GlmchatError(f"glmchat serve at {self.shown_url} sent a bad model "
                               f"description ({exc})") from None
        if hasattr(loaded.info, "backend"):  # the seam's field: who generates
            loaded.info = dataclasses.replace(loaded.info, backend=self.shown_url)
        self.loaded = loaded
        return loaded, memory

    def new_id(self) -> str:
        return f"r{next(self._ids)}"

    def generate(self, params: GenerationParams, *, prompt: str = "",
                 messages: list[ChatMessage] | None = None, raw: bool = False) -> str:
        gen_id = self.new_id()
        self._generate(Generate(id=gen_id, params=params, prompt=prompt,
                                messages=messages or [], raw=raw))
        return gen_id

    def _generate(self, request: Generate) -> None:
        conn, response = self._open("POST", "/glmchat/v1/generate", wire.to_wire(request))
        server_id = response.getheader("X-Glmchat-Request-Id") or ""
        with self._lock:
            self._streams[request.id] = (conn, server_id)
        threading.Thread(target=self._read, args=(request.id, conn, response),
                         name=f"remote-{request.id}", daemon=True).start()

    def _read(self, gen_id: str, conn: http.client.HTTPConnection,
              response: http.client.HTTPResponse) -> None:
        ended = False
        try:
            for line in response:
                if not line.strip():
                    continue
                try:
                    event = wire.loads(line)
                except wire.WireError as exc:
                    if _unknown_type(line):
                        continue  # an event a newer server sends and we do not know
                    raise GlmchatError(f"bad event from glmchat serve: {exc}") from None
                self._events.put(event)
                if isinstance(event, Finished | Failed) and getattr(event, "id", None) == gen_id:
                    ended = True
                    break
        except (OSError, http.client.HTTPException, GlmchatError) as exc:
            if not ended:
                self._events.put(Failed(id=gen_id, error=f"the connection to "
                                        f"{self.description} broke mid-reply ({_reason(exc)})"))
                ended = True
        finally:
            with self._lock:
                self._streams.pop(gen_id, None)
            conn.close()
            if not ended:
                self._events.put(Failed(id=gen_id, error=f"{self.description} closed the "
                                                         "stream before the reply finished"))

    def cancel(self, gen_id: str) -> None:
        """Stop one generation; its Finished (with the partial reply) still arrives."""
        with self._lock:
            stream = self._streams.get(gen_id)
        if stream is None:
            return
        conn, server_id = stream
        try:
            self._get_cancel(server_id)
        except GlmchatError:
            with contextlib.suppress(OSError):
                conn.close()  # the server cancels a generation whose client went away

    def _get_cancel(self, server_id: str) -> None:
        c, response = self._open("POST", "/glmchat/v1/cancel", {"id": server_id}, timeout=10.0)
        response.read()
        c.close()

    def request_stats(self) -> None:
        """A Memory event arrives on ``recv`` (fetched in the background)."""
        def fetch() -> None:
            with contextlib.suppress(GlmchatError, wire.WireError):
                self._events.put(wire.from_wire(self._get_json("/glmchat/v1/memory"), Memory))

        threading.Thread(target=fetch, name="remote-stats", daemon=True).start()


def _unknown_type(line: bytes) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("type") not in wire.WIRE_TYPES


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _http_error(status: int, body: bytes, url: str) -> GlmchatError:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip()[:200] or f"HTTP {status}"
    if status == 401:
        return UsageError(f"glmchat serve at {url} refused the API key: {message}; set "
                          "[backend] api_key")
    if status in (400, 404, 413, 422):
        return UsageError(f"glmchat serve at {url}: {message}")
    return GlmchatError(f"glmchat serve at {url}: {message} (HTTP {status})")
