"""The layer streamer: one background reader stages streamed modules in forward order, a
bounded window of slots ahead of compute; the compute thread acquires and releases them."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .backends import Backend, LayerWeights, Staged
from .mapped import OffloadError

WAIT_POLL_S = 0.5


@dataclass
class StreamStats:
    """Counters for the front ends' panel and the bench."""

    streamed_layers: int = 0
    resident_layers: int = 0
    bytes_per_token: int = 0  # bytes of the streamed layers: read once per forward
    slots: int = 0
    layers_streamed: int = 0  # since load
    bytes_streamed: int = 0
    wait_s: float = 0.0  # compute thread waiting for the reader, since load
    max_held: int = 0  # most slots ever held at once (staging + ready + computing)
    resyncs: int = 0
    release_behind: bool = True
    reader: str = "mmap"  # CPU compute: "mmap" (page cache, zero-copy) or "direct" (O_DIRECT)
    extra: dict[str, Any] = field(default_factory=dict)


class LayerStreamer:
    """Stages ``layers`` (in forward order) ahead of compute, at most ``slots`` at a time.

    Positions count layer uses since the start: position p is layer ``layers[p % n]``. The
    compute thread consumes position ``consumed``; the reader stages ``staging_next`` onward.
    """

    def __init__(self, layers: Sequence[LayerWeights], backend: Backend, slots: int) -> None:
        if slots < 1:
            raise ValueError("the streamer needs at least one slot")
        self.layers = list(layers)
        self.position_of = {layer.name: p for p, layer in enumerate(self.layers)}
        self.backend = backend
        self.slots = slots
        self.stats = StreamStats(slots=slots)
        self._cond = threading.Condition()
        self._free = list(range(slots))
        self._ready: dict[int, Staged] = {}
        self._consumed = 0
        self._staging_next = 0
        self._epoch = 0
        self._held = 0
        self._error: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _layer_at(self, position: int) -> LayerWeights:
        return self.layers[position % len(self.layers)]

    # ---- the reader thread

    def _read(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._free:
                    self._cond.wait()
                if self._stopping:
                    return
                position = self._staging_next
                self._staging_next += 1
                slot = self._free.pop()
                self._held += 1
                self.stats.max_held = max(self.stats.max_held, self._held)
                epoch = self._epoch
            try:
                if len(self.layers) > 1:
                    self.backend.hint(self._layer_at(position + 1))
                staged = self.backend.stage(self._layer_at(position), slot)
            except BaseException as exc:
                with self._cond:
                    self._error = exc
                    self._free.append(slot)
                    self._held -= 1
                    self._cond.notify_all()
                return
            with self._cond:
                if epoch == self._epoch and not self._stopping:
                    self._ready[position] = staged
                else:
                    self.backend.discard(staged)
                    self._free.append(slot)
                    self._held -= 1
                self._cond.notify_all()

    def start(self) -> None:
        if self.running:
            return
        self._stopping = False
        self._error = None
        self._thread = threading.Thread(target=self._read, name="glmchat-offload-reader",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the reader; drop what it staged. The next ``acquire`` restarts it."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            self._drop_ready()
            self._staging_next = self._consumed

    def _drop_ready(self) -> None:
        for staged in self._ready.values():
            self.backend.discard(staged)
            self._free.append(staged.slot)
            self._held -= 1
        self._ready.clear()
        self._epoch += 1

    # ---- the compute thread

    def acquire(self, name: str) -> Staged:
        """Module ``name``'s staged weights; waits for the reader if it is behind."""
        t0 = time.perf_counter()
        with self._cond:
            if self._layer_at(self._consumed).name != name:
                # Out of order (a forward was interrupted): restart the cycle at this layer.
                self._drop_ready()
                cycle = self._consumed - self._consumed % len(self.layers)
                self._consumed = cycle + len(self.layers) + self.position_of[name]
                self._staging_next = self._consumed
                self.stats.resyncs += 1
                self._cond.notify_all()
            if not self.running:
                self.start()
            while self._consumed not in self._ready:
                if self._error is not None:
                    error = self._error
                    self._error = None
                    self._thread = None
                    self._drop_ready()
                    self._staging_next = self._consumed
                    if isinstance(error, OffloadError):
                        raise OffloadError(str(error)) from None
                    raise OffloadError(f"streaming {name} failed: "
                                       f"{type(error).__name__}: {error}") from error
                if not self.running:
                    self.start()
                self._cond.wait(WAIT_POLL_S)
            staged = self._ready.pop(self._consumed)
        self.stats.wait_s += time.perf_counter() - t0
        return staged

    def release(self, staged: Staged) -> None:
        self.backend.after_compute(staged)
        with self._cond:
            self._free.append(staged.slot)
            self._held -= 1
            self._consumed += 1
            self.stats.layers_streamed += 1
            self.stats.bytes_streamed += staged.layer.nbytes
            self._cond.notify_all()


