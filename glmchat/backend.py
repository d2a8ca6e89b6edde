"""The seam between the front ends and whoever generates: a ``Backend``.

    backend = make_backend(config, discover=True)   # local worker, glmchat serve, or any
    backend.start()                                  # OpenAI-compatible server
    for event in backend.load(spec): …               # … up to Loaded
    gen_id = backend.generate(params, messages=messages)
    for event in backend.stream(gen_id): …           # Token, StepStats, …, Finished

The TUI, the plain REPL, pipe mode and replay hold a Backend and never ask which one it is.
Members: ``EngineClient`` (the local worker process), ``GlmchatRemote`` (glmchat serve's native
event stream, glmchat/remote_native.py) and ``OpenAICompatRemote`` (vLLM, SGLang, llama.cpp's
server, Ollama, transformers serve; glmchat/remote_openai.py). The remote modules are imported
only when chosen, so ``glmchat --help`` pays for none of them.

Which one ``make_backend`` picks:

| [backend] url / --backend  | backend                                                          |
|----------------------------|------------------------------------------------------------------|
| "" (auto)                  | one-shot and --plain: a running local `glmchat serve` that serves |
|                            | the requested model (its state file), else the local worker;     |
|                            | the TUI and replay: the local worker                             |
| "local"                    | the local worker, always                                         |
| http(s)://… (protocol auto)| glmchat serve when it answers on /glmchat/v1/generate, else      |
|                            | OpenAI-compatible                                                |
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from glmchat import paths
from glmchat.errors import UsageError
from glmchat.params import GenerationParams
from glmchat.protocol import ChatMessage, Event, Finished, Loaded, ModelSpec, Ready, Request

API_KEY_ENV = "GLMCHAT_API_KEY"  # read when [backend] api_key is empty
PROTOCOLS = ("auto", "glmchat", "openai")


@runtime_checkable
class Backend(Protocol):
    """What the front ends use of ``EngineClient``; every backend offers the same."""

    ready: Ready | None
    loaded: Loaded | None
    crash: str | None  # why it stopped, once it has

    def start(self) -> None: ...
    def close(self, timeout: float = 5.0) -> None: ...
    def restart(self) -> None: ...
    @property
    def alive(self) -> bool: ...
    @property
    def pid(self) -> int | None: ...

    def send(self, request: Request) -> None: ...
    def recv(self, timeout: float | None = None) -> Event | None: ...
    def load(self, spec: ModelSpec) -> Iterator[Event]: ...
    def new_id(self) -> str: ...
    def generate(self, params: GenerationParams, *, prompt: str = "",
                 messages: list[ChatMessage] | None = None, raw: bool = False) -> str: ...
    def stream(self, gen_id: str) -> Iterator[Event]: ...
    def cancel(self, gen_id: str) -> None: ...
    def request_stats(self) -> None: ...
    def finished_for(self, gen_id: str) -> Finished | None: ...


@dataclass
class BackendConfig:
    """The [backend] section. ``api_key`` names where the key is ("env:NAME" or "file:PATH"),
    never the key itself, so no config file, session or log ever holds it."""

    url: str = ""  # "" = auto, "local", or the server's URL
    protocol: str = "auto"  # "auto" | "glmchat" | "openai"
    model: str = ""  # the server's model id; "" = the one it serves
    api_key: str = ""  # "env:NAME" | "file:PATH" | "" (= env:GLMCHAT_API_KEY when set)
    timeout: float = 600.0  # seconds: connecting, and between two bytes of a reply
    ca_file: str = ""  # PEM bundle to verify the server's certificate with
    verify: bool = True  # TLS certificate verification
    stream: bool = True  # OpenAI-compatible servers: stream replies (SSE) or ask for them whole


def backend_problems(values: dict[str, Any]) -> list[str]:
    """Problems with a (partial) [backend] table, as readable sentences."""
    out: list[str] = []

    def check(key: str, ok: bool, allowed: str) -> None:
        if key in values and not ok:
            out.append(f"{key} = {values[key]!r} is invalid: {allowed}")

    url = values.get("url")
    check("url", isinstance(url, str) and (url in ("", "local") or _is_http(url)),
          'use "" (auto), "local", an http:// or https:// URL, or unix:/PATH')
    check("protocol", values.get("protocol") in PROTOCOLS, "use one of " + ", ".join(PROTOCOLS))
    check("model", isinstance(values.get("model"), str), "use the server's model id")
    key = values.get("api_key")
    if "api_key" in values and not (isinstance(key, str)
                                    and (key == "" or key.startswith(("env:", "file:")))):
        # The value is not repeated: it may be the key itself.
        out.append('api_key is invalid: use "env:VARIABLE" or "file:PATH" (never the key '
                   'itself)')
    timeout = values.get("timeout")
    check("timeout", isinstance(timeout, int | float) and not isinstance(timeout, bool)
          and timeout > 0, "use a number of seconds > 0")
    check("ca_file", isinstance(values.get("ca_file"), str), "use a path to a PEM file")
    check("verify", isinstance(values.get("verify"), bool), "use true or false")
    check("stream", isinstance(values.get("stream"), bool), "use true or false")
    return out


def _is_http(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return (parts.scheme in ("http", "https") and bool(parts.netloc)) or (
        url.startswith("unix:/"))  # glmchat serve's socket


def public_url(url: str) -> str:
    """``url`` without credentials (user:password@, ?key=…): what sessions and logs may show."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def read_api_key(where: str) -> str | None:
    """The key that ``where`` ("env:NAME", "file:PATH", "") points at; None when there is none."""
    if not where:
        return os.environ.get(API_KEY_ENV) or None
    kind, _, name = where.partition(":")
    if kind == "env":
        value = os.environ.get(name)
        if not value:
            raise UsageError(f"[backend] api_key = {where!r}: the environment variable {name} "
                             "is not set; export it or change api_key")
        return value.strip()
    path = Path(name).expanduser()
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"[backend] api_key = {where!r}: cannot read {path} "
                         f"({exc.strerror or exc}); check the path and its permissions") from None
    if not value:
        raise UsageError(f"[backend] api_key = {where!r}: {path} is empty; put the key in it")
    return value


# ---- a running local `glmchat serve` -----------------------------------------------------------


def serve_state_file() -> Path:
    """Where a running `glmchat serve` announces itself."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / paths.APP if runtime else paths.cache_dir()
    return base / "serve.json"


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_model(requested: str, served: str) -> bool:
    if requested == served:
        return True
    if "default" in (requested, served):
        return False
    with contextlib.suppress(OSError):
        return Path(requested).expanduser().resolve() == Path(served).expanduser().resolve()
    return False


def running_server(model_path: str) -> dict[str, Any] | None:
    """The state of a live local `glmchat serve` serving ``model_path``, or None."""
    try:
        state = json.loads(serve_state_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not _pid_alive(state.get("pid")):
        return None
    model = state.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("source"), str):
        return None
    if not _same_model(model_path, model["source"]):
        return None
    if not (state.get("url") or state.get("socket")):
        return None
    if state.get("api_key_required") and not os.environ.get(API_KEY_ENV):
        return None  # it would refuse us; the local worker answers instead
    return state


# ---- the factory -------------------------------------------------------------------------------


def is_local(backend: Backend) -> bool:
    """Whether ``backend`` is the local worker (it loads what it is asked to load)."""
    from glmchat.client import EngineClient

    return isinstance(backend, EngineClient)


def exact_replay(backend: Backend) -> bool:
    """Whether ``backend`` can promise the recorded tokens again (same weights, same seed):
    the local worker and glmchat serve can; another server batches, and says no token ids."""
    return bool(getattr(backend, "deterministic", True))


def describe(backend: Backend) -> str:
    """Which backend answers, for -v: "local worker (pid 123)", "glmchat serve at …"."""
    text = getattr(backend, "description", None)
    if isinstance(text, str) and text:
        return text
    return f"local worker (pid {backend.pid})" if backend.pid else "local worker"


def make_backend(config: Any, *, discover: bool = False,
                 stderr_path: str | None = None) -> Backend:
    """The backend ``config`` asks for (see the table in the module docstring). ``discover``:
    with url "" use a running local `glmchat serve` that serves ``config.model.path``."""
    from glmchat.client import EngineClient

    settings: BackendConfig = getattr(config, "backend", None) or BackendConfig()
    url = settings.url
    if url == "local" or (url == "" and not discover):
        return EngineClient(stderr_path)
    if url == "":
        state = running_server(config.model.path)
        if state is None:
            return EngineClient(stderr_path)
        try:
            return _glmchat_remote(state.get("url") or f"unix:{state['socket']}", settings,
                                   found=True)
        except UsageError:
            return EngineClient(stderr_path)
    protocol = settings.protocol
    if url.startswith("unix:"):  # a Unix socket: only glmchat serve listens on those
        return _glmchat_remote(url, settings)
    if protocol == "auto":
        protocol = probe_protocol(url, settings)
    if protocol == "glmchat":
        return _glmchat_remote(url, settings)
    from glmchat.remote_openai import OpenAICompatRemote

    return OpenAICompatRemote(url, api_key=read_api_key(settings.api_key), model=settings.model,
                              timeout=settings.timeout, ca_file=settings.ca_file or None,
                              verify=settings.verify, stream=settings.stream)


def _glmchat_remote(url: str, settings: BackendConfig, found: bool = False) -> Backend:
    try:
        from glmchat.remote_native import GlmchatRemote  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise UsageError(f"{public_url(url)} is a glmchat serve, and this glmchat has no client "
                         "for its native stream; use [backend] protocol = \"openai\"") from None
    remote: Backend = GlmchatRemote(url, api_key=read_api_key(settings.api_key),
                                    timeout=settings.timeout, ca_file=settings.ca_file or None,
                                    verify=settings.verify)
    if found and not getattr(remote, "description", ""):
        with contextlib.suppress(AttributeError):
            remote.description = f"glmchat serve at {url}"  # type: ignore[attr-defined]
    return remote


def probe_protocol(url: str, settings: BackendConfig) -> str:
    """"glmchat" when ``url`` is a glmchat serve (its native endpoint exists), else "openai"."""
    from glmchat.httpclient import HttpTarget

    target = HttpTarget(url, api_key=read_api_key(settings.api_key),
                        timeout=min(settings.timeout, 10.0), ca_file=settings.ca_file or None,
                        verify=settings.verify)
    status = target.probe_status("/glmchat/v1/generate")
    return "glmchat" if status in (200, 400, 405, 422) else "openai"
