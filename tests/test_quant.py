"""Weight-only int8/int4 quantization (model/quant.py, model/qlinear.py): quality on the
embedded model, streamed = resident, the cache (made once, checked, rebuilt), bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from glmchat.bench import quality
from glmchat.model import quant
from glmchat.model.engine import Engine

from glmchat.errors import UsageError
from glmchat.protocol import ModelSpec
from tests.conftest import run_cli

pytestmark = pytest.mark.slow  # loads the embedded model (about 6 min under a load of 8, 2 cores)

ALL_ON_DISK = 0.0001  # GiB: every layer streams
SCORED_TOKENS = 1024  # of the text's ~2 400 (the README's table scores all of it); 2 chunks
# A random Llama whose shapes the kernels only partly take: K = 80 is not a multiple of 32,
# k/v_proj have N = 40 (int4 wants multiples of 16); only down_proj (K = 128) is quantized.
ODD = {"hidden": 80, "intermediate": 128, "layers": 2, "heads": 4, "kv_heads": 2}


def _engine(spec: ModelSpec) -> Any:
    events: list[Any] = []
    engine = Engine(events.append)
    engine.load(spec)
    engine.events = events  # type: ignore[attr-defined]
    return engine


def _greedy(model: Any, ids: list[int], n: int) -> list[int]:
    from glmchat.model import generate as gen
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        prompt = torch.tensor([ids])
        token = torch.argmax(gen.prefill(model, prompt, cache), dim=-1)
        out = [int(token[0])]
        for step in range(n - 1):
            token = torch.argmax(gen.decode_one(model, token, cache, len(ids) + step), dim=-1)
            out.append(int(token[0]))
    return out


# ---- quality on the embedded model ----------------------------------------------------------


@pytest.fixture(scope="module")
def resident(isolated_xdg: Path) -> dict[str, Any]:
    """The embedded model resident: full width, int8, int4 g32."""
    return {"none": _engine(ModelSpec()), "int8": _engine(ModelSpec(quantize="int8")),
            "int4": _engine(ModelSpec(quantize="int4", quant_group=32))}


@pytest.fixture(scope="module")
def scored(resident: dict[str, Any]) -> Iterator[dict[str, quality.Score]]:
    full, int8, int4 = resident["none"], resident["int8"], resident["int4"]
    ids = quality.token_ids(full.loaded.tokenizer, quality.TEXT.read_text())
    assert 2000 <= len(ids) <= 4000  # the shipped text: a few thousand tokens
    scores = quality.compare(full.loaded.model, {"int8": int8.loaded.model,
                                                 "int4-g32": int4.loaded.model},
                             ids[:SCORED_TOKENS], 512)
    yield {s.name: s for s in scores}


def test_int4_g32_is_within_one_percent_of_full_width(scored: dict[str, quality.Score]) -> None:
    # measured here on these 1024 tokens: -0.12 % perplexity, 96.9 % top-1, KL 0.0020 with the
    # int8 head (quant.HEAD_SCHEME); -0.13 %, 98.8 %, 0.0007 when the head stayed full width.
    # The int4 layers are near exact (the weights came from Q4_1 blocks); the ~2 points of
    # top-1 are the int8 head's, so the bound sits between the int8 bound and the old one.
    base, got = scored["none"].ppl, scored["int4-g32"]
    assert abs(got.ppl / base - 1) <= 0.01
    assert got.top1 >= 0.96
    assert got.kl < 0.005


def test_int8_is_within_one_and_a_half_percent(scored: dict[str, quality.Score]) -> None:
    # measured here on these 1024 tokens: +0.16 % perplexity, 95.5 % top-1, KL 0.0046 with the
    # int8 head; +0.28 %, 97.6 %, 0.0031 when the head stayed full width
    base, got = scored["none"].ppl, scored["int8"]
    assert abs(got.ppl / base - 1) <= 0.015
    assert got.top1 >= 0.94
    assert got.kl < 0.01


# ---- streamed = resident, bytes, panels ------------------------------------------------------


@pytest.mark.parametrize(("scheme", "reader"), [("int8", "mmap"), ("int4", "direct")])
def test_streamed_and_resident_runs_of_a_scheme_give_identical_tokens(
        resident: dict[str, Any], scheme: str, reader: str) -> None:
    kept = resident[scheme]
    streamed = _engine(ModelSpec(quantize=scheme, cpu_memory=ALL_ON_DISK,
                                 offload_reader=reader))
    assert kept.loaded.placement.runtime == "resident"
    assert streamed.loaded.offload.stats.streamed_layers == 30
    # The head too: a quantized copy of the tied embedding, streamed like the layers.
    from glmchat.model.qlinear import QLinear

    assert isinstance(kept.loaded.model.lm_head, QLinear)
    assert kept.loaded.model.lm_head.scheme == "int8"  # int4 models too (quant.HEAD_SCHEME)
    assert kept.loaded.model.lm_head.weight.dtype == torch.int8
    assert "lm_head" in [u.name for u in streamed.loaded.offload.streamer.layers]
    assert kept.loaded.model.get_input_embeddings().weight.dtype == torch.float32
    assert streamed.loaded.offload.stats.reader == reader
    ids = kept.loaded.tokenizer("The lighthouse keeper climbed the stairs")["input_ids"]
    want = _greedy(kept.loaded.model, ids, 8)
    assert _greedy(streamed.loaded.model, ids, 8) == want
    streamed.loaded.offload.close()


def test_placement_counts_the_quantized_bytes_and_the_panels_show_the_scheme(
        isolated_xdg: Path) -> None:
    full = _engine(ModelSpec(cpu_memory=ALL_ON_DISK))
    int4 = _engine(ModelSpec(quantize="int4", cpu_memory=ALL_ON_DISK))
    full_bytes = sum(full.loaded.placement.bytes_per_tier.values())
    int4_bytes = sum(int4.loaded.placement.bytes_per_tier.values())
    # fp32 linears (106 M weights, 4 bytes) become 0.5 + 0.125 bytes a weight; the head
    # (49152 x 576, tied: streamed in fp32 beside the mapped table at full width) becomes an
    # int8 copy (1 byte a weight + a bf16 scale a row), the fp32 table staying for lookup.
    linears, head = 106_168_320, 49152 * 576
    saved = linears * (4 - 0.625) + head * (4 - 1)
    assert full_bytes - int4_bytes == pytest.approx(saved, rel=0.01)
    stats = int4.loaded.offload.live_stats(0.1)
    assert stats["quantize"] == "int4-g32"
    # Streamed per token: the layers and the head (the table is mapped: a lookup reads rows).
    assert stats["bytes_streamed_per_token"] == pytest.approx(
        full.loaded.offload.stats.bytes_per_token - saved, rel=0.01)
    assert int4.loaded.info.quantize == int4.loaded.placement.quantize == "int4-g32"
    assert int4.loaded.info.n_params == full.loaded.info.n_params
    from glmchat.tui.format import streaming_summary

    assert "int4-g32 weights" in streaming_summary(stats)
    for engine in (full, int4):
        engine.loaded.offload.close()


# ---- the cache and bad input (a random model with odd shapes) ------------------------------


@pytest.fixture(scope="module")
def odd_model_dir(isolated_xdg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from glmchat.bench.make_model import Shape, default_tokenizer_dir, write_model

    out = tmp_path_factory.mktemp("odd-random-llama")
    write_model(out, Shape(**ODD, vocab=49152), "float32", default_tokenizer_dir())
    return out


@pytest.fixture()
def odd_model(odd_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The odd-shaped model, with a cache of its own (each test starts without a copy)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return odd_model_dir


def _prepare(model: Path, scheme: str, group: int = 32) -> quant.QuantResult:
    from glmchat.model.sources import resolve

    resolved = resolve(str(model))
    result = quant.prepare(resolved.weights_dir, resolved.digest, scheme, group,
                           lambda done, total, what: None)
    assert result is not None
    return result


def test_shapes_the_kernel_cannot_take_stay_full_width_with_a_note(odd_model: Path) -> None:
    result = _prepare(odd_model, "int4")
    assert any("k_proj" in f and "multiple of 32" in f for f in result.fallbacks)
    assert not any("down_proj" in f for f in result.fallbacks)
    assert any(f.startswith("lm_head.weight [49152, 80]") for f in result.fallbacks)
    engine = _engine(ModelSpec(path=str(odd_model), quantize="int4"))
    notes = [e.what for e in engine.events if getattr(e, "what", "").startswith("note:")]
    assert any("kept at full width" in n and "q_proj" in n for n in notes)
    full = _engine(ModelSpec(path=str(odd_model)))
    ids = [1, 400, 2000, 17, 9000, 31]
    with torch.inference_mode():
        got = engine.loaded.model(torch.tensor([ids])).logits
        want = full.loaded.model(torch.tensor([ids])).logits
    assert quant.relative_error(got, want) < 0.05  # only down_proj is int4


def test_a_corrupt_quantized_cache_is_rebuilt(odd_model: Path) -> None:
    first = _prepare(odd_model, "int8")
    layer = first.quant_dir / "layer-00001.safetensors"
    with layer.open("r+b") as f:
        f.truncate(layer.stat().st_size - 100)
    again = _prepare(odd_model, "int8")
    assert any("corrupt" in n and "rebuilt" in n for n in again.notes)
    assert _prepare(odd_model, "int8").notes == []  # and sound from then on
    (again.quant_dir / quant.MARKER).write_text("{not json")  # an unreadable marker
    assert any("unreadable" in n and "rebuilt" in n for n in _prepare(odd_model, "int8").notes)


def test_a_packed_int4_copy_that_does_not_match_is_packed_again(odd_model: Path) -> None:
    result = _prepare(odd_model, "int4")
    assert result.runtime_dir.name == quant.packed_key()
    assert torch.__version__ in quant.packed_key()
    assert torch.backends.cpu.get_cpu_capability() in quant.packed_key()
    # Scramble the first quantized matrix's packed bytes in place (same size, sound header),
    # as a copy packed for another CPU capability would be.
    path = result.runtime_dir / "layer-00000.safetensors"
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    start, end = header["model.layers.0.mlp.down_proj.weight"]["data_offsets"]
    data = bytearray(path.read_bytes())
    base = 8 + header_len
    data[base + start:base + end] = bytes(reversed(data[base + start:base + end]))
    path.write_bytes(bytes(data))
    again = _prepare(odd_model, "int4")
    assert any("did not match" in n and "packed it again" in n for n in again.notes)
    assert quant.verify_packed(again.quant_dir, again.runtime_dir, 32) < quant.CHECK_TOLERANCE


def test_unknown_scheme_and_group_are_one_line_usage_errors(isolated_xdg: Path) -> None:
    with pytest.raises(UsageError, match="unknown quantization scheme 'int3'"):
        quant.check_scheme("int3", 32)
    with pytest.raises(UsageError, match="group size 48"):
        quant.check_scheme("int4", 48)
    for flags in (["--quantize", "int3"], ["--quant-group", "48"]):
        done = run_cli(*flags, "hello")
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("glmchat: error: ")


def test_the_aligned_writer_gives_64_byte_aligned_tensors_safetensors_can_read(
        tmp_path: Path) -> None:
    from glmchat.model.mapped import MappedCheckpoint
    from safetensors.torch import load_file

    tensors = {"a": torch.arange(3, dtype=torch.int8), "b": torch.randn(5, 7),
               "c": torch.randn(2).bfloat16()}
    quant.save_aligned(tensors, tmp_path / "x.safetensors", {"format": "pt"})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor)
    checkpoint = MappedCheckpoint.open(tmp_path)
    try:
        for key in tensors:
            assert checkpoint.locations[key].start % quant.ALIGN == 0
            assert checkpoint.view(key).data_ptr() % quant.ALIGN == 0
    finally:
        checkpoint.close()


def test_sessions_record_the_scheme_and_replay_uses_it(isolated_xdg: Path) -> None:
    from glmchat.sessions.domain import ModelRecord
    from glmchat.sessions.records import _model_from, _model_to_record
    from glmchat.sessions.replay import model_spec

    from glmchat.config import load_config

    record = ModelRecord(name="m", source="default", digest="d", dtype="float32",
                         quantize="int4-g64")
    assert _model_from(json.loads(json.dumps(_model_to_record(record)))) == record
    spec = model_spec(load_config(), record, path_typed=False, dtype_typed=False)
    assert (spec.quantize, spec.quant_group) == ("int4", 64)
    typed = load_config(overrides={"model": {"quantize": "int8"}})
    spec = model_spec(typed, record, False, False, quantize_typed=True)
    assert spec.quantize == "int8"
    old = _model_from({"name": "m", "source": "default"})  # sessions from before: full width
    assert model_spec(load_config(), old, False, False).quantize == "none"


def test_int4_on_a_gpu_is_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="int4 is not supported on a GPU"):
        quant.prepare(tmp_path, "0" * 64, "int4", 32, lambda d, t, w: None, "cuda")


def test_a_quantized_tied_head_sends_the_lookup_table_to_disk_first(
        resident: dict[str, Any]) -> None:
    """Placement of the embedded model's int4 copy under 0.08 GiB, less than its fp32 table
    (113 MB): accelerate's placement, filling RAM in module order, would send the table and so
    every layer after it to disk; with the table (lookup only, mapped) on disk first, layers
    take the RAM."""
    from accelerate import init_empty_weights
    from glmchat.model import placement as place
    from glmchat.model.qlinear import lookup_on_disk, swap_linears
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(resident["int4"].loaded.info.weights_dir)
    config = AutoConfig.from_pretrained(directory)
    assert config.tie_word_embeddings is False and config.glmchat_untied_head == "lm_head"

    def layers_in_ram(lookup: bool) -> tuple[int, str]:
        with init_empty_weights():
            meta = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        swap_linears(meta, directory, "int4", 32)
        assert lookup_on_disk(meta, directory, torch.float32)
        device_map = place.compute_device_map(meta, ModelSpec(cpu_memory=0.08),
                                              torch.float32, lookup)
        assert device_map is not None
        layers = sum(tier == "cpu" for name, tier in device_map.items()
                     if name.startswith("model.layers."))
        return layers, device_map.get("model.embed_tokens", "?")

    plain, _table = layers_in_ram(False)
    more, table = layers_in_ram(True)
    assert table == "disk"
    assert more > plain
