"""How a streamed module's weights get where compute reads them ("staging"), per compute
device and reader; the streamer (``streamer.py``) decides when, these decide how.

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
  compute before the slot is refilled.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from .mapped import MappedFile, OffloadError, TensorLocation, read_buffer, read_range

GPU_ALIGN = 256
DIRECT_ALIGN = max(4096, mmap.PAGESIZE)  # O_DIRECT: offsets, lengths, buffers aligned to this
O_DIRECT = getattr(os, "O_DIRECT", 0)
PAGE = mmap.PAGESIZE
# Quantized layers (model/qlinear.py): their scales stay in the dtype the kernel takes.
STORED_DTYPE_SUFFIXES = ("weight_scale", "weight_zero", "weight_scale_zeros")


def compute_as(name: str, stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype tensor ``name`` (stored as ``stored``) is computed in, for compute ``dtype``:
    floating weights in the compute dtype, integer (quantized) weights and their scales as
    stored."""
    if not stored.is_floating_point or name.endswith(STORED_DTYPE_SUFFIXES):
        return stored
    return dtype


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
            want = compute_as(name, view.dtype, self.dtype)
            tensors[name] = view if view.dtype == want else view.to(want)
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
        self.tensor_offsets: dict[str, list[int]] = {}  # where each tensor lands in a slot
        slot_bytes = PAGE
        for layer in layers:
            plan, size = _read_plan(layer)
            self.plans[layer.name] = plan
            self.tensor_offsets[layer.name] = [
                next(at + location.start - start for mapped, start, end, at in plan
                     if mapped is location.file and start <= location.start < end)
                for location in layer.locations]
            slot_bytes = max(slot_bytes, size)
        self.slot_bytes = slot_bytes
        self._maps = [read_buffer(slot_bytes) for _ in range(slots)]
        self.buffers = [torch.frombuffer(m, dtype=torch.uint8) for m in self._maps]
        self._direct_fds: dict[Path, int] = {}  # -1: the filesystem refuses O_DIRECT

    def _fd(self, mapped: MappedFile) -> int:
        fd = self._direct_fds.get(mapped.path)
        if fd is None:
            try:
                fd = os.open(mapped.path, os.O_RDONLY | O_DIRECT)
            except OSError:  # EINVAL: no O_DIRECT on this filesystem
                fd = -1
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
        for name, location, at in zip(layer.names, layer.locations,
                                      self.tensor_offsets[layer.name], strict=True):
            flat = buffer[at:at + location.nbytes].view(location.dtype).view(location.shape)
            # Same dtype as stored: computed from the slot. Otherwise converted here.
            want = compute_as(name, flat.dtype, self.dtype)
            tensors[name] = flat if flat.dtype == want else flat.to(want)
        return Staged(layer, slot, tensors)

    def _read(self, mapped: MappedFile, target: memoryview, start: int, end: int) -> None:
        fd = self._fd(mapped)
        try:
            try:
                reached = read_range(fd, target, start, end)
            except OSError as exc:
                if exc.errno != errno.EINVAL or fd == mapped.fd:
                    raise
                # The filesystem took O_DIRECT at open but not for reads: read through the
                # page cache from now on.
                os.close(fd)
                self._direct_fds[mapped.path] = -1
                reached = read_range(mapped.fd, target, start, end)
        except OSError as exc:
            raise OffloadError(f"{mapped.path}: reading bytes {start}-{end} failed "
                               f"({exc.strerror}); check the disk and reload") from None
        if reached < min(end, mapped.needed):  # the aligned tail may run past the end
            raise OffloadError(f"{mapped.path} ends at byte {reached}, before the layer's "
                               "weights do: the file was truncated; restore it and reload")

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
            for name, location, offset in zip(layer.names, layer.locations, offsets,
                                              strict=True):
                want = compute_as(name, location.dtype, self.dtype)
                target = staging[offset:offset + math.prod(location.shape) * want.itemsize]
                target.view(want).copy_(location.file.view(location).reshape(-1))
            source = staging
        last = compute_as(layer.names[-1], layer.locations[-1].dtype, self.dtype)
        size = offsets[-1] + math.prod(layer.locations[-1].shape) * last.itemsize
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.computed[slot])  # the slot's last layer is done
            self.buffers[slot][:size].copy_(source[:size], non_blocking=True)
            self.copied[slot].record(self.copy_stream)
        tensors = {}
        for name, location, offset in zip(layer.names, layer.locations, offsets, strict=True):
            want = compute_as(name, location.dtype, self.dtype)
            flat = self.buffers[slot][offset:offset + math.prod(location.shape) * want.itemsize]
            tensors[name] = flat.view(want).view(location.shape)
        return Staged(layer, slot, tensors, ready=self.copied[slot])

    def before_compute(self, staged: Staged) -> None:
        torch.cuda.current_stream(self.device).wait_event(staged.ready)

    def after_compute(self, staged: Staged) -> None:
        self.computed[staged.slot].record(torch.cuda.current_stream(self.device))

    def discard(self, staged: Staged) -> None:
        pass  # the slot's computed event is still the last use: refilling it stays ordered

    def close(self) -> None:
        pass


def _packed_offsets(layer: LayerWeights, dtype: torch.dtype) -> tuple[list[int], int]:
    """Byte offsets of each tensor in a flat slot buffer (aligned), and the slot size."""
    offsets = []
    cursor = 0
    for name, location in zip(layer.names, layer.locations, strict=True):
        offsets.append(cursor)
        cursor += math.prod(location.shape) * compute_as(name, location.dtype, dtype).itemsize
        cursor += -cursor % GPU_ALIGN
    return offsets, cursor


def pin_layer(layer: LayerWeights, dtype: torch.dtype) -> torch.Tensor:
    """The layer packed as in a GPU slot, in page-locked host memory: pinned once, at load."""
    offsets, size = _packed_offsets(layer, dtype)
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    for name, location, offset in zip(layer.names, layer.locations, offsets, strict=True):
        want = compute_as(name, location.dtype, dtype)
        target = pinned[offset:offset + math.prod(location.shape) * want.itemsize].view(want)
        target.copy_(location.file.view(location).reshape(-1))
    return pinned
