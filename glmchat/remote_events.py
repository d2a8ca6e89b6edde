"""The parts every HTTP backend shares: requests become threads, events go through one queue.

``QueueBackend`` gives a remote backend EngineClient's whole surface (start, close, send,
recv, load, generate, stream, cancel, …) so it only writes ``_load``, ``_generate`` and
``_stats``. ``GenerationRun`` is one reply in flight: it turns OpenAI-style chunks into Token
and StepStats events, times them, and closes the connection when the reply is cancelled.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glmchat.conveniences import EventConveniences
from glmchat.errors import GlmchatError, UsageError, WorkerCrashed
from glmchat.params import GenerationParams
from glmchat.protocol import (
    Cancel,
    Event,
    Failed,
    Finished,
    Generate,
    GenerationResult,
    GetStats,
    Load,
    Loaded,
    ModelSpec,
    Ready,
    Request,
    Shutdown,
    StepStats,
    Timings,
    Token,
)

STATS_EVERY_S = 0.1  # StepStats at most this often while a reply streams


@dataclass
class GenerationRun:
    """One reply in flight (see the module docstring)."""

    gen_id: str
    params: GenerationParams
    emit: Callable[[Event], None]
    started: float = field(default_factory=time.perf_counter)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    pieces: int = 0
    first_at: float | None = None
    finish_reason: str | None = None
    stop_reason: Any = None
    usage: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    notes: list[str] = field(default_factory=list)
    seed: int | None = None
    payload_path: str = ""
    _cancel: threading.Event = field(default_factory=threading.Event)
    _conn: Any = None
    _stats_at: float = 0.0

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def attach(self, conn: Any) -> None:
        self._conn = conn
        if self.cancelled:
            self.cancel()

    def cancel(self) -> None:
        """Stop reading; shutting the socket down wakes the reader and tells the server."""
        self._cancel.set()
        sock = getattr(self._conn, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def take(self, chunk: Any, chat: bool) -> None:
        """One chunk (or a whole non-streamed body) of an OpenAI-style reply."""
        if not isinstance(chunk, dict):
            return
        if chunk.get("error"):
            error = chunk["error"]
            self.error = str(error.get("message", error) if isinstance(error, dict) else error)
            return
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("prompt_token_ids"), list):
            self.prompt_token_ids = [int(i) for i in chunk["prompt_token_ids"]]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            if chat:
                part = choice.get("delta") or choice.get("message") or {}
                piece = part.get("content") if isinstance(part, dict) else None
            else:
                piece = choice.get("text")
            ids = choice.get("token_ids")
            new_ids = [int(i) for i in ids] if isinstance(ids, list) else []
            self.token_ids.extend(new_ids)
            if isinstance(choice.get("prompt_token_ids"), list):
                self.prompt_token_ids = [int(i) for i in choice["prompt_token_ids"]]
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])
                self.stop_reason = choice.get("stop_reason")
            if isinstance(piece, str) and piece:
                self._piece(piece, new_ids[-1] if len(new_ids) == 1 else -1)

    def _piece(self, piece: str, token_id: int) -> None:
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
        self.pieces += 1
        self.text += piece
        self.emit(Token(self.gen_id, piece, token_id))
        if now - self._stats_at >= STATS_EVERY_S or self.pieces == 1:
            self._stats_at = now
            decode_s = now - self.first_at
            self.emit(StepStats(self.gen_id, new_tokens=self.pieces,
                                decode_tokens_per_s=(self.pieces - 1) / decode_s
                                if decode_s > 0 else 0.0,
                                prefill_tokens_per_s=0.0, ttft_s=self.first_at - self.started,
                                step_s=0.0))

    def finished(self, request: Generate) -> Finished:
        now = time.perf_counter()
        tokens = int(self.usage.get("completion_tokens") or 0) or len(self.token_ids) \
            or self.pieces
        first = self.first_at if self.first_at is not None else now
        ttft, decode_s = first - self.started, now - first
        timings = Timings(prefill_tokens=int(self.usage.get("prompt_tokens") or 0),
                          ttft_s=ttft, decode_tokens=tokens, decode_s=decode_s,
                          decode_tokens_per_s=(tokens - 1) / decode_s
                          if tokens > 1 and decode_s > 0 else 0.0,
                          total_s=now - self.started)
        if self.cancelled:
            reason = "cancelled"
        elif self.finish_reason == "length":
            reason = "length"
        elif isinstance(self.stop_reason, str):
            reason = "stop"  # vLLM: the stop string that ended it
        else:
            reason = "eos" if self.finish_reason in ("stop", "eos", None) else self.finish_reason
        result = GenerationResult(
            text=self.text, token_ids=list(self.token_ids),
            prompt_token_ids=list(self.prompt_token_ids), finish_reason=reason,
            strategy=self.params.strategy, seed=self.seed, params=self.params,
            timings=timings, notes=list(self.notes))
        return Finished(request.id, result)


class QueueBackend(EventConveniences):
    """EngineClient's surface over threads and a queue (see the module docstring)."""

    description = ""

    def __init__(self) -> None:
        self.ready: Ready | None = None
        self.loaded: Loaded | None = None
        self.crash: str | None = None
        self._events: queue.Queue[Event] = queue.Queue()
        self._ids = itertools.count(1)
        self._runs: dict[str, GenerationRun] = {}
        self._lock = threading.Lock()
        self._open = False

    # ---- to write in a subclass ---------------------------------------------------------------

    def _load(self, spec: ModelSpec) -> None:
        raise NotImplementedError

    def _generate(self, request: Generate, run: GenerationRun) -> None:
        raise NotImplementedError

    def _stats(self) -> None:
        raise NotImplementedError

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._open = True
        self.crash = None

    def close(self, timeout: float = 5.0) -> None:
        self._open = False
        with self._lock:
            runs = list(self._runs.values())
        for run in runs:
            run.cancel()

    def restart(self) -> None:
        self.close()
        self.start()

    @property
    def alive(self) -> bool:
        return self._open

    @property
    def pid(self) -> int | None:
        return None

    def __enter__(self) -> QueueBackend:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- messages -------------------------------------------------------------------------------

    def put(self, event: Event) -> None:
        self._events.put(event)

    def _thread(self, gen_id: str | None, work: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                work()
            except GlmchatError as exc:
                self.put(Failed(gen_id, str(exc), usage=isinstance(exc, UsageError)))
            except Exception as exc:  # a backend thread must report, never vanish
                first = str(exc).splitlines()[0] if str(exc) else ""
                self.put(Failed(gen_id, f"{type(exc).__name__}: {first}"))
            finally:
                if gen_id is not None:
                    with self._lock:
                        self._runs.pop(gen_id, None)

        threading.Thread(target=guarded, name=f"backend-{gen_id or 'request'}",
                         daemon=True).start()

    def send(self, request: Request) -> None:
        if not self._open:
            raise WorkerCrashed(self.crash or f"{self.description or 'the backend'} is closed; "
                                "start it again")
        if isinstance(request, Load):
            spec = request.spec
            self._thread(None, lambda: self._load(spec))
        elif isinstance(request, Generate):
            run = GenerationRun(request.id, request.params, self.put)
            with self._lock:
                self._runs[request.id] = run
            self._thread(request.id, lambda: self._generate(request, run))
        elif isinstance(request, Cancel):
            with self._lock:
                found = self._runs.get(request.id)
            if found is not None:
                found.cancel()
        elif isinstance(request, GetStats):
            self._thread(None, self._stats)
        elif isinstance(request, Shutdown):
            self.close()

    def recv(self, timeout: float | None = None) -> Event | None:
        try:
            event = self._events.get(timeout=timeout) if timeout != 0 else \
                self._events.get_nowait()
        except queue.Empty:
            return None
        if isinstance(event, Loaded):  # as EngineClient: known once the reader has seen it
            self.loaded = event
        return event

    # ---- EngineClient's conveniences ------------------------------------------------------------

    def new_id(self) -> str:
        return f"r{next(self._ids)}"
