"""The TUI's link to its backend (the local worker, glmchat serve or another server): starts it
and loads the model, then reads its events in a thread worker and posts them to the app in
batches. It never touches a widget; the app's
``@on`` handlers own every state change."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from textual.app import App
from textual.message import Message
from textual.worker import get_current_worker

from glmchat import paths
from glmchat.backend import Backend
from glmchat.client import EngineClient
from glmchat.errors import GlmchatError
from glmchat.params import GenerationParams
from glmchat.protocol import ChatMessage, Event, Load, Loaded, ModelSpec, Shutdown

BATCH_MAX = 256  # events per message: a fast stream becomes a few messages per repaint


def worker_log_path() -> str:
    """Where the worker's stderr goes while the TUI owns the terminal: the cache dir's
    worker.log, or nowhere when that cannot be written (a log must not stop the chat)."""
    log = paths.cache_dir() / "worker.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8"):
            pass
    except OSError:
        return os.devnull
    return str(log)


def ensure_resource_tracker(log_path: str) -> None:
    """Start multiprocessing's resource tracker with a real file as its stderr. It hands
    ``sys.stderr.fileno()`` to the child, and under Textual ``sys.stderr`` is a capture object
    without a usable descriptor, which makes every spawn fail."""
    from multiprocessing import resource_tracker

    with open(log_path, "a", encoding="utf-8") as log:
        saved, sys.stderr = sys.stderr, log
        try:
            resource_tracker.ensure_running()
        finally:
            sys.stderr = saved


class EngineLink:
    """Owns (or borrows) a Backend for an app. ``start`` runs in a thread worker: start the
    backend if needed, load the model if needed, then read until it dies or the app stops the
    link. ``factory`` makes the owned backend (default: a local worker)."""

    @dataclass
    class EventsReceived(Message):
        events: list[Event]

    @dataclass
    class WorkerDied(Message):
        cause: str

    def __init__(self, app: App[int], spec: ModelSpec, client: Backend | None = None,
                 factory: Callable[[], Backend] | None = None):
        self.app = app
        self.spec = spec
        self.owned = client is None
        self.client: Backend = client if client is not None else (
            factory() if factory is not None else EngineClient(worker_log_path()))
        self._stop = threading.Event()

    @property
    def pid(self) -> int | None:
        return self.client.pid

    def start(self, restart: bool = False) -> None:
        """Read events from now on; ``restart``: first replace the worker with a fresh one."""
        self._stop.set()  # a reader still running from before ends within one poll
        stop = self._stop = threading.Event()
        self.app.run_worker(lambda: self._run(stop, restart), thread=True, group="engine",
                            exclusive=True, name="engine-reader", exit_on_error=False)

    def _run(self, stop: threading.Event, restart: bool) -> None:
        # This thread spawns the worker and lives as long as it does: the worker's parent-death
        # signal (PR_SET_PDEATHSIG) fires when the thread that spawned it ends.
        worker = get_current_worker()
        try:
            ensure_resource_tracker(getattr(self.client, "stderr_path", None)
                                    or worker_log_path())
            if restart:
                self.client.restart()
            elif not self.client.alive:
                self.client.start()
            loaded = self.client.loaded
            drawn: Loaded | None = None  # posted here already: not again from the events
            if loaded is None or (loaded.info.source != self.spec.path
                                  and not loaded.info.backend):
                self.client.send(Load(self.spec))
                if self.client.loaded is not None and self.client.loaded is not loaded:
                    # A backend that loads synchronously and keeps Loaded out of its events.
                    drawn = self.client.loaded
                    self.app.post_message(self.EventsReceived([drawn]))
            else:
                # A borrowed client that already holds the model (tests, a restarted app).
                self.app.post_message(self.EventsReceived([loaded]))
                self.client.request_stats()
            while not stop.is_set() and not worker.is_cancelled:
                event = self.client.recv(timeout=0.25)
                if event is None:
                    continue
                batch = [event]
                while len(batch) < BATCH_MAX:
                    more = self.client.recv(timeout=0)
                    if more is None:
                        break
                    batch.append(more)
                if drawn is not None and drawn in batch:
                    batch.remove(drawn)
                    drawn = None
                if batch:
                    self.app.post_message(self.EventsReceived(batch))
        except GlmchatError as exc:
            if not stop.is_set():
                self.app.post_message(self.WorkerDied(str(exc)))
        except Exception as exc:  # the reader must report, never vanish
            if not stop.is_set():
                self.app.post_message(self.WorkerDied(f"{type(exc).__name__}: {exc}"))

    # ---- requests (from the app's thread; a Backend's send is thread-safe) ---------------------

    def generate(self, params: GenerationParams, messages: list[ChatMessage], prompt: str,
                 raw: bool) -> str:
        return self.client.generate(params, messages=messages, prompt=prompt, raw=raw)

    def cancel(self, gen_id: str) -> None:
        with contextlib.suppress(GlmchatError):
            self.client.cancel(gen_id)

    def request_stats(self) -> None:
        with contextlib.suppress(GlmchatError):
            self.client.request_stats()

    def stop_reading(self) -> None:
        self._stop.set()

    def shutdown_soon(self) -> None:
        """Stop reading and, if the app owns the worker, ask it to shut down; never blocks, so
        the app can give the terminal back at once (``close`` then reaps the worker)."""
        self._stop.set()
        if self.owned and self.client.alive:
            with contextlib.suppress(GlmchatError):
                self.client.send(Shutdown())

    def close(self, timeout: float = 3.0) -> None:
        """Stop reading and, if the app owns the worker, shut it down: ``timeout`` seconds to
        go by itself, then it is terminated."""
        self._stop.set()
        if self.owned:
            self.client.close(timeout=timeout)

