"""The offload runtime through the engine, the real CLI and the bench: runtime selection,
identical output, live stats, the KV cache kept across chat turns, no thread left behind."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glmchat.params import GenerationParams
from glmchat.protocol import ChatMessage, Event, Generate, ModelSpec, StepStats
from tests.conftest import run_cli

READER = "glmchat-offload-reader"
ALL_ON_DISK = 0.0001  # GiB: nothing fits in RAM


@pytest.fixture(scope="module")
def tiny_model(isolated_xdg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama with the default model's tokenizer (bench make-model)."""
    from glmchat.bench.make_model import PRESETS, default_tokenizer_dir, write_model

    out = tmp_path_factory.mktemp("tiny-random-llama")
    write_model(out, PRESETS["tiny"], "float32", default_tokenizer_dir())
    return out


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)


@pytest.fixture(scope="module")
def engines(tiny_model: Path) -> Iterator[dict[str, Any]]:
    from glmchat.model.engine import Engine

    loaded = {}
    for name, spec in {
        "resident": ModelSpec(path=str(tiny_model)),
        "glmchat": ModelSpec(path=str(tiny_model), cpu_memory=ALL_ON_DISK),
        "glmchat-direct": ModelSpec(path=str(tiny_model), cpu_memory=ALL_ON_DISK,
                                    offload_reader="direct"),
        "accelerate": ModelSpec(path=str(tiny_model), cpu_memory=ALL_ON_DISK,
                                offload_runtime="accelerate"),
    }.items():
        engine = Engine(Recorder())
        engine.load(spec)
        loaded[name] = engine
    yield loaded


def ask(engine: Any, messages: list[tuple[str, str]], max_new_tokens: int = 10,
        should_stop: Any = lambda: False) -> Any:
    request = Generate(id="g", params=GenerationParams(max_new_tokens=max_new_tokens),
                       messages=[ChatMessage(role, text) for role, text in messages])
    return engine.generate(request, should_stop)


def test_placement_selects_runtime_tiny_random(engines: dict[str, Any]) -> None:
    assert engines["resident"].loaded.placement.runtime == "resident"
    assert engines["accelerate"].loaded.placement.runtime == "accelerate"
    ours = engines["glmchat"].loaded
    assert ours.placement.runtime == "glmchat"
    assert ours.offload is not None
    assert ours.placement.layers_per_tier == {"disk": 4}
    assert ours.placement.bytes_per_tier["disk"] > 0


def test_greedy_identical_across_runtimes_tiny_random(engines: dict[str, Any]) -> None:
    results = {}
    for name, engine in engines.items():
        engine.conversation.clear()
        results[name] = ask(engine, [("user", "Tell me about lighthouses.")]).token_ids
    assert results["glmchat"] == results["resident"] == results["accelerate"]
    assert results["glmchat-direct"] == results["resident"]
    assert engines["glmchat-direct"].loaded.offload.stats.reader == "direct"
    assert not [t for t in threading.enumerate() if t.name == READER]


def test_live_streaming_stats_tiny_random(engines: dict[str, Any]) -> None:
    engine = engines["glmchat"]
    engine.emit.events.clear()
    ask(engine, [("user", "Hi")], max_new_tokens=4)
    stats = [e for e in engine.emit.events if isinstance(e, StepStats)]
    assert stats
    extra = stats[-1].extra
    assert extra["offload_runtime"] == "glmchat"
    assert extra["streamed_layers"] == 4 and extra["resident_layers"] == 0
    assert extra["bytes_streamed_per_token"] == engine.loaded.offload.stats.bytes_per_token
    assert extra["stream_gb_per_s"] > 0


def test_cancelled_generation_leaves_no_reader_thread_tiny_random(
        engines: dict[str, Any]) -> None:
    engine = engines["glmchat"]
    polls = {"n": 0}

    def stop_soon() -> bool:
        polls["n"] += 1
        return polls["n"] > 2

    result = ask(engine, [("user", "Count to fifty.")], max_new_tokens=50, should_stop=stop_soon)
    assert result.finish_reason == "cancelled"
    assert not [t for t in threading.enumerate() if t.name == READER]
    # and the model still works afterwards
    assert ask(engine, [("user", "Hi")], max_new_tokens=3).token_ids


@pytest.mark.parametrize("runtime", ["glmchat", "resident"])
def test_second_turn_prefills_only_new_tokens_tiny_random(engines: dict[str, Any],
                                                         runtime: str) -> None:
    engine = engines[runtime]
    engine.conversation.clear()
    first = ask(engine, [("user", "Name a colour.")])
    turn2 = [("user", "Name a colour."), ("assistant", first.text), ("user", "Another one?")]
    second = ask(engine, turn2)
    assert second.timings.prefill_tokens < len(second.prompt_token_ids) // 2 + 1
    engine.conversation.clear()
    fresh = ask(engine, turn2)
    assert fresh.timings.prefill_tokens == len(fresh.prompt_token_ids)
    assert second.token_ids == fresh.token_ids


# ---- the real CLI and the bench --------------------------------------------------------------


@pytest.mark.slow
def test_default_model_cpu_memory_limit_same_greedy_output_via_cli(isolated_xdg: Path) -> None:
    args = ["--raw", "The capital of France is", "--max-new-tokens", "8", "--json",
            "--no-save"]
    outputs = {}
    for name, extra in {"unlimited": [], "glmchat": ["--cpu-memory", "0.1"],
                        "direct": ["--cpu-memory", "0.1", "--offload-reader", "direct", "-v"],
                        "accelerate": ["--cpu-memory", "0.1", "--offload-runtime",
                                       "accelerate"]}.items():
        done = run_cli(*args, *extra)
        assert done.returncode == 0, done.stderr
        outputs[name] = json.loads(done.stdout.splitlines()[-1])["token_ids"]
        if name == "direct":  # -v: the stats line says what streamed
            assert "/token at" in done.stderr and "(direct reader)" in done.stderr
    assert outputs["glmchat"] == outputs["unlimited"] == outputs["accelerate"]
    assert outputs["direct"] == outputs["unlimited"]


@pytest.mark.slow
def test_bench_make_model_and_offload_tiny_random(tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    made = run_cli("bench", "make-model", str(out), "--params", "tiny", "--dtype", "float32")
    assert made.returncode == 0, made.stderr
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    results = tmp_path / "bench.json"
    bench = run_cli("bench", "offload", "--model", str(out), "--cpu-memory", "0",
                    "--new-tokens", "4", "--json", str(results), "--quantize", "int8")
    assert bench.returncode == 0, bench.stderr
    assert "greedy tokens identical across engines and regimes (float32 compute): yes" \
        in bench.stdout
    assert "(float32 compute, int8 weights): yes" in bench.stdout
    runs = json.loads(results.read_text())["runs"]
    assert {(r["engine"], r["regime"]) for r in runs} == {
        ("resident", "warm"), ("accelerate", "warm"), ("accelerate", "cold"),
        ("glmchat", "warm"), ("glmchat", "cold"), ("glmchat:mmap", "cold"),
        ("glmchat:default", "warm"), ("glmchat:default", "cold"),  # no flags: what users get
        ("glmchat:int8", "warm"), ("glmchat:int8", "cold")}
    bytes_per_token = {(r["engine"], r["regime"]): r["bytes_per_token"] for r in runs}
    assert bytes_per_token[("glmchat:int8", "cold")] < bytes_per_token[("glmchat", "cold")]
    readers = {(r["engine"], r["regime"]): r["reader"] for r in runs}
    assert readers[("glmchat", "warm")] == "mmap"  # auto, for a model that fits in RAM
    assert readers[("glmchat", "cold")] == "direct"  # what auto picks for one that does not
    assert readers[("glmchat:mmap", "cold")] == "mmap"
    assert "disk read throughput of the streamed bytes" in bench.stdout
    unknown = run_cli("bench", "nope")
    assert unknown.returncode == 2
