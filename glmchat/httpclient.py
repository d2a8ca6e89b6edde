"""A small HTTP + Server-Sent Events client on the standard library (http.client, ssl).

Why not httpx2 (installed with huggingface_hub): the standard library imports in a few
milliseconds, has no connection pool to drain when a stream is cancelled from another thread,
and already does all a chat client needs: one request per reply, a streamed body read line by
line, timeouts, TLS with the system's or a given CA bundle. Proxies (HTTP(S)_PROXY) are not
followed.

Errors come out as ``HttpError``: one readable sentence naming the server and what to do.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

from glmchat.errors import GlmchatError

CONNECT_RETRIES = 2  # a refused connection is retried: nothing reached the server yet


class HttpError(GlmchatError):
    """A request failed. ``status``: the HTTP status, None when no answer came; ``usage``:
    the request itself was refused as bad (4xx other than auth), not the run failing."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.usage = status in (400, 404, 413, 422)


def _error_message(body: bytes) -> str:
    """The message in an error body: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}…"""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text.splitlines()[0][:300] if text else ""
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            for key in ("message", "detail", "msg"):
                if error.get(key):
                    return str(error[key])[:300]
        if isinstance(error, str):
            return error[:300]
        if data.get("detail"):
            return str(data["detail"])[:300]
    return text[:300]


class HttpTarget:
    """One server. ``url``: its root or its OpenAI base URL (…/v1); ``api_path`` is where the
    /v1 endpoints live, ``root_path`` where the others (/metrics, /health) do."""

    def __init__(self, url: str, *, api_key: str | None = None, timeout: float = 600.0,
                 ca_file: str | None = None, verify: bool = True) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise GlmchatError(f"{url!r} is not an http:// or https:// URL")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port
        path = parts.path.rstrip("/")
        self.root_path = path.removesuffix("/v1")
        self.api_path = self.root_path + "/v1"
        self.public = f"{self.scheme}://{parts.netloc.rpartition('@')[2]}{path}"
        self.api_key = api_key
        self.timeout = timeout
        self.ssl_context: ssl.SSLContext | None = None
        if self.scheme == "https":
            self.ssl_context = ssl.create_default_context(cafile=ca_file)
            if not verify:
                self.ssl_context.check_hostname = False
                self.ssl_context.verify_mode = ssl.CERT_NONE

    # ---- connections ----------------------------------------------------------------------------

    def connect(self, timeout: float | None = None) -> http.client.HTTPConnection:
        """An open connection; a refused one is retried briefly (nothing was sent yet)."""
        timeout = self.timeout if timeout is None else timeout
        for attempt in range(CONNECT_RETRIES + 1):
            conn: http.client.HTTPConnection
            if self.scheme == "https":
                conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                                   context=self.ssl_context)
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
            try:
                conn.connect()
                return conn
            except ConnectionRefusedError:
                conn.close()
                if attempt == CONNECT_RETRIES:
                    raise self.unreachable("connection refused") from None
                time.sleep(0.2 * (attempt + 1))
            except OSError as exc:
                conn.close()
                raise self.failure(exc) from None
        raise AssertionError("unreachable")

    def headers(self, body: bool) -> dict[str, str]:
        out = {"Accept": "application/json, text/event-stream", "User-Agent": "glmchat"}
        if body:
            out["Content-Type"] = "application/json"
        if self.api_key:
            out["Authorization"] = f"Bearer {self.api_key}"
        return out

    def open(self, method: str, path: str, payload: Any = None, timeout: float | None = None
             ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send one request; the connection and its response (status checked: an error status
        raises HttpError with the server's message). The caller closes the connection."""
        conn = self.connect(timeout)
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        try:
            conn.request(method, path, body=body, headers=self.headers(body is not None))
            response = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self.failure(exc) from None
        if response.status >= 400:
            try:
                detail = _error_message(response.read(64 * 1024))
            except (OSError, http.client.HTTPException):
                detail = ""
            conn.close()
            raise self.refused(response.status, path, detail)
        return conn, response

    def get_json(self, path: str) -> Any:
        conn, response = self.open("GET", path)
        try:
            return json.loads(response.read())
        except ValueError:
            raise HttpError(f"{self.public}{path} did not answer with JSON; is {self.public} "
                            "the right URL?") from None
        except (OSError, http.client.HTTPException) as exc:
            raise self.failure(exc) from None
        finally:
            conn.close()

    def get_text(self, path: str, timeout: float) -> str:
        conn, response = self.open("GET", path, timeout=timeout)
        try:
            return response.read(4 * 1024 * 1024).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            raise self.failure(exc) from None
        finally:
            conn.close()

    def probe_status(self, path: str) -> int:
        """The status a GET of ``path`` gets (404 for a path the server does not have)."""
        conn = self.connect()
        try:
            conn.request("GET", self.root_path + path, headers=self.headers(False))
            return conn.getresponse().status
        except (OSError, http.client.HTTPException) as exc:
            raise self.failure(exc) from None
        finally:
            conn.close()

    # ---- errors ----------------------------------------------------------------------------------

    def unreachable(self, why: str) -> HttpError:
        return HttpError(f"cannot reach {self.public} ({why}); is the server running? "
                         "Check --backend / [backend] url")

    def failure(self, exc: BaseException) -> HttpError:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return HttpError(f"{self.public}: the server's TLS certificate is not trusted "
                             f"({exc.verify_message}); pass its CA with --ca-file or "
                             "[backend] ca_file")
        if isinstance(exc, TimeoutError | socket.timeout):
            return HttpError(f"{self.public} did not answer within {self.timeout:g} s; raise "
                             "[backend] timeout if it is just slow")
        if isinstance(exc, socket.gaierror):
            return self.unreachable(f"unknown host {self.host}")
        if isinstance(exc, ConnectionRefusedError):
            return self.unreachable("connection refused")
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return HttpError(f"the connection to {self.public} failed ({reason or type(exc).__name__})")

    def refused(self, status: int, path: str, detail: str) -> HttpError:
        said = f": {detail}" if detail else ""
        if status in (401, 403):
            return HttpError(f"{self.public} refused the request ({status}{said}); set the API "
                             "key with [backend] api_key = \"env:NAME\" or \"file:PATH\", or "
                             "$GLMCHAT_API_KEY", status)
        if status == 404 and not detail:
            return HttpError(f"{self.public} has no {path} (404); is it an OpenAI-compatible "
                             "server, and is the URL right?", status)
        return HttpError(f"{self.public} answered {status}{said}", status)


def sse_events(response: http.client.HTTPResponse) -> Iterator[str]:
    """The data of each Server-Sent Event, until ``[DONE]`` or the end of the body. Comment
    lines (``: keep-alive``), ``event:``/``id:``/``retry:`` fields and blank events are
    skipped; multi-line data is joined with newlines, as the SSE spec says."""
    data: list[str] = []
    while True:
        raw = response.readline()
        if not raw:
            if data and "\n".join(data).strip() != "[DONE]":
                yield "\n".join(data)
            return
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if data:
                joined = "\n".join(data)
                data = []
                if joined.strip() == "[DONE]":
                    return
                yield joined
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
