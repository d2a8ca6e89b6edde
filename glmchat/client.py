"""EngineClient: the front ends' handle on the worker process. Imports no torch.

The worker is a ``spawn``ed process that owns the model; requests and events travel as pickled
dataclasses (glmchat.protocol) over one Pipe. A dead worker (killed, out of memory, crashed)
shows up as WorkerCrashed from ``recv`` with the cause; ``restart`` starts a fresh one.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

from glmchat.conveniences import EventConveniences
from glmchat.errors import GlmchatError, WorkerCrashed
from glmchat.protocol import (
    Event,
    Finished,
    Loaded,
    Ready,
    Request,
    Shutdown,
)


def _worker_entry(conn: Connection, parent_pid: int, stderr_path: str | None = None) -> None:
    if stderr_path is not None:
        # A full-screen front end owns the terminal: the worker's warnings and progress bars
        # go to a log file instead of over the screen.
        log = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 2)
        os.close(log)
    # Imported here so that only the child process pays for torch.
    from glmchat.model.worker import run_worker

    run_worker(conn, parent_pid)


_held = 0  # how deep the main thread is in signals_held blocks
_pending: list[tuple[Callable[[int, Any], Any], int]] = []


def deferred(handler: Callable[[int, Any], Any]) -> Callable[[int, Any], Any]:
    """``handler`` (Ctrl+C's, our SIGTERM's: both raise KeyboardInterrupt), made to wait while
    a message crosses the worker pipe. Installed once by the CLI. A handler that raised between
    a message's length header and its body would leave half a message behind, and the next
    read (the partial reply a cancel asks for) would fail."""

    def run_or_defer(signum: int, frame: Any) -> Any:
        if _held:
            _pending.append((handler, signum))
            return None
        return handler(signum, frame)

    return run_or_defer


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """A block in which the ``deferred`` handlers wait; the first signal that came runs as the
    block ends, when the message is whole. Python runs signal handlers only in the main
    thread, so other threads need nothing."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending:
            handler, signum = _pending[0]
            _pending.clear()
            handler(signum, None)


def describe_exit(exitcode: int | None) -> str:
    """A readable cause for a worker's exit code."""
    if exitcode is None:
        return "the worker stopped answering"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return f"the worker was killed ({name}); the system may have run out of memory"
        return f"the worker was killed by {name}"
    return f"the worker exited with code {exitcode}"


class EngineClient(EventConveniences):
    """Start, talk to and stop one worker process. ``send`` is thread-safe; ``recv`` belongs to
    one reader thread at a time. ``stderr_path``: where the worker's stderr goes (default: the
    front end's own stderr)."""

    def __init__(self, stderr_path: str | None = None) -> None:
        self.stderr_path = stderr_path
        self._ctx = mp.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self.ready: Ready | None = None
        self.loaded: Loaded | None = None
        self.crash: str | None = None

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the worker. Call it from a thread that outlives the worker (the main thread,
        or the reader thread that owns it): Linux delivers the worker's parent-death signal
        when the *thread* that forked it ends."""
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        self._process = self._ctx.Process(
            target=_worker_entry, args=(child_conn, os.getpid(), self.stderr_path),
            name="glmchat-worker", daemon=True)
        self._process.start()
        child_conn.close()
        self._conn = parent_conn
        self.crash = None
        self.loaded = None

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def close(self, timeout: float = 5.0) -> None:
        """Ask the worker to shut down; terminate, then kill it if it does not."""
        if self._process is None:
            return
        try:
            if self._process.is_alive():
                self.send(Shutdown())
        except GlmchatError:
            pass
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(2.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(2.0)
        if self._conn is not None:
            self._conn.close()
        self._process = None
        self._conn = None

    def restart(self) -> None:
        self.close(timeout=2.0)
        self.start()

    def __enter__(self) -> EngineClient:
        if self._process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- messages ------------------------------------------------------------------------------

    def send(self, request: Request) -> None:
        if self._conn is None:
            raise WorkerCrashed("the worker is not running; start it again")
        try:
            with self._send_lock, signals_held():
                self._conn.send(request)
        except (BrokenPipeError, EOFError, OSError):
            raise self._crashed() from None

    def recv(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after ``timeout`` seconds. Raises WorkerCrashed."""
        if self._conn is None:
            raise WorkerCrashed(self.crash or "the worker is not running; start it again")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
            try:
                if self._conn.poll(wait):
                    with signals_held():
                        event: Event = self._conn.recv()
                        if isinstance(event, Ready):
                            self.ready = event
                        elif isinstance(event, Loaded):
                            self.loaded = event
                        elif isinstance(event, Finished):
                            self.keep_finished(event)
                    return event
            except (EOFError, OSError):
                raise self._crashed() from None
            if not self.alive:
                # Drain what the worker sent before dying, then report the death.
                try:
                    if self._conn.poll(0):
                        with signals_held():
                            dying_words: Event = self._conn.recv()
                        return dying_words
                except (EOFError, OSError):
                    pass
                raise self._crashed()
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def _crashed(self) -> WorkerCrashed:
        exitcode = None
        if self._process is not None:
            self._process.join(1.0)
            exitcode = self._process.exitcode
        self.crash = describe_exit(exitcode)
        return WorkerCrashed(self.crash)

    # ---- conveniences ----------------------------------------------------------------------------

    def new_id(self) -> str:
        return f"g{next(self._ids)}"
