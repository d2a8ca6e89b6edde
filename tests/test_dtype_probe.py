"""The one-time CPU dtype probe behind ``--dtype auto`` (model/dtype_probe.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from glmchat.model import dtype_probe
from glmchat.model.family_transformers import pick_dtype as _pick_dtype


@pytest.fixture()
def probe_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return dtype_probe.cache_file()


def test_probe_runs_once_and_is_cached_per_machine(probe_cache: Path) -> None:
    first = dtype_probe.verdict(torch.bfloat16)
    assert first["cached"] is False and len(first["ratios"]) == len(dtype_probe.SHAPES)
    assert first["fast"] == all(r <= dtype_probe.SLOWER_OK for r in first["ratios"])
    stored = json.loads(probe_cache.read_text())
    key = dtype_probe.machine_key(torch.bfloat16)
    assert torch.__version__ in key and torch.backends.cpu.get_cpu_capability() in key
    assert stored[key]["fast"] == first["fast"]
    again = dtype_probe.verdict(torch.bfloat16)
    assert again["cached"] is True and again["ratios"] == first["ratios"]


@pytest.mark.parametrize("fast", [True, False])
def test_auto_dtype_follows_the_cached_verdict(probe_cache: Path, fast: bool) -> None:
    probe_cache.parent.mkdir(parents=True, exist_ok=True)
    probe_cache.write_text(json.dumps(
        {dtype_probe.machine_key(torch.bfloat16): {"fast": fast, "ratios": [1.0, 1.0]}}))
    config = SimpleNamespace(dtype=torch.bfloat16)
    expected = torch.bfloat16 if fast else torch.float32
    if torch.cuda.is_available():
        expected = torch.bfloat16  # on a GPU the stored dtype is used as it is
    assert _pick_dtype("auto", config) == expected
    assert _pick_dtype("float32", config) == torch.float32  # a typed dtype is never probed
    assert _pick_dtype("auto", SimpleNamespace(dtype="float32")) == torch.float32


def test_a_corrupt_probe_cache_is_measured_again(probe_cache: Path) -> None:
    probe_cache.parent.mkdir(parents=True, exist_ok=True)
    probe_cache.write_text("{not json")
    assert dtype_probe.verdict(torch.bfloat16)["cached"] is False
    assert dtype_probe.verdict(torch.bfloat16)["cached"] is True
