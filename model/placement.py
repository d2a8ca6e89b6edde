"""Placement: which module lives on which tier (GPU → CPU → disk), via accelerate's
``infer_auto_device_map``, and live memory readings for the front ends' panels."""

from __future__ import annotations

import re
from collections import Counter

import psutil
import torch
from accelerate import infer_auto_device_map
from torch import nn

from glmchat.protocol import DeviceMemory, Memory, ModelSpec, Placement

GIB = 1 << 30
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def max_memory_for(spec: ModelSpec) -> dict[int | str, int] | None:
    """accelerate's ``max_memory`` from the spec; None when nothing is limited and all fits."""
    if spec.gpu_memory is None and spec.cpu_memory is None:
        return None
    budget: dict[int | str, int] = {}
    for index in range(gpu_count()):
        free, _total = torch.cuda.mem_get_info(index)
        limit = free if spec.gpu_memory is None else int(spec.gpu_memory * GIB)
        budget[index] = min(limit, free)
    cpu_available = psutil.virtual_memory().available
    budget["cpu"] = cpu_available if spec.cpu_memory is None else int(spec.cpu_memory * GIB)
    return budget


def tier_of(device: str | int | torch.device) -> str:
    text = str(device)
    if text.isdigit():
        return f"cuda:{text}"
    return text


def compute_device_map(meta_model: nn.Module, spec: ModelSpec,
                       dtype: torch.dtype, lookup_on_disk: bool = False
                       ) -> dict[str, str] | None:
    """The device map for ``meta_model`` (weights on the meta device), or None for "all on the
    one fast device" when no limit is set.

    ``lookup_on_disk`` (CPU compute, an embedding untied from the head, as a quantized head's
    copy makes it): when layers go to disk anyway, the embedding table goes there first — the
    runtime maps it and a lookup reads a few rows — and its RAM share goes to layers."""
    budget = max_memory_for(spec)
    if budget is None:
        return None
    embedding = (meta_model.get_input_embeddings()  # type: ignore[operator]
                 if lookup_on_disk else None)
    if isinstance(embedding, nn.Embedding) and gpu_count() == 0:
        names = {id(m): n for n, m in meta_model.named_modules()}
        table = embedding.weight.numel() * dtype.itemsize
        wider = {**budget, "cpu": int(budget["cpu"]) + table}
        device_map = _infer(meta_model, wider, dtype)
        if "disk" in device_map.values():
            device_map[names[id(embedding)]] = "disk"
            return device_map
    return _infer(meta_model, budget, dtype)


def _infer(meta_model: nn.Module, budget: dict[int | str, int], dtype: torch.dtype
           ) -> dict[str, str]:
    tie = getattr(meta_model, "tie_weights", None)
    if callable(tie):
        tie()  # tied embeddings/head are one tensor: counted once, placed together
    no_split = getattr(meta_model, "_no_split_modules", None) or []
    raw = infer_auto_device_map(meta_model, max_memory=budget,
                                no_split_module_classes=list(no_split), dtype=dtype)
    return {name: tier_of(device) for name, device in raw.items()}


def _module_device(name: str, device_map: dict[str, str]) -> str:
    """Device of parameter ``name``: its longest module prefix in the map."""
    while True:
        if name in device_map:
            return device_map[name]
        if "." not in name:
            return device_map.get("", "cpu")
        name = name.rsplit(".", 1)[0]


def summarize(model: nn.Module, device_map: dict[str, str] | None, runtime: str) -> Placement:
    """Layers and parameter bytes per tier, from the map (or from where parameters are)."""
    bytes_per_tier: Counter[str] = Counter()
    layer_tier: dict[int, str] = {}
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        tier = (_module_device(name, device_map) if device_map is not None
                else tier_of(param.device))
        bytes_per_tier[tier] += param.numel() * param.element_size()
        match = LAYER_RE.search(name)
        if match:
            layer_tier.setdefault(int(match.group(1)), tier)
    n_layers = len(layer_tier)
    if device_map is None:
        device_map = {"": tier_of(next(model.parameters()).device)}
    return Placement(device_map=dict(device_map),
                     layers_per_tier=dict(Counter(layer_tier.values())),
                     bytes_per_tier=dict(bytes_per_tier), n_layers=n_layers, runtime=runtime,
                     gpu_available=gpu_count() > 0)


def memory_snapshot(disk_bytes: int) -> Memory:
    devices = []
    for index in range(gpu_count()):
        free, total = torch.cuda.mem_get_info(index)
        name = torch.cuda.get_device_name(index)
        devices.append(DeviceMemory(name=f"cuda:{index} ({name})", used=total - free,
                                    total=total))
    rss = psutil.Process().memory_info().rss
    note = "" if devices else "no GPU: CPU RAM is the fast tier, disk the slow one"
    return Memory(devices=devices, cpu_rss=rss, disk_bytes=disk_bytes,
                  gpu_available=bool(devices), note=note)
