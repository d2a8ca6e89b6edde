"""model/atomic_dir.py: leftovers of killed conversions are removed, a running one's is kept."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from glmchat.model.atomic_dir import LEGACY_STALE_S, building, owner_tag, remove_stale

PREFIX = ".converting-"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_remove_stale_keeps_running_owners_and_recent_unnamed_ones(tmp_path: Path) -> None:
    mine = tmp_path / f"{PREFIX}{owner_tag()}-abc"
    dead = tmp_path / f"{PREFIX}{owner_tag(_dead_pid())}-def"
    reused = tmp_path / f"{PREFIX}{os.getpid()}.1-ghi"  # this pid, another start time
    legacy_new, legacy_old = tmp_path / f"{PREFIX}k2j3h4", tmp_path / f"{PREFIX}x9y8z7"
    other = tmp_path / ".quantizing-1.1-zzz"  # another prefix: not this call's business
    for d in (mine, dead, reused, legacy_new, legacy_old, other):
        d.mkdir()
    old = time.time() - LEGACY_STALE_S - 60
    os.utime(legacy_old, (old, old))
    removed = remove_stale(tmp_path, PREFIX)
    assert sorted(removed) == sorted([dead, reused, legacy_old])
    assert mine.is_dir() and legacy_new.is_dir() and other.is_dir()


def test_building_publishes_whole_and_cleans_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "model"
    leftover = tmp_path / f"{PREFIX}{owner_tag(_dead_pid())}-abc"
    leftover.mkdir()
    for content in ("old", "new"):
        with building(target, PREFIX) as tmp:
            assert tmp.name.startswith(f"{PREFIX}{owner_tag()}-")
            (tmp / "weights").write_text(content)
    assert (target / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
