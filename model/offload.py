"""The glmchat offload runtime: modules that do not fit stream in one whole decoder layer (or
head, or embedding table) at a time, staged ahead of compute by a background reader.

How a model is laid out after ``load_offloaded``:

- **resident** modules own their weights in memory (CPU RAM, or the GPU);
- **streamed** modules are ``StreamedModule``s: outside their turn their parameters are on the
  meta device; ``StreamedModule.forward`` takes the module's staged weights from the
  ``LayerStreamer``, binds them, runs the module, and hands the slot back. On the CPU the
  staged weights are views of the mapped checkpoint (**mapped**); on a GPU, of a slot buffer.

The reader thread walks the streamed modules in forward order, cyclically (after the head of
one token comes the first streamed layer of the next), holding at most ``slots`` of them —
staged, ready, or being computed. What "staging" means is the backend's business:

- ``MappedBackend`` (compute on the CPU, ``reader="mmap"``, for weights that fit in the page
  cache): advise the kernel and fault the module's pages of the model's own safetensors files
  into our mapping; the weights *are* the mapping, no copy. Layers still mapped and cached are
  not faulted again. When the files could not stay cached, pages are unmapped after compute.
- ``DirectBackend`` (compute on the CPU, ``reader="direct"``, for weights that do not fit): one
  O_DIRECT ``pread`` per contiguous range of the layer into ``slots`` preallocated, huge-page
  backed slot buffers; the weights are views of the slot. No page cache, faults or copies.
- ``CudaBackend`` (compute on a GPU): copy the layer into one of ``slots`` preallocated GPU
  buffers on a side stream, from host memory pinned once at load (CPU tier) or through a pinned
  staging buffer filled from the mapping (disk tier); events order the copy before compute and
  compute before the slot is refilled. Resident layers are spread evenly through the depth.

If a forward runs modules out of the expected order (an exception mid-forward, a cancel), the
streamer drops what it staged and restarts at the module asked for.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch
from torch import nn

from .mapped import (
    MappedCheckpoint,
    MappedFile,
    OffloadError,
    TensorLocation,
    merged_ranges,
    read_buffer,
)

# Device-map tiers whose layers the runtime streams, per compute device type.
STREAMED_TIERS = {"cpu": ("disk",), "cuda": ("cpu", "disk")}
WAIT_POLL_S = 0.5
GPU_ALIGN = 256
DIRECT_ALIGN = 4096  # O_DIRECT: offsets, lengths and buffers aligned to this
O_DIRECT = getattr(os, "O_DIRECT", 0)
READERS = ("auto", "mmap", "direct")
PAGE = mmap.PAGESIZE


@dataclass
class LayerWeights:
    """Where one streamed module's weights come from (a decoder layer, or the head...)."""

    name: str  # module name in the model ("model.layers.3", "lm_head")
    tier: str  # "disk" | "cpu"
    names: list[str]  # parameter names inside the module ("mlp.up_proj.weight")
    locations: list[TensorLocation]  # same order as names
    nbytes: int  # bytes streamed per forward (stored dtype)
    ranges: list[tuple[MappedFile, int, int]]
    pinned: torch.Tensor | None = None  # CUDA, CPU tier: the layer, pinned once, compute dtype


@dataclass
class Staged:
    """One layer's weights, ready to bind; ``slot`` is what the streamer hands back."""

    layer: LayerWeights
    slot: int
    tensors: dict[str, torch.Tensor]
    ready: Any = None  # CUDA: event recorded after the copy


class Backend(Protocol):
    def hint(self, layer: LayerWeights) -> None: ...
    def stage(self, layer: LayerWeights, slot: int) -> Staged: ...
    def before_compute(self, staged: Staged) -> None: ...
    def after_compute(self, staged: Staged) -> None: ...
    def discard(self, staged: Staged) -> None: ...
    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# backends


class MappedBackend:
    """CPU compute: the mapping is the buffer; staging = getting its pages into our page table."""

    def __init__(self, dtype: torch.dtype, release_behind: bool = True) -> None:
        self.dtype = dtype
        self.release_behind = release_behind
        # Layers whose pages we faulted in and have not dropped since. While the page cache
        # still holds them, our page tables do too: staging them again is free. (Populating
        # a mapped 88 MB layer again costs ~3.5 ms of CPU, a core the matmuls want.)
        self.mapped: set[str] = set()

    def hint(self, layer: LayerWeights) -> None:
        """The module after the one being staged: start its disk reads now, asynchronously,
        so the disk always has the next layer queued."""
        if layer.name in self.mapped and _all_cached(layer):
            return
        for mapped, start, end in layer.ranges:
            mapped.will_need(start, end)

    def stage(self, layer: LayerWeights, slot: int) -> Staged:
        for mapped, _start, _end in layer.ranges:
            mapped.check_intact()
        if layer.name not in self.mapped or not _all_cached(layer):
            for mapped, start, end in layer.ranges:
                mapped.will_need(start, end)
            for mapped, start, end in layer.ranges:
                mapped.populate(start, end)
            if not self.release_behind:
                self.mapped.add(layer.name)
        tensors = {}
        for name, location in zip(layer.names, layer.locations, strict=True):
            view = location.file.view(location)
            # Same dtype as stored: zero-copy. Otherwise converted here, off the compute thread.
            tensors[name] = view if view.dtype == self.dtype else view.to(self.dtype)
        return Staged(layer, slot, tensors)

    def before_compute(self, staged: Staged) -> None:
        pass

    def after_compute(self, staged: Staged) -> None:
        self._unmap(staged)

    def discard(self, staged: Staged) -> None:
        self._unmap(staged)

    def close(self) -> None:
        pass

    def _unmap(self, staged: Staged) -> None:
        if self.release_behind:
            for mapped, start, end in staged.layer.ranges:
                mapped.drop(start, end)

    def forget(self) -> None:
        """Everything was unmapped behind our back (``OffloadRuntime.evict``)."""
        self.mapped.clear()


class DirectBackend:
    """CPU compute, for weights that do not stay in the page cache: ``slots`` anonymous slot
    buffers, allocated and faulted in once, each filled with one ``pread`` per contiguous byte
    range of the layer (a layer is one or two ranges), through a descriptor opened with
    ``O_DIRECT``. The disk DMAs straight into the slot: no page cache to fill and evict, no page
    faults, no copy, and one large request per range keeps the device's queue deep. Where the
    filesystem refuses O_DIRECT (tmpfs) the same reads go through the page cache."""

    def __init__(self, layers: Sequence[LayerWeights], slots: int, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.plans: dict[str, list[tuple[MappedFile, int, int, int]]] = {}
        slot_bytes = PAGE
        for layer in layers:
            plan, size = _read_plan(layer)
            self.plans[layer.name] = plan
            slot_bytes = max(slot_bytes, size)
        self.slot_bytes = slot_bytes
        self._maps = [read_buffer(slot_bytes) for _ in range(slots)]
        self.buffers = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self._direct_fds: dict[Path, int] = {}
        self.buffered_fallback = False

    def _fd(self, mapped: MappedFile) -> int:
        fd = self._direct_fds.get(mapped.path)
        if fd is None:
            try:
                fd = os.open(mapped.path, os.O_RDONLY | O_DIRECT)
            except OSError:  # EINVAL: no O_DIRECT on this filesystem
                fd = -1
                self.buffered_fallback = True
            self._direct_fds[mapped.path] = fd
        return fd if fd >= 0 else mapped.fd

    def hint(self, layer: LayerWeights) -> None:
        pass  # reads are synchronous and large: the device queue is never empty while one runs

    def stage(self, layer: LayerWeights, slot: int) -> Staged:
        plan = self.plans[layer.name]
        for mapped, _start, _end, _at in plan:
            mapped.check_intact()
        view = memoryview(self._maps[slot])
        for mapped, start, end, at in plan:
            self._read(mapped, view[at:at + end - start], start, end)
        buffer = self.buffers[slot]
        tensors = {}
        for name, location in zip(layer.names, layer.locations, strict=True):
            at = next(at + location.start - start for mapped, start, end, at in plan
                      if mapped is location.file and start <= location.start < end)
            flat = buffer[at:at + location.nbytes].view(location.dtype).view(location.shape)
            # Same dtype as stored: computed from the slot. Otherwise converted here.
            tensors[name] = flat if flat.dtype == self.dtype else flat.to(self.dtype)
        return Staged(layer, slot, tensors)

    def _read(self, mapped: MappedFile, target: memoryview, start: int, end: int) -> None:
        offset = start
        while offset < end:
            fd = self._fd(mapped)
            try:
                n = os.preadv(fd, [target[offset - start:]], offset)
            except OSError as exc:
                if exc.errno == errno.EINVAL and fd != mapped.fd:
                    # The filesystem took O_DIRECT at open but not for this read.
                    os.close(fd)
                    self._direct_fds[mapped.path] = -1
                    self.buffered_fallback = True
                    continue
                raise OffloadError(f"{mapped.path}: reading bytes {offset}-{end} failed "
                                   f"({exc.strerror}); check the disk and reload") from None
            if n <= 0:
                if offset >= mapped.needed:
                    return  # the aligned tail ran past the end of the file: nothing needed
                raise OffloadError(f"{mapped.path} ends at byte {offset}, before the layer's "
                                   "weights do: the file was truncated; restore it and reload")
            offset += n

    def before_compute(self, staged: Staged) -> None:
        pass

    def after_compute(self, staged: Staged) -> None:
        pass

    def discard(self, staged: Staged) -> None:
        pass

    def close(self) -> None:
        for fd in self._direct_fds.values():
            if fd >= 0:
                os.close(fd)
        self._direct_fds.clear()


def _read_plan(layer: LayerWeights) -> tuple[list[tuple[MappedFile, int, int, int]], int]:
    """Where each of the layer's byte ranges lands in a slot buffer, widened to O_DIRECT's
    alignment: (file, start, end, offset in the slot), and the slot bytes needed."""
    plan = []
    cursor = 0
    for mapped, start, end in layer.ranges:
        start -= start % DIRECT_ALIGN
        end += -end % DIRECT_ALIGN
        plan.append((mapped, start, end, cursor))
        cursor += end - start
    return plan, cursor


def _all_cached(layer: LayerWeights) -> bool:
    return all(mapped.cached(start, end) for mapped, start, end in layer.ranges)


class CudaBackend:
    """GPU compute: ``slots`` flat GPU buffers, filled on a side stream."""

    def __init__(self, layers: Sequence[LayerWeights], slots: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.offsets: dict[str, list[int]] = {}
        slot_bytes = 0
        for layer in layers:
            offsets, size = _packed_offsets(layer, dtype)
            self.offsets[layer.name] = offsets
            slot_bytes = max(slot_bytes, size)
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, device=device)
                        for _ in range(slots)]
        self.staging = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True)
                        for _ in range(slots)]
        self.copy_stream = torch.cuda.Stream(device=device)
        self.copied = [torch.cuda.Event() for _ in range(slots)]
        self.computed = [torch.cuda.Event() for _ in range(slots)]
        for event in self.computed:
            event.record(torch.cuda.current_stream(device))

    def hint(self, layer: LayerWeights) -> None:
        if layer.pinned is None:
            for mapped, start, end in layer.ranges:
                mapped.will_need(start, end)

    def stage(self, layer: LayerWeights, slot: int) -> Staged:
        offsets = self.offsets[layer.name]
        if layer.pinned is not None:
            source = layer.pinned
        else:
            for mapped, _start, _end in layer.ranges:
                mapped.check_intact()
            for mapped, start, end in layer.ranges:
                mapped.will_need(start, end)
            staging = self.staging[slot]
            self.copied[slot].synchronize()  # the last copy out of this staging buffer is done
            for location, offset in zip(layer.locations, offsets, strict=True):
                count = _numel(location.shape)
                target = staging[offset:offset + count * _itemsize(self.dtype)]
                target.view(self.dtype).copy_(location.file.view(location).reshape(-1))
            source = staging
        size = offsets[-1] + _numel(layer.locations[-1].shape) * _itemsize(self.dtype)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.computed[slot])  # the slot's last layer is done
            self.buffers[slot][:size].copy_(source[:size], non_blocking=True)
            self.copied[slot].record(self.copy_stream)
        tensors = {}
        for name, location, offset in zip(layer.names, layer.locations, offsets, strict=True):
            count = _numel(location.shape)
            flat = self.buffers[slot][offset:offset + count * _itemsize(self.dtype)]
            tensors[name] = flat.view(self.dtype).view(location.shape)
        return Staged(layer, slot, tensors, ready=self.copied[slot])

    def before_compute(self, staged: Staged) -> None:
        torch.cuda.current_stream(self.device).wait_event(staged.ready)

    def after_compute(self, staged: Staged) -> None:
        self.computed[staged.slot].record(torch.cuda.current_stream(self.device))

    def discard(self, staged: Staged) -> None:
        pass  # the slot's computed event is still the last use: refilling it stays ordered

    def close(self) -> None:
        pass


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _packed_offsets(layer: LayerWeights, dtype: torch.dtype) -> tuple[list[int], int]:
    """Byte offsets of each tensor in a flat slot buffer (aligned), and the slot size."""
    offsets = []
    cursor = 0
    for location in layer.locations:
        offsets.append(cursor)
        cursor += _numel(location.shape) * _itemsize(dtype)
        cursor += -cursor % GPU_ALIGN
    return offsets, cursor


# ---------------------------------------------------------------------------------------------
# the streamer: one background reader, a bounded window of staged layers


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


# ---------------------------------------------------------------------------------------------
# the model side: layers whose forward streams


class StreamedModule(nn.Module):
    """A module (a decoder layer, the head) whose weights are streamed: this forward is where
    it happens.

    It shares the wrapped module's parameter and submodule tables, so parameter names (and the
    state dict) are the checkpoint's; outside ``forward`` those parameters are on meta.
    """

    def __init__(self, layer: nn.Module, weights: LayerWeights, streamer: LayerStreamer) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        self._modules = layer._modules
        self._parameters = layer._parameters
        self._buffers = layer._buffers
        self.weights = weights
        self.streamer = streamer
        self._slots: list[tuple[nn.Module, str, nn.Parameter]] = []
        for name in weights.names:
            owner_name, _, attr = name.rpartition(".")
            owner = layer.get_submodule(owner_name)
            self._slots.append((owner, attr, owner._parameters[attr]))  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def extra_repr(self) -> str:
        return f"streamed from {self.weights.tier}"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        staged = self.streamer.acquire(self.weights.name)
        try:
            self.streamer.backend.before_compute(staged)
            for (owner, attr, _meta), name in zip(self._slots, self.weights.names, strict=True):
                owner._parameters[attr] = nn.Parameter(staged.tensors[name], requires_grad=False)
            return self._layer(*args, **kwargs)
        finally:
            for owner, attr, meta in self._slots:
                owner._parameters[attr] = meta
            self.streamer.release(staged)


@dataclass
class OffloadRuntime:
    """What the engine and the bench hold on to: the streamer, the mapping, the plan."""

    streamer: LayerStreamer
    checkpoint: MappedCheckpoint
    device: torch.device
    device_map: dict[str, str]  # module → "cuda:0" | "cpu" | "disk", as the runtime placed it

    @property
    def stats(self) -> StreamStats:
        return self.streamer.stats

    def live_stats(self, step_s: float) -> dict[str, Any]:
        """The memory panel's numbers for one decode step of ``step_s`` seconds."""
        s = self.stats
        return {
            "offload_runtime": "glmchat",
            "resident_layers": s.resident_layers, "streamed_layers": s.streamed_layers,
            "bytes_streamed_per_token": s.bytes_per_token,
            "stream_gb_per_s": (s.bytes_per_token / step_s / 1e9) if step_s > 0 else 0.0,
            "reader_wait_s": round(s.wait_s, 4), "slots": s.slots,
            "release_behind": s.release_behind, "reader": s.reader,
        }

    def idle(self) -> None:
        """Between generations: no reader thread, nothing staged."""
        self.streamer.stop()

    def evict(self) -> None:
        """Unmap every streamed page and drop the files from the page cache (the bench's cold
        regime: pages still mapped would survive posix_fadvise(DONTNEED))."""
        self.streamer.stop()
        if isinstance(self.streamer.backend, MappedBackend):
            self.streamer.backend.forget()
        for mapped in self.checkpoint.files:
            mapped.drop(0, mapped.size)
            mapped.evict()

    def weight_files(self) -> list[Path]:
        return [mapped.path for mapped in self.checkpoint.files]

    def close(self) -> None:
        self.streamer.stop()
        self.streamer.backend.close()
        self.checkpoint.close()


# ---------------------------------------------------------------------------------------------
# loading


def compute_device(device_map: dict[str, str]) -> torch.device:
    """The GPU when the placement uses one, else the CPU."""
    gpus = sorted(tier for tier in device_map.values() if tier.startswith("cuda"))
    return torch.device(gpus[0]) if gpus else torch.device("cpu")


def streams_layers(device_map: dict[str, str] | None) -> bool:
    """Whether the placement leaves layers for the runtime to stream."""
    if device_map is None:
        return False
    device = compute_device(device_map)
    return any(tier in STREAMED_TIERS[device.type] for tier in device_map.values())


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder layer list and its name (``model.layers``): the longest ModuleList."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise OffloadError(f"{type(model).__name__} has no list of decoder layers to stream; "
                           "use --offload-runtime accelerate")
    return best


def module_tier(name: str, device_map: dict[str, str]) -> str:
    while name not in device_map:
        if "." not in name:
            return device_map.get("", "cpu")
        name = name.rsplit(".", 1)[0]
    return device_map[name]


def _set_tensor(model: nn.Module, aliases: dict[str, list[str]], name: str,
                tensor: torch.Tensor) -> None:
    """Set parameter (or buffer) ``name`` and every name tied to it."""
    for alias in aliases.get(name, [name]):
        owner_name, _, attr = alias.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[attr] = tensor


def even_spread(n_layers: int, n_resident: int) -> list[int]:
    """``n_resident`` layer numbers spread evenly through ``n_layers`` (BMInf's layout): each
    streamed layer's copy then hides behind the resident layers computing before it."""
    if n_resident <= 0:
        return []
    if n_resident >= n_layers:
        return list(range(n_layers))
    return sorted({int((k + 0.5) * n_layers / n_resident) for k in range(n_resident)})


def load_offloaded(meta_model: nn.Module, weights_dir: Path, device_map: dict[str, str],
                   dtype: torch.dtype, device: torch.device, *, prefetch: int = 1,
                   release_behind: bool | None = None, reader: str = "auto") -> OffloadRuntime:
    """Fill ``meta_model`` (built under ``init_empty_weights``) from the mapped checkpoint:
    resident modules get their own copy on ``device``, streamed layers become StreamedModules.

    ``device_map`` is the placement's (module → "cuda:0" | "cpu" | "disk"). On a GPU, the
    number of GPU layers is kept but they are spread evenly through the depth, ``prefetch + 1``
    slots are carved out of the GPU share, and the non-layer modules always live on the GPU.

    ``reader`` (CPU compute): "mmap" computes from the mapped files through the page cache;
    "direct" reads each layer with O_DIRECT into slot buffers; "auto" picks "direct" when the
    weight files could not stay in the page cache anyway (more than half the available RAM).
    """
    if reader not in READERS:
        raise ValueError(f"reader must be one of {', '.join(READERS)}, not {reader!r}")
    checkpoint = MappedCheckpoint.open(weights_dir)
    try:
        return _load(meta_model, checkpoint, device_map, dtype, device, prefetch, release_behind,
                     reader)
    except BaseException:
        checkpoint.close()
        raise


def _cacheable(file_bytes: int, available: int) -> bool:
    """Whether the weight files can stay in the page cache between tokens."""
    return file_bytes <= available // 2


def pick_reader(reader: str, file_bytes: int, available: int, on_gpu: bool) -> str:
    """The reader ``reader`` ("auto" | "mmap" | "direct") means for weight files of
    ``file_bytes`` with ``available`` bytes of RAM: auto reads directly when the files could not
    stay in the page cache anyway (every token reads them from disk then), else computes from
    the page cache. With GPU compute, disk-tier layers reach the GPU's staging buffers through
    the mapping."""
    if on_gpu:
        return "mmap"
    if reader == "auto":
        return "mmap" if _cacheable(file_bytes, available) else "direct"
    return reader


def _load(model: nn.Module, checkpoint: MappedCheckpoint, device_map: dict[str, str],
          dtype: torch.dtype, device: torch.device, prefetch: int,
          release_behind: bool | None, reader: str) -> OffloadRuntime:
    layers_name, layer_list = decoder_layers(model)
    n_layers = len(layer_list)
    on_gpu = device.type == "cuda"
    slots = prefetch + 1
    prefix = f"{layers_name}."
    file_bytes = sum(f.size for f in checkpoint.files)
    available = psutil.virtual_memory().available
    if release_behind is None:
        # Unmapping after use costs a page fault per page on the next token. Worth it only
        # when the streamed weights could not stay in the page cache anyway.
        release_behind = not _cacheable(file_bytes, available)
    reader = pick_reader(reader, file_bytes, available, on_gpu)

    # The units that stream: whole decoder layers, and on the CPU the other modules holding
    # weights (embeddings, final norm, head) where the placement put them on disk. Forward order.
    layer_names = [f"{layers_name}.{i}" for i in range(n_layers)]
    others = [name for name, module in model.named_modules()
              if module._parameters and not name.startswith(prefix)]
    tiers = {name: module_tier(name, device_map) for name in layer_names}
    embeddings: set[str] = set()
    if on_gpu:
        # Keep the placement's share of GPU layers, less the slots, spread through the depth;
        # the others stream: from pinned RAM (as many as the CPU tier held), then from disk.
        # Embeddings and head always live on the GPU.
        n_gpu = sum(tier.startswith("cuda") for tier in tiers.values())
        n_disk = sum(tier == "disk" for tier in tiers.values())
        resident = set(even_spread(n_layers, n_gpu - slots))
        moving = [name for i, name in enumerate(layer_names) if i not in resident]
        n_pinned = len(moving) - n_disk
        tiers = {name: str(device) for name in [*layer_names, *others]}
        tiers.update({name: "cpu" if k < n_pinned else "disk" for k, name in enumerate(moving)})
        unit_order = moving
    else:
        tiers.update({name: module_tier(name, device_map) for name in others})
        unit_order = [name for name, _ in model.named_modules()
                      if name in tiers and tiers[name] == "disk"]
        # An embedding table on disk is not streamed: a lookup needs a few rows, so it is
        # bound to the mapping once and the page cache serves just those rows (for GLM-130B's
        # 150k x 12288 table that is 3.8 GB a token not read).
        embeddings = {name for name, module in model.named_modules()
                      if name in unit_order and isinstance(module, nn.Embedding)
                      and _stored_dtype(checkpoint, f"{name}.weight") == dtype}
        unit_order = [name for name in unit_order if name not in embeddings]

    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()  # tied names (lm_head → embed_tokens) become one parameter, loaded once
    aliases: dict[str, list[str]] = {}
    by_id: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = by_id.setdefault(id(param), name)
        aliases.setdefault(first, []).append(name)
    wanted = list(aliases) + [n for n, _ in model.named_buffers() if n in checkpoint.locations]

    def unit_of(name: str) -> str | None:
        return next((u for u in unit_order if name.startswith(u + ".")), None)

    per_unit: dict[str, list[tuple[str, TensorLocation]]] = {u: [] for u in unit_order}
    for name in wanted:
        key = next((a for a in aliases.get(name, [name]) if a in checkpoint.locations), None)
        if key is None:
            raise OffloadError(f"the checkpoint has no tensor {name}; the glmchat offload "
                               "runtime loads checkpoints whose names match the model's — use "
                               "--offload-runtime accelerate")
        location = checkpoint.locations[key]
        kept: list[str] = []
        mapped: list[str] = []
        for alias in aliases.get(name, [name]):
            unit = unit_of(alias)
            if unit is not None:
                per_unit[unit].append((alias[len(unit) + 1:], location))
            elif alias.rpartition(".")[0] in embeddings:
                mapped.append(alias)
            else:
                kept.append(alias)
        if mapped:
            _set_tensor(model, {name: mapped}, name, checkpoint.view(key))
        if kept:
            view = checkpoint.view(key)
            owned = torch.empty(view.shape, dtype=dtype if view.is_floating_point()
                                else view.dtype, device=device)
            _set_tensor(model, {name: kept}, name, owned.copy_(view))

    units = []
    for unit in unit_order:
        names = [n for n, _ in per_unit[unit]]
        locations = [loc for _, loc in per_unit[unit]]
        units.append(LayerWeights(unit, tiers[unit], names, locations,
                                  nbytes=sum(loc.nbytes for loc in locations),
                                  ranges=merged_ranges(locations)))
    backend: Backend
    if on_gpu:
        for weights in units:
            if weights.tier == "cpu":
                weights.pinned = _pin_layer(weights, dtype)
        backend = CudaBackend(units, slots, device, dtype)
    elif reader == "direct":
        backend = DirectBackend(units, slots, dtype)
    else:
        backend = MappedBackend(dtype, release_behind)
    streamer = LayerStreamer(units, backend, slots)
    for weights in units:
        parent_name, _, attr = weights.name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, StreamedModule(parent.get_submodule(attr), weights, streamer))
    for buffer_owner in model.modules():
        for attr, buffer in list(buffer_owner._buffers.items()):
            if buffer is not None and buffer.device != device and buffer.device.type != "meta":
                buffer_owner._buffers[attr] = buffer.to(device)
    streamed_layers = sum(1 for u in units if u.name.startswith(prefix))
    streamer.stats.streamed_layers = streamed_layers
    streamer.stats.resident_layers = n_layers - streamed_layers
    streamer.stats.bytes_per_token = sum(u.nbytes for u in units)
    streamer.stats.release_behind = release_behind and reader == "mmap"
    streamer.stats.reader = reader
    return OffloadRuntime(streamer, checkpoint, device, tiers)


def _stored_dtype(checkpoint: MappedCheckpoint, key: str) -> torch.dtype | None:
    location = checkpoint.locations.get(key)
    return location.dtype if location is not None else None


def _pin_layer(layer: LayerWeights, dtype: torch.dtype) -> torch.Tensor:
    """The layer packed as in a GPU slot, in page-locked host memory: pinned once, at load."""
    offsets, size = _packed_offsets(layer, dtype)
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    for location, offset in zip(layer.locations, offsets, strict=True):
        count = _numel(location.shape)
        target = pinned[offset:offset + count * _itemsize(dtype)].view(dtype)
        target.copy_(location.file.view(location).reshape(-1))
    return pinned
