"""The worker behind `glmchat serve`: one EngineClient, loaded once, shared fairly.

The worker generates one request at a time, so requests wait here in a FIFO queue and only the
one at its head is sent to the worker. A dispatcher thread reads the worker's events and hands
each to the request it belongs to, on that request's event loop (the ASGI server's). Cancelling
a waiting request just takes it out of the queue; cancelling the running one sends the worker a
Cancel, which its decode loop sees before the next token. Nobody else's request is touched.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field

from glmchat.client import EngineClient
from glmchat.errors import GlmchatError, WorkerCrashed
from glmchat.params import GenerationParams
from glmchat.protocol import (
    ChatMessage,
    Event,
    Failed,
    Finished,
    Generate,
    GenerationResult,
    Loaded,
    LoadProgress,
    Memory,
    ModelSpec,
    Timings,
    Token,
)

STATS_EVERY_S = 5.0  # ask an idle worker for its memory this often (for /metrics)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(eq=False)
class Job:
    """One generation request, from submission to its Finished or Failed."""

    request: Generate
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    first_token: float | None = None
    cancel_requested: bool = False
    done: bool = False

    @property
    def id(self) -> str:
        return self.request.id

    def deliver(self, event: Event) -> None:
        """From the dispatcher thread: queue ``event`` for the request's handler."""
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody listens
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Counters:
    """What /metrics reports. Written by the dispatcher thread, read by the handlers."""

    requests_total: collections.Counter[str] = field(default_factory=collections.Counter)
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    decode_seconds_total: float = 0.0
    last_decode_tokens_per_s: float = 0.0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_count: int = 0
    ttft_sum: float = 0.0

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_count += 1
        self.ttft_sum += seconds
        for i, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_buckets[i] += 1


class ServedWorker:
    """Start the worker, load ``spec`` once, then run submitted jobs one at a time."""

    def __init__(self, spec: ModelSpec, stderr_path: str | None = None,
                 max_waiting: int = 256) -> None:
        self.spec = spec
        self.client = EngineClient(stderr_path)
        self.max_waiting = max_waiting
        self.loaded: Loaded | None = None
        self.memory: Memory | None = None
        self.crash: str | None = None
        self.counters = Counters()
        self.started_at = time.time()
        self._lock = threading.Lock()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, verbose: bool = False) -> Loaded:
        """Spawn the worker and load the model (blocking: minutes for a big one)."""
        self.client.start()
        for event in self.client.load(self.spec):
            if verbose and isinstance(event, LoadProgress):
                print(f"glmchat serve: [{event.done}/{event.total}] {event.what}",
                      file=sys.stderr)
            elif isinstance(event, Memory):
                self.memory = event
        assert self.client.loaded is not None
        self.loaded = self.client.loaded
        self._thread = threading.Thread(target=self._dispatch, name="serve-dispatch",
                                        daemon=True)
        self._thread.start()
        return self.loaded

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self.client.close(timeout=3.0)
        with self._lock:
            jobs = [*self._waiting, *([self._running] if self._running else [])]
            self._waiting.clear()
            self._running = None
        for job in jobs:
            job.deliver(Failed(id=job.id, error="the server is shutting down"))

    @property
    def healthy(self) -> bool:
        return self.loaded is not None and self.crash is None and self.client.alive

    @property
    def running(self) -> int:
        return 1 if self._running is not None else 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ---- jobs --------------------------------------------------------------------------------

    def submit(self, params: GenerationParams, *, prompt: str = "",
               messages: list[ChatMessage] | None = None, raw: bool = False) -> Job:
        """Queue a generation; its events arrive on ``job.events`` (current event loop)."""
        if not self.healthy:
            raise WorkerCrashed(self.crash or "the model is not loaded yet")
        request = Generate(id=f"s{secrets.token_hex(8)}", params=params, prompt=prompt,
                           messages=list(messages or []), raw=raw)
        job = Job(request=request, loop=asyncio.get_running_loop())
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise GlmchatError(f"{len(self._waiting)} requests are already waiting; "
                                   "try again later")
            self._waiting.append(job)
            self._launch_next()
        return job

    def cancel(self, job: Job) -> None:
        """Stop ``job``: a waiting one finishes at once as cancelled; the running one stops
        before its next token and then finishes with what it has."""
        with self._lock:
            if job.done or job.cancel_requested:
                return
            job.cancel_requested = True
            if job in self._waiting:
                self._waiting.remove(job)
                job.done = True
                self.counters.requests_total["cancelled"] += 1
                job.deliver(Finished(id=job.id, result=_nothing(job.request)))
                return
        with contextlib.suppress(GlmchatError):
            self.client.cancel(job.id)

    def _launch_next(self) -> None:
        """With the lock held: send the head of the queue when the worker is free."""
        if self._running is not None or not self._waiting:
            return
        job = self._waiting.popleft()
        self._running = job
        job.started = time.perf_counter()
        try:
            self.client.send(job.request)
        except GlmchatError as exc:
            self._running = None
            job.done = True
            job.deliver(Failed(id=job.id, error=str(exc)))

    # ---- the dispatcher thread ---------------------------------------------------------------

    def _dispatch(self) -> None:
        last_stats = time.monotonic()
        while not self._stop.is_set():
            try:
                event = self.client.recv(timeout=0.25)
            except WorkerCrashed as exc:
                self._fail_all(f"the model worker stopped: {exc}")
                return
            if event is None:
                if self._running is None and time.monotonic() - last_stats >= STATS_EVERY_S:
                    last_stats = time.monotonic()
                    with contextlib.suppress(GlmchatError):
                        self.client.request_stats()
                continue
            self._route(event)

    def _route(self, event: Event) -> None:
        if isinstance(event, Memory):
            self.memory = event
        job = self._running
        if job is None:
            return
        event_id = getattr(event, "id", job.id)
        if event_id != job.id and not (isinstance(event, Failed) and event_id is None):
            return  # a late event of a request that is already over
        if isinstance(event, Token) and job.first_token is None:
            job.first_token = time.perf_counter()
            self.counters.observe_ttft(job.first_token - job.submitted)
        if isinstance(event, Failed) and event.id is None:  # a failure of the worker itself
            event = Failed(id=job.id, error=event.error, usage=event.usage)
        job.deliver(event)
        if isinstance(event, Finished | Failed):
            self._account(job, event)
            with self._lock:
                job.done = True
                self._running = None
                self._launch_next()

    def _account(self, job: Job, event: Finished | Failed) -> None:
        c = self.counters
        if isinstance(event, Failed):
            c.requests_total["failed"] += 1
            return
        result = event.result
        c.requests_total[result.finish_reason] += 1
        c.prompt_tokens_total += len(result.prompt_token_ids)
        c.generation_tokens_total += len(result.token_ids)
        c.decode_seconds_total += result.timings.decode_s
        if result.timings.decode_tokens_per_s > 0:
            c.last_decode_tokens_per_s = result.timings.decode_tokens_per_s

    def _fail_all(self, why: str) -> None:
        self.crash = why
        print(f"glmchat serve: error: {why}", file=sys.stderr)
        with self._lock:
            jobs = [*self._waiting, *([self._running] if self._running else [])]
            self._waiting.clear()
            self._running = None
        for job in jobs:
            job.done = True
            job.deliver(Failed(id=job.id, error=why))


def _nothing(request: Generate) -> GenerationResult:
    """The result of a request cancelled before it reached the worker."""
    return GenerationResult(text="", token_ids=[], prompt_token_ids=[],
                            finish_reason="cancelled", strategy=request.params.strategy,
                            seed=None, params=request.params, timings=Timings())
