"""Build a directory in full, then publish it in one rename: a reader (a later start) sees the
old directory or the whole new one, never a half-made one. Used by every conversion that
writes into the cache (GGUF → safetensors, GLM-130B shards, quantized and packed copies)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def building(target: Path, prefix: str, parent: Path | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory in ``parent`` (default: beside ``target``); when the
    block ends without an exception it replaces ``target``, else it is removed."""
    parent = parent or target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
