"""Shared fixtures. Tests run against real parts: the embedded model, the real worker process,
the real CLI. XDG dirs point into a temporary home so a user's config and sessions are never
read or written; the model cache is kept in the repo's .cache/ so the GGUF conversion happens
once per checkout, not once per test run."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from glmchat.client import EngineClient
from glmchat.protocol import Loaded, ModelSpec

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("GLMCHAT_TEST_CACHE", REPO / ".cache" / "xdg-cache"))


def _prepare_default_model() -> None:
    """Convert the embedded GGUF once, before any test times a command: on a fresh clone the
    conversion would otherwise land inside whichever test happens to run first."""
    from glmchat.model.sources import convert_gguf, resolve

    resolved = resolve("default")
    if resolved.needs_conversion:
        convert_gguf(resolved, lambda done, total, what: None)


@pytest.fixture(scope="session", autouse=True)
def isolated_xdg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("home")
    saved = {k: os.environ.get(k) for k in ("XDG_CONFIG_HOME", "XDG_DATA_HOME",
                                            "XDG_CACHE_HOME", "XDG_RUNTIME_DIR")}
    os.environ["XDG_CONFIG_HOME"] = str(home / "config")
    os.environ["XDG_DATA_HOME"] = str(home / "data")
    # a user's running `glmchat serve` announces itself there: one-shot tests must not find it
    os.environ["XDG_RUNTIME_DIR"] = str(home / "run")
    CACHE.mkdir(parents=True, exist_ok=True)
    os.environ["XDG_CACHE_HOME"] = str(CACHE)
    _prepare_default_model()
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def client(isolated_xdg: Path) -> Iterator[EngineClient]:
    """One worker with the embedded default model, shared by the tests that only generate."""
    engine = EngineClient()
    engine.start()
    events = list(engine.load(ModelSpec()))
    assert isinstance(events[-1], Loaded)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def default_weights_dir(client: EngineClient) -> Path:
    """The converted safetensors directory of the embedded model."""
    assert client.loaded is not None
    return Path(client.loaded.info.weights_dir)


def run_cli(*args: str, input: str | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real `glmchat` command line (python -m glmchat) and capture its output."""
    return subprocess.run([sys.executable, "-m", "glmchat", *args], input=input,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
