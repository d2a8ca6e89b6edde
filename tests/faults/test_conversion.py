"""Conversions into the model cache killed half-way or failing to write: a half-made
directory is never trusted, the next start converts again, and what a killed conversion left
is removed then. Each test has a private cache (harness.private_cache)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from glmchat.model.glm_checkpoint import MARKER, is_converted
from glmchat.model.sources import CONVERTED_MARKER

from tests import glm_tiny
from tests.faults.cases import fault
from tests.faults.harness import SMALL, Live, assert_reported, glmchat, private_cache


def _models(env: dict[str, str]) -> Path:
    return Path(env["XDG_CACHE_HOME"]) / "glmchat" / "models"


def _building(env: dict[str, str], holding: str) -> list[Path]:
    """The conversions under way in the cache whose directory holds ``holding`` already."""
    return [d for d in _models(env).glob(".converting-*") if (d / holding).exists()]


@fault("SIGKILL of `glmchat convert DIR` (a GLM-130B checkpoint) mid-conversion",
       "the half-made directory is never published; the next `convert` removes it (its "
       "owner is dead), converts again and succeeds, exit 0", "the checkpoint; no leftovers")
def test_sigkill_glm_convert_mid_conversion_tiny_random_weights(tmp_path: Path) -> None:
    checkpoint = glm_tiny.write_checkpoint(tmp_path / "glm-tiny")
    env = private_cache(tmp_path)
    # written in full, stalled just before the rename that publishes it
    live = Live("convert", str(checkpoint), env={**env, "GLMCHAT_DEBUG_STALL": "convert:120"})
    live.wait_until(lambda: bool(_building(env, MARKER)), "converted into the cache")
    [half] = _building(env, MARKER)
    live.proc.kill()
    assert live.finish().code == -signal.SIGKILL
    assert half.is_dir()  # what the kill left
    assert [d.name for d in _models(env).iterdir()] == [half.name]  # nothing published

    run = glmchat("convert", str(checkpoint), env=env)
    assert_reported(run, 0)
    target = Path(run.stdout.strip())
    assert is_converted(target) and target.parent == _models(env)
    assert not half.exists(), "the killed conversion's leftover must be removed"
    assert [p.name for p in _models(env).iterdir()] == [target.name]


@fault("SIGKILL of the worker while it converts the embedded model (the first start)",
       "`glmchat: error: the worker was killed (SIGKILL) …`, exit 1; the next start does not "
       "trust the half-made copy, removes it, converts again and answers",
       "the model cache as it was; no leftovers")
def test_sigkill_worker_mid_default_model_conversion(tmp_path: Path) -> None:
    env = private_cache(tmp_path)
    live = Live(*SMALL, "Name a colour.", env=env)
    # config.json is written before the weights: the copy is half made
    live.wait_until(lambda: bool(_building(env, "config.json")), "began writing the copy")
    [half] = _building(env, "config.json")
    os.kill(live.worker_pid(), signal.SIGKILL)
    run = live.finish()
    assert_reported(run, 1, "worker was killed", "SIGKILL")
    assert not (half / CONVERTED_MARKER).exists()

    again = glmchat(*SMALL, "Name a colour.", env=env)
    assert_reported(again, 0)
    assert again.stdout.strip(), "the answer"
    [copy] = list(_models(env).iterdir())  # the leftover is gone; one published copy
    assert not copy.name.startswith(".") and (copy / CONVERTED_MARKER).is_file()


@fault("disk full while `glmchat convert` writes (`RLIMIT_FSIZE`)",
       "`glmchat: error: cannot write …/models (File too large); set XDG_CACHE_HOME …`, "
       "exit 1", "the checkpoint; nothing half-made in the cache")
def test_glm_convert_disk_full_tiny_random_weights(tmp_path: Path) -> None:
    checkpoint = glm_tiny.write_checkpoint(tmp_path / "glm-tiny")
    env = private_cache(tmp_path)
    run = glmchat("convert", str(checkpoint), env=env, file_size=4096)
    assert_reported(run, 1, "cannot write", "File too large", "XDG_CACHE_HOME")
    assert list(_models(env).iterdir()) == []


@fault("SIGKILL of the worker while the model loads (one-shot)",
       "`glmchat: error: the worker was killed (SIGKILL); …`, exit 1", "—")
def test_sigkill_worker_mid_load() -> None:
    live = Live(*SMALL, "Name a colour.", env={"GLMCHAT_DEBUG_STALL": "load:120"})
    live.wait_until(lambda: b"the load stalls" in live.err, "began loading")
    os.kill(live.worker_pid(), signal.SIGKILL)
    run = live.finish()
    assert_reported(run, 1, "worker was killed", "SIGKILL")
    assert run.stdout == ""
