"""The real worker process: loading, streaming, cancel, stats, crashes and shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from glmchat.client import EngineClient
from glmchat.errors import WorkerCrashed
from glmchat.params import GenerationParams
from glmchat.protocol import (
    Finished,
    Loaded,
    LoadProgress,
    Memory,
    ModelSpec,
    StepStats,
    Token,
)

LONG = GenerationParams(max_new_tokens=200, min_new_tokens=200)


def _gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_load_reports_progress_then_placement(isolated_xdg: object) -> None:
    with EngineClient() as engine:
        events = list(engine.load(ModelSpec()))
        progress = [e for e in events if isinstance(e, LoadProgress)]
        assert progress and progress[-1].done == progress[-1].total
        assert [p.done for p in progress] == sorted(p.done for p in progress)
        loaded = events[-1]
        assert isinstance(loaded, Loaded)
        assert loaded.info.name == "SmolLM2-135M-Instruct"
        assert loaded.info.n_layers == 30 and loaded.placement.n_layers == 30
        assert loaded.placement.layers_per_tier == {"cpu": 30}
        assert len(loaded.info.digest) == 64
        pid = engine.pid
        assert pid is not None
    assert _gone(pid), "worker left behind after close()"


def test_tokens_stream_and_stats_arrive(client: EngineClient) -> None:
    gen_id = client.generate(GenerationParams(max_new_tokens=12, min_new_tokens=12),
                             prompt="Count from one to ten.")
    events = list(client.stream(gen_id))
    tokens = [e for e in events if isinstance(e, Token)]
    stats = [e for e in events if isinstance(e, StepStats)]
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert "".join(t.text for t in tokens) == finished.result.text
    assert len(finished.result.token_ids) == 12 and finished.result.finish_reason == "length"
    assert stats and stats[-1].new_tokens == 12
    assert finished.result.timings.decode_tokens_per_s > 0
    assert 0 < finished.result.timings.ttft_s < finished.result.timings.total_s


def test_cancel_takes_effect_within_one_step(client: EngineClient) -> None:
    gen_id = client.generate(LONG, prompt="Write a long essay about rivers.")
    after_cancel = 0
    cancelled = False
    for event in client.stream(gen_id):
        if isinstance(event, StepStats):
            if cancelled:
                after_cancel += 1
            elif event.new_tokens >= 3:
                client.cancel(gen_id)
                cancelled = True
        if isinstance(event, Finished):
            result = event.result
    assert result.finish_reason == "cancelled"
    assert after_cancel <= 1  # the step already running when Cancel arrived
    assert 3 <= len(result.token_ids) <= 5


def test_memory_stats_say_no_gpu_rather_than_zeros(client: EngineClient) -> None:
    client.request_stats()
    while not isinstance(event := client.recv(timeout=30), Memory):
        assert event is not None
    assert event.cpu_rss > 100 * 2**20
    if not event.gpu_available:
        assert event.devices == [] and "no GPU" in event.note


def test_killed_worker_is_reported_and_a_new_one_starts(isolated_xdg: object) -> None:
    engine = EngineClient()
    engine.start()
    try:
        list(engine.load(ModelSpec()))
        gen_id = engine.generate(LONG, prompt="Tell me about mountains.")
        with pytest.raises(WorkerCrashed, match="killed"):
            for event in engine.stream(gen_id):
                if isinstance(event, Token):
                    assert engine.pid is not None
                    os.kill(engine.pid, signal.SIGKILL)
        assert not engine.alive
        engine.restart()
        list(engine.load(ModelSpec()))
        gen_id = engine.generate(GenerationParams(max_new_tokens=5), prompt="Hi")
        assert isinstance(list(engine.stream(gen_id))[-1], Finished)
    finally:
        engine.close()


def test_worker_exits_when_its_front_end_is_killed(isolated_xdg: object) -> None:
    script = textwrap.dedent("""
        import sys, time
        from glmchat.client import EngineClient
        if __name__ == "__main__":
            engine = EngineClient(); engine.start(); engine.recv(timeout=60)
            print(engine.pid, flush=True); time.sleep(600)
    """)
    front = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert front.stdout is not None
        worker_pid = int(front.stdout.readline())
        assert psutil.pid_exists(worker_pid)
        front.kill()
        front.wait()
        assert _gone(worker_pid), "orphaned worker outlived its killed front end"
    finally:
        if front.poll() is None:
            front.kill()
