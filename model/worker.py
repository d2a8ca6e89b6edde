"""The worker process: owns torch and the model, serves requests from one Pipe.

A reader thread takes requests off the pipe as they come, so a Cancel lands while a generation
runs (the decode loop polls it between steps). The main thread does the work, one request at a
time, and is the only one that sends events. When the front end goes away (pipe EOF, or the
parent pid changes) the worker exits: no orphans.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from glmchat.errors import GlmchatError, UsageError
from glmchat.protocol import (
    Cancel,
    Event,
    Failed,
    Finished,
    Generate,
    GetStats,
    Load,
    Loaded,
    Ready,
    Request,
    Shutdown,
)

if TYPE_CHECKING:
    from glmchat.model.engine import Engine


def _quiet_libraries() -> None:
    # Before torch loads OpenMP: spinning idle OpenMP workers starve the offload runtime's
    # reader thread on small machines (measured: cold-cache streaming 1.8x faster).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download anything at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # GGUF conversion's bar; LoadProgress says it
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    for name in ("accelerate", "transformers", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _watch_parent(parent_pid: int) -> None:
    """Exit if the front end dies without closing the pipe (e.g. SIGKILL)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


class Worker:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.requests: queue.Queue[Request | None] = queue.Queue()
        self.cancelled: set[str] = set()
        self.shutting_down = threading.Event()
        self._send_lock = threading.Lock()

    def send(self, event: Event) -> None:
        with self._send_lock:
            try:
                self.conn.send(event)
            except (BrokenPipeError, EOFError, OSError):
                os._exit(0)  # the front end is gone

    def read_requests(self) -> None:
        while True:
            try:
                request = self.conn.recv()
            except (EOFError, OSError):
                self.shutting_down.set()
                self.requests.put(None)
                return
            if isinstance(request, Cancel):
                self.cancelled.add(request.id)
            elif isinstance(request, Shutdown):
                self.shutting_down.set()
                self.requests.put(None)
                return
            else:
                self.requests.put(request)

    def serve(self) -> None:
        from glmchat.model.engine import Engine

        engine = Engine(self.send)
        while True:
            request = self.requests.get()
            if request is None or self.shutting_down.is_set():
                return
            if isinstance(request, Load):
                self._handle(None, functools.partial(self._load, engine, request))
            elif isinstance(request, Generate):
                self._handle(request.id, functools.partial(self._generate, engine, request))
            elif isinstance(request, GetStats):
                self.send(engine.memory())

    def _load(self, engine: Engine, request: Load) -> None:
        t0 = time.perf_counter()
        kind, _, value = os.environ.get("GLMCHAT_DEBUG_STALL", "").partition(":")
        if kind == "load":  # the fault injector (see debug_stall): a load that takes S s
            print(f"glmchat debug: the load stalls {value} s", file=sys.stderr, flush=True)
            time.sleep(float(value))
        loaded = engine.load(request.spec)
        self.send(Loaded(info=loaded.info, placement=loaded.placement,
                         load_s=time.perf_counter() - t0))
        self.send(engine.memory())

    def _generate(self, engine: Engine, request: Generate) -> None:
        stall = debug_stall(os.environ.get("GLMCHAT_DEBUG_STALL", ""))
        steps = 0

        def should_stop() -> bool:
            nonlocal steps
            steps += 1
            if stall is not None:
                stall(steps)
            return request.id in self.cancelled or self.shutting_down.is_set()

        result = engine.generate(request, should_stop)
        self.cancelled.discard(request.id)
        self.send(Finished(id=request.id, result=result))

    def _handle(self, gen_id: str | None, work: Callable[[], None]) -> None:
        try:
            work()
        except UsageError as exc:
            self.send(Failed(id=gen_id, error=str(exc), usage=True))
        except GlmchatError as exc:
            self.send(Failed(id=gen_id, error=str(exc)))
        except MemoryError:
            self.send(Failed(id=gen_id, error="out of memory; lower --cpu-memory/--gpu-memory "
                                              "or use a smaller model"))
        except Exception as exc:
            if os.environ.get("GLMCHAT_DEBUG"):
                traceback.print_exc(file=sys.stderr)
            first = str(exc).splitlines()[0] if str(exc) else ""
            self.send(Failed(id=gen_id, error=f"{type(exc).__name__}: {first}"))


def debug_stall(setting: str) -> Callable[[int], None] | None:
    """A fault injector for the tests (tests/faults): GLMCHAT_DEBUG_STALL="slow:S" makes every
    decode step S seconds slower; "hang:N" hangs step N for good, deaf to Cancel and Shutdown,
    as a forward stuck in a kernel would. Empty: None, no cost. ("load:S" stalls the load S
    seconds, Worker._load; "convert:S" a conversion before it is published, atomic_dir.)"""
    kind, _, value = setting.partition(":")
    if kind == "slow":
        delay = float(value)
        return lambda step: time.sleep(delay)
    if kind == "hang":
        at = int(value)

        def hang(step: int) -> None:
            while step >= at:
                time.sleep(3600)

        return hang
    return None


def run_worker(conn: Connection, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C belongs to the front end
    _watch_parent(parent_pid)
    # stdout belongs to the front end (pipe mode prints only the completion there).
    with contextlib.suppress(OSError):
        os.dup2(2, 1)
    sys.stdout = sys.stderr
    _quiet_libraries()
    worker = Worker(conn)
    import platform

    import torch
    import transformers

    worker.send(Ready(pid=os.getpid(), versions={
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__}))
    threading.Thread(target=worker.read_requests, name="requests", daemon=True).start()
    worker.serve()
