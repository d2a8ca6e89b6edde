"""Which half-precision dtypes this CPU computes fast: a one-time probe, cached per machine.

``--dtype auto`` on a CPU computes a bfloat16 (or float16) checkpoint in its stored dtype when
this CPU has fast kernels for it, else in float32. Whether it has them is measured, not guessed
from a CPU flag: a decode-shaped and a prefill-shaped matmul are timed in the half dtype and in
float32, once; the half dtype is "fast" when it is no slower than ``SLOWER_OK`` times float32 in
both shapes. (Streamed layers computed in float32 are converted every token, so a half dtype
that merely matches float32 already wins for them; a CPU without native kernels for it falls
back to reference loops 5-50x slower, which the probe catches.)

The verdict is cached in ``$XDG_CACHE_HOME/glmchat/dtype-probe.json`` keyed by the torch
version, the CPU capability torch dispatches to, the CPU model and the thread count.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from glmchat import paths

SLOWER_OK = 1.5  # the half dtype may be this much slower than float32 and still count as fast
SHAPES = ((1, 2048, 2048), (32, 1024, 2048))  # (M, K, N): one decode token, a short prefill
REPEATS = 7


def cache_file() -> Path:
    return paths.cache_dir() / "dtype-probe.json"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key(dtype: torch.dtype) -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return (f"{str(dtype).removeprefix('torch.')}|torch {torch.__version__}|{capability}|"
            f"{_cpu_model()}|threads {torch.get_num_threads()}")


def _best_time(x: torch.Tensor, w: torch.Tensor) -> float:
    torch.nn.functional.linear(x, w)  # first call: kernel selection, not timed
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(dtype: torch.dtype) -> dict[str, Any]:
    """Time the probe matmuls; returns the ratios and the verdict."""
    generator = torch.Generator().manual_seed(0)
    ratios = []
    with torch.inference_mode():
        for m, k, n in SHAPES:
            x = torch.randn(m, k, generator=generator)
            w = torch.randn(n, k, generator=generator)
            full = _best_time(x, w)
            half = _best_time(x.to(dtype), w.to(dtype))
            ratios.append(half / full if full > 0 else float("inf"))
    return {"fast": all(r <= SLOWER_OK for r in ratios),
            "ratios": [round(r, 3) for r in ratios], "measured_at": time.time()}


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def verdict(dtype: torch.dtype) -> dict[str, Any]:
    """The cached verdict for ``dtype`` on this machine, probing (and caching) it the first
    time. A cache that cannot be read or written costs a probe (~50 ms), never an error."""
    key = machine_key(dtype)
    cache = _read_cache()
    found = cache.get(key)
    if isinstance(found, dict) and isinstance(found.get("fast"), bool):
        return {**found, "cached": True}
    result = measure(dtype)
    cache[key] = result
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, target)
    except OSError:
        pass
    return {**result, "cached": False}


def cpu_computes_fast(dtype: torch.dtype) -> bool:
    """Whether this CPU computes ``dtype`` matmuls fast (float32 always does)."""
    if dtype == torch.float32:
        return True
    return bool(verdict(dtype)["fast"])
