"""The glmchat offload runtime: modules that do not fit stream in one whole decoder layer (or
the head) at a time, staged ahead of compute by a background reader. This module wires it into
the model; ``streamer.py`` runs the reader, ``backends.py`` stages the weights.

How a model is laid out after ``load_offloaded``:

- **resident** modules own their weights in memory (CPU RAM, or the GPU);
- **mapped** (CPU compute): an embedding table on disk is bound to the mapped checkpoint once;
  a lookup reads only the rows it needs;
- **streamed** modules are ``StreamedModule``s: outside their turn their parameters are on the
  meta device; ``StreamedModule.forward`` takes the module's staged weights from the
  ``LayerStreamer``, binds them, runs the module, and hands the slot back. The staged weights
  are views of the mapping (``reader="mmap"``), of a slot buffer filled by O_DIRECT reads
  (``reader="direct"``), or of a GPU slot buffer (CUDA).

The reader thread walks the streamed modules in forward order, cyclically (after the head of
one token comes the first streamed layer of the next), holding at most ``slots`` of them —
staged, ready, or being computed. On a GPU, resident layers are spread evenly through the depth
so each copy hides behind resident compute.

If a forward runs modules out of the expected order (an exception mid-forward, a cancel), the
streamer drops what it staged and restarts at the module asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from .backends import (
    Backend,
    CudaBackend,
    DirectBackend,
    LayerWeights,
    MappedBackend,
    compute_as,
    pin_layer,
)
from .checkpoint_names import NotStreamable, checkpoint_names
from .mapped import MappedCheckpoint, TensorLocation, merged_ranges
from .streamer import LayerStreamer, StreamStats

# Device-map tiers whose layers the runtime streams, per compute device type.
STREAMED_TIERS = {"cpu": ("disk",), "cuda": ("cpu", "disk")}
READERS = ("auto", "mmap", "direct")


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
    quantize: str = "none"  # the weights' scheme (model/quant.py), for the panels

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
            "quantize": self.quantize,
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
        raise NotStreamable(f"{type(model).__name__} has no list of decoder layers to stream")
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
    # Checkpoint keys renamed as transformers renames them (GPT-NeoX's embed_out → lm_head).
    stored = checkpoint_names(model, checkpoint.locations)
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
                      and _stored_dtype(checkpoint, stored.get(f"{name}.weight", "")) == dtype}
        unit_order = [name for name in unit_order if name not in embeddings]

    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()  # tied names (lm_head → embed_tokens) become one parameter, loaded once
    aliases: dict[str, list[str]] = {}
    by_id: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = by_id.setdefault(id(param), name)
        aliases.setdefault(first, []).append(name)

    def unit_of(name: str) -> str | None:
        return next((u for u in unit_order if name.startswith(u + ".")), None)

    wanted = list(aliases) + [n for n, _ in model.named_buffers() if n in stored]
    per_unit: dict[str, list[tuple[str, TensorLocation]]] = {u: [] for u in unit_order}
    for name in wanted:
        key = next((stored[a] for a in aliases.get(name, [name]) if a in stored), None)
        if key is None:
            raise NotStreamable(f"the checkpoint has no tensor for {name}")
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
            owned = torch.empty(view.shape, dtype=compute_as(key, view.dtype, dtype),
                                device=device)
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
                weights.pinned = pin_layer(weights, dtype)
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
