"""The glmchat offload runtime on a tiny random Llama (4 layers) with a placement that forces
streaming: where tensors live before/during/after a forward, output identical to the
unoffloaded model, the slot budget, broken files, and no reader thread left behind."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import init_empty_weights
from glmchat.model import backends, offload
from glmchat.model import generate as gen
from glmchat.model.mapped import OffloadError
from glmchat.model.prompt_cache import ConversationCache, common_prefix
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaForCausalLM

# layer 0 and the final norm resident; embeddings, layers 1-3 and the head on disk
DEVICE_MAP = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
              "model.layers.2": "disk", "model.layers.3": "disk", "model.norm": "cpu",
              "model.rotary_emb": "cpu", "lm_head": "disk"}
READER = "glmchat-offload-reader"


def tiny_config(tied: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=tied, max_position_embeddings=256)


def save_tiny(directory: Path, tied: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tied)).to(dtype)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"), tied=request.param)


def load_streamed(directory: Path, dtype: torch.dtype = torch.float32, **kwargs: Any
                  ) -> tuple[Any, offload.OffloadRuntime]:
    config = LlamaConfig.from_pretrained(directory)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    runtime = offload.load_offloaded(model, directory, DEVICE_MAP, dtype, torch.device("cpu"),
                                     **kwargs)
    return model.eval(), runtime


@pytest.fixture
def streamed(tiny_dir: Path) -> Iterator[tuple[Any, offload.OffloadRuntime]]:
    model, runtime = load_streamed(tiny_dir)
    yield model, runtime
    runtime.close()


def greedy(model: Any, prompt: list[int], n: int = 12) -> list[int]:
    settings = gen.DecodeSettings(max_new_tokens=n)
    with torch.inference_mode():
        return list(gen.decode_n(model, torch.tensor([prompt]), settings))


def in_mapping(tensor: torch.Tensor, runtime: offload.OffloadRuntime) -> bool:
    pointer = tensor.data_ptr()
    return any(f.address <= pointer < f.address + f.size for f in runtime.checkpoint.files)


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == READER]


def test_tensors_meta_before_mapped_during_meta_after_tiny_random_llama(
        streamed: tuple[Any, offload.OffloadRuntime]) -> None:
    model, runtime = streamed
    layer1 = model.model.layers[1]
    assert isinstance(layer1, offload.StreamedModule)
    assert isinstance(model.lm_head, offload.StreamedModule)
    assert not isinstance(model.model.layers[0], offload.StreamedModule)
    # before: streamed weights on meta, resident ones in memory we own (not the mapping)
    assert all(p.device.type == "meta" for p in layer1.parameters())
    assert model.lm_head.weight.device.type == "meta"
    resident = model.model.layers[0].mlp.up_proj.weight
    assert resident.device.type == "cpu" and not in_mapping(resident, runtime)
    assert model.model.norm.weight.device.type == "cpu"
    # names are the checkpoint's: the wrappers add no prefix
    assert "model.layers.1.mlp.up_proj.weight" in dict(model.named_parameters())

    seen: dict[str, tuple[str, bool]] = {}

    def record(name: str, module: torch.nn.Module) -> None:
        weight = module.weight
        seen[name] = (weight.device.type, in_mapping(weight, runtime))

    hooks = [model.model.layers[i].mlp.up_proj.register_forward_pre_hook(
        lambda m, args, i=i: record(f"layer{i}", m)) for i in range(4)]
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    for hook in hooks:
        hook.remove()
    # during: streamed layers compute straight from the mapped file, zero-copy
    assert seen["layer0"] == ("cpu", False)
    assert all(seen[f"layer{i}"] == ("cpu", True) for i in (1, 2, 3))
    # after: back on meta
    assert all(p.device.type == "meta" for p in layer1.parameters())
    assert model.lm_head.weight.device.type == "meta"
    assert runtime.stats.bytes_streamed == runtime.stats.bytes_per_token > 0


@pytest.mark.parametrize(("reader", "release_behind"),
                         [("mmap", True), ("mmap", False), ("direct", None)])
@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_greedy_identical_to_unoffloaded_tiny_random_llama(
        tiny_dir: Path, prefetch: int, reader: str, release_behind: bool | None) -> None:
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    prompt = [5, 17, 300, 42, 7]
    expected = greedy(reference, prompt)
    model, runtime = load_streamed(tiny_dir, prefetch=prefetch, release_behind=release_behind,
                                   reader=reader)
    assert runtime.stats.reader == reader
    try:
        assert greedy(model, prompt) == expected
        with torch.inference_mode():
            ids = torch.tensor([prompt])
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    finally:
        runtime.close()


@pytest.mark.parametrize("reader", ["mmap", "direct"])
def test_converting_dtype_while_streaming_tiny_random_llama(tmp_path: Path, reader: str) -> None:
    """bfloat16 on disk, float32 compute: the reader converts, output matches."""
    directory = save_tiny(tmp_path, dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    model, runtime = load_streamed(directory, dtype=torch.float32, reader=reader)
    try:
        # a bfloat16 table cannot be looked up as float32 in place: it streams, converted
        assert isinstance(model.model.embed_tokens, offload.StreamedModule)
        assert greedy(model, [3, 1, 4, 1, 5]) == greedy(reference, [3, 1, 4, 1, 5])
    finally:
        runtime.close()


@pytest.mark.parametrize("reader", ["mmap", "direct"])
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_prefetcher_never_exceeds_slot_budget_tiny_random_llama(tiny_dir: Path,
                                                               prefetch: int, reader: str) -> None:
    model, runtime = load_streamed(tiny_dir, prefetch=prefetch, reader=reader)
    backend = runtime.streamer.backend
    held = {"now": 0, "max": 0}
    lock = threading.Lock()
    stage, after, discard = backend.stage, backend.after_compute, backend.discard

    def counting_stage(layer: backends.LayerWeights, slot: int) -> backends.Staged:
        with lock:
            held["now"] += 1
            held["max"] = max(held["max"], held["now"])
        return stage(layer, slot)

    def counting_release(staged: backends.Staged, inner: Any) -> None:
        with lock:
            held["now"] -= 1
        inner(staged)

    backend.stage = counting_stage  # type: ignore[method-assign]
    backend.after_compute = lambda s: counting_release(s, after)  # type: ignore[method-assign]
    backend.discard = lambda s: counting_release(s, discard)  # type: ignore[method-assign]
    try:
        greedy(model, [9, 8, 7], n=6)
        runtime.idle()
        assert held["max"] <= prefetch + 1
        assert runtime.stats.max_held <= prefetch + 1
        assert held["now"] == 0
        if reader == "direct":  # the reads went into exactly prefetch + 1 preallocated slots
            assert len(backend.buffers) == prefetch + 1  # type: ignore[attr-defined]
    finally:
        runtime.close()


@pytest.mark.parametrize("reader", ["mmap", "direct"])
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_file_damaged_mid_run_raises_clear_error_tiny_random_llama(
        tmp_path: Path, damage: str, reader: str) -> None:
    directory = save_tiny(tmp_path / "model")
    model, runtime = load_streamed(directory, reader=reader)
    try:
        greedy(model, [1, 2, 3], n=2)
        runtime.idle()  # nothing of the file is mapped in now
        weights = directory / "model.safetensors"
        if damage == "truncate":
            os.truncate(weights, weights.stat().st_size // 2)
        else:
            weights.unlink()
        with pytest.raises(OffloadError, match="truncated" if damage == "truncate" else "deleted"
                           ) as raised:
            greedy(model, [1, 2, 3], n=2)
        assert str(weights) in str(raised.value)
        runtime.idle()
        assert not reader_threads()
    finally:
        runtime.close()


@pytest.mark.parametrize("reader", ["mmap", "direct"])
def test_embedding_on_disk_is_mapped_not_streamed_tiny_random_llama(tiny_dir: Path,
                                                                     reader: str) -> None:
    """A lookup needs a few rows of the table: the disk-tier embedding is bound to the mapping
    once (zero-copy) instead of streaming the whole table every token."""
    model, runtime = load_streamed(tiny_dir, reader=reader)
    try:
        embed = model.model.embed_tokens
        assert not isinstance(embed, offload.StreamedModule)
        assert in_mapping(embed.weight, runtime)
        assert "model.embed_tokens" not in runtime.streamer.position_of
        assert runtime.stats.bytes_per_token == sum(u.nbytes for u in runtime.streamer.layers)
        # the head still streams (it reads every row), tied to the same bytes or not
        assert isinstance(model.lm_head, offload.StreamedModule)
        reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        assert greedy(model, [7, 300, 2]) == greedy(reference, [7, 300, 2])
    finally:
        runtime.close()


def test_direct_reader_computes_from_slot_buffers_tiny_random_llama(tiny_dir: Path) -> None:
    """reader="direct": streamed weights are read (O_DIRECT) into the preallocated slots and
    computed from there, never from the mapping; outside their turn they are on meta."""
    model, runtime = load_streamed(tiny_dir, reader="direct")
    backend = runtime.streamer.backend
    assert isinstance(backend, backends.DirectBackend)
    slots = [(b.data_ptr(), b.data_ptr() + b.numel()) for b in backend.buffers]
    seen: dict[int, tuple[bool, bool]] = {}

    def record(i: int, module: torch.nn.Module) -> None:
        pointer = module.weight.data_ptr()
        seen[i] = (any(lo <= pointer < hi for lo, hi in slots), in_mapping(module.weight, runtime))

    hooks = [model.model.layers[i].mlp.up_proj.register_forward_pre_hook(
        lambda m, args, i=i: record(i, m)) for i in range(4)]
    try:
        with torch.inference_mode():
            model(torch.tensor([[1, 2, 3]]))
        assert seen[0] == (False, False)  # resident: its own memory
        assert all(seen[i] == (True, False) for i in (1, 2, 3))
        assert all(p.device.type == "meta" for p in model.model.layers[1].parameters())
        assert runtime.live_stats(0.1)["reader"] == "direct"
    finally:
        for hook in hooks:
            hook.remove()
        runtime.close()


def test_reader_auto_and_unknown_reader_tiny_random_llama(tiny_dir: Path) -> None:
    # A few kB of weights stay in the page cache: auto computes from the mapping.
    _model, runtime = load_streamed(tiny_dir, reader="auto")
    try:
        assert runtime.stats.reader == "mmap"
    finally:
        runtime.close()
    gib = 1 << 30
    assert offload.pick_reader("auto", 2 * gib, available=24 * gib, on_gpu=False) == "mmap"
    assert offload.pick_reader("auto", 13 * gib, available=24 * gib, on_gpu=False) == "direct"
    assert offload.pick_reader("mmap", 13 * gib, available=24 * gib, on_gpu=False) == "mmap"
    assert offload.pick_reader("direct", 1, available=24 * gib, on_gpu=False) == "direct"
    assert offload.pick_reader("direct", 1, available=24 * gib, on_gpu=True) == "mmap"
    with pytest.raises(ValueError, match="reader must be one of"):
        load_streamed(tiny_dir, reader="odirect")


def test_warm_mmap_reader_does_not_fault_mapped_layers_again_tiny_random_llama(
        tiny_dir: Path) -> None:
    """release_behind=False: once a layer's pages are mapped and cached, staging it again
    skips MADV_POPULATE_READ (CPU the matmuls want); after an eviction it populates again."""
    model, runtime = load_streamed(tiny_dir, release_behind=False, reader="mmap")
    populated: list[tuple[int, int]] = []

    def counting(populate: Any) -> Any:
        def wrapper(start: int, end: int) -> None:
            populated.append((start, end))
            populate(start, end)
        return wrapper

    for mapped in runtime.checkpoint.files:
        mapped.populate = counting(mapped.populate)  # type: ignore[method-assign]
    try:
        greedy(model, [1, 2, 3], n=3)
        first = len(populated)
        assert first == len(runtime.streamer.layers)  # each streamed module once
        greedy(model, [1, 2, 3], n=3)
        assert len(populated) == first  # all still mapped: nothing populated again
        runtime.evict()
        greedy(model, [1, 2, 3], n=1)
        assert len(populated) > first
    finally:
        runtime.close()


def test_interrupted_forward_resyncs_tiny_random_llama(
        streamed: tuple[Any, offload.OffloadRuntime]) -> None:
    """A forward that dies halfway leaves the cycle mid-model; the next one still works."""
    model, runtime = streamed
    reference = greedy(model, [4, 4, 4], n=4)

    def boom(module: torch.nn.Module, args: Any) -> None:
        raise KeyboardInterrupt

    hook = model.model.layers[2].mlp.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt), torch.inference_mode():
        model(torch.tensor([[4, 4, 4]]))
    hook.remove()
    assert all(p.device.type == "meta" for p in model.model.layers[2].parameters())
    assert greedy(model, [4, 4, 4], n=4) == reference
    assert runtime.stats.resyncs >= 1


def test_cancelled_decode_leaves_no_reader_thread_tiny_random_llama(
        streamed: tuple[Any, offload.OffloadRuntime]) -> None:
    model, runtime = streamed
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    settings = gen.DecodeSettings(max_new_tokens=20)
    steps = gen.decode_n(model, torch.tensor([[1, 2, 3]]), settings, should_stop=stop_after_two)
    with pytest.raises(gen.Cancelled), torch.inference_mode():
        for _ in steps:
            assert reader_threads()  # streaming while generating
    runtime.idle()  # what Engine.generate does on the way out, whatever the outcome
    assert not reader_threads()


def test_even_spread_places_resident_layers_through_the_depth() -> None:
    assert offload.even_spread(8, 2) == [2, 6]
    assert offload.even_spread(10, 0) == []
    assert offload.even_spread(4, 9) == [0, 1, 2, 3]
    spread = offload.even_spread(30, 7)
    assert len(spread) == 7 and max(b - a for a, b in itertools.pairwise(spread)) <= 5


def test_streams_layers_only_when_placement_offloads() -> None:
    assert not offload.streams_layers(None)
    assert not offload.streams_layers({"": "cpu"})
    assert offload.streams_layers({"model.layers.0": "cpu", "model.layers.1": "disk"})
    assert offload.streams_layers({"model.layers.0": "cuda:0", "model.layers.1": "cpu"})


# ---- the KV cache kept across turns ---------------------------------------------------------


def test_conversation_cache_reuses_prefix_and_crops_tiny_random_llama(tiny_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    turn1 = [5, 6, 7, 8]
    kept = ConversationCache()
    cache, reused = kept.take(model, turn1)
    assert reused == 0
    out = greedy_with(model, turn1, cache, reused, kept)
    # turn 2 extends turn 1 + reply: only the new tokens are prefilled
    turn2 = turn1 + out + [9, 10]
    cache, reused = kept.take(model, turn2)
    assert reused == len(turn1) + len(out) - 1  # the last reply token was never fed
    assert greedy_with(model, turn2, cache, reused, kept) == greedy(model, turn2, n=6)
    # an edited conversation: the cache is cropped back to the common prefix
    edited = [*turn2[:3], 99, 98]
    cache, reused = kept.take(model, edited)
    assert reused == 3 and cache.get_seq_length() == 3
    assert greedy_with(model, edited, cache, reused, kept) == greedy(model, edited, n=6)
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2


def greedy_with(model: Any, prompt: list[int], cache: DynamicCache, reused: int,
                kept: ConversationCache) -> list[int]:
    settings = gen.DecodeSettings(max_new_tokens=6)
    with torch.inference_mode():
        out = list(gen.decode_n(model, torch.tensor([prompt[reused:]]), settings, cache=cache,
                                past_length=reused))
    kept.keep(cache, prompt + out)
    return out


# ---- CUDA ----------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_slots_stream_and_match_tiny_random_llama(tiny_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden() -> None:
        raise AssertionError("empty_cache on the hot path")

    monkeypatch.setattr(torch.cuda, "empty_cache", forbidden)
    device = torch.device("cuda:0")
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).to(device)
    prompt = [5, 17, 300, 42, 7]
    expected = greedy(reference.eval(), prompt)
    device_map = {"model.embed_tokens": "cuda:0", "model.layers.0": "cuda:0",
                  "model.layers.1": "cuda:0", "model.layers.2": "cpu", "model.layers.3": "disk",
                  "model.norm": "cuda:0", "model.rotary_emb": "cuda:0", "lm_head": "cuda:0"}
    config = LlamaConfig.from_pretrained(tiny_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    runtime = offload.load_offloaded(model, tiny_dir, device_map, torch.float32, device,
                                     prefetch=1)
    try:
        backend = runtime.streamer.backend
        assert isinstance(backend, backends.CudaBackend) and len(backend.buffers) == 2
        streamed_names = [w.name for w in runtime.streamer.layers]
        assert all(n.startswith("model.layers.") for n in streamed_names)
        pinned = [w for w in runtime.streamer.layers if w.tier == "cpu"]
        assert all(w.pinned is not None and w.pinned.is_pinned() for w in pinned)
        assert greedy(model.eval(), prompt) == expected
        assert runtime.stats.max_held <= 2
    finally:
        runtime.close()

