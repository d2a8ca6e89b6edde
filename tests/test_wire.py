"""glmchat.wire: every protocol event and request survives JSON and back, equal to itself."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from glmchat import protocol as p
from glmchat import wire
from glmchat.params import GenerationParams

INFO = p.ModelInfo(name="SmolLM2", source="default", weights_dir="/c/w", digest="ab" * 32,
                   architecture="LlamaForCausalLM", n_params=134_515_008, dtype="float32",
                   n_layers=30, context_length=8192, has_chat_template=True,
                   eos_token_ids=[2, 0])
PLACEMENT = p.Placement(device_map={"model.embed_tokens": "cpu", "model.layers.0": "disk"},
                        layers_per_tier={"cpu": 29, "disk": 1},
                        bytes_per_tier={"cpu": 10_000, "disk": 500}, n_layers=30,
                        runtime="glmchat", gpu_available=False)
PARAMS = GenerationParams(strategy="beam", num_beams=3, num_return_sequences=2,
                          stop=["\n\n", "END"], seed=7, temperature=0.5)
RESULT = p.GenerationResult(
    text="Paris is", token_ids=[42, 7], prompt_token_ids=[1, 2, 3], finish_reason="cancelled",
    strategy="beam", seed=None, params=PARAMS,
    timings=p.Timings(prefill_tokens=3, prefill_s=0.01, ttft_s=0.02, decode_tokens=1),
    beams=[p.Beam(text="Paris is", token_ids=[42, 7], score=-0.25),
           p.Beam(text="Lyon", token_ids=[9], score=float("nan"))],
    spans=[p.Span(start=0, end=5, mask="[MASK]", score=-1.5), p.Span(1, 2, "[gMASK]")],
    notes=["one note"])

EVENTS: list[object] = [
    p.Ready(pid=123, versions={"torch": "2.13.0"}),
    p.LoadProgress(done=1, total=4, what="reading config"),
    p.Loaded(info=INFO, placement=PLACEMENT, load_s=1.5),
    p.Token(id="g1", text="é\n\"quoted\"", token_id=17),
    p.Token(id="g1", text="Paris is", token_id=7, provisional=True),
    p.StepStats(id="g1", new_tokens=5, decode_tokens_per_s=12.5, prefill_tokens_per_s=300.0,
                ttft_s=0.1, step_s=0.08, extra={"streamed_bytes": 10, "hit": [1, 2.5]}),
    p.Memory(devices=[p.DeviceMemory(name="cuda:0 (H100)", used=1, total=2)], cpu_rss=3,
             disk_bytes=4, gpu_available=True, note="n"),
    p.Finished(id="g1", result=RESULT),
    p.Failed(id=None, error="bad model", usage=True),
    p.Failed(id="g2", error="boom"),
]
REQUESTS: list[object] = [
    p.Load(spec=p.ModelSpec(path="/m", gpu_memory=1.5, cpu_memory=None, threads=2)),
    p.Generate(id="g3", params=PARAMS, prompt="", raw=True,
               messages=[p.ChatMessage("system", "be brief"), p.ChatMessage("user", "hi")]),
    p.Cancel(id="g3"),
    p.GetStats(),
    p.Shutdown(),
]


def _same(a: object, b: object) -> bool:
    """Equality that counts NaN == NaN (a cancelled beam's score)."""
    return json.dumps(wire.to_wire(a), sort_keys=True) == json.dumps(wire.to_wire(b),
                                                                     sort_keys=True)


def test_every_event_and_request_type_is_covered() -> None:
    assert {type(e) for e in EVENTS} == set(wire.EVENT_TYPES)
    assert {type(r) for r in REQUESTS} == set(wire.REQUEST_TYPES)


@pytest.mark.parametrize("obj", EVENTS + REQUESTS, ids=lambda o: type(o).__name__)
def test_round_trip(obj: object) -> None:
    line = wire.dumps(obj)
    assert "\n" not in line
    back = wire.loads(line)
    assert type(back) is type(obj)
    assert _same(back, obj)
    if not isinstance(obj, p.Finished):  # NaN != NaN inside the beams
        assert back == obj
    # nested records come back as their own classes, not dicts
    for f in dataclasses.fields(back):
        value = getattr(back, f.name)
        original = getattr(obj, f.name)
        if dataclasses.is_dataclass(original):
            assert type(value) is type(original)


def test_non_finite_floats_are_valid_json() -> None:
    line = wire.dumps(p.Finished(id="g1", result=RESULT))
    json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    back = wire.loads(line)
    assert math.isnan(back.result.beams[1].score)


def test_expected_type_is_enforced() -> None:
    line = wire.dumps(p.Cancel(id="g1"))
    with pytest.raises(wire.WireError, match="expected a Generate"):
        wire.loads(line, p.Generate)
    assert wire.loads(line, p.Cancel) == p.Cancel(id="g1")


@pytest.mark.parametrize("bad", [
    "not json", "[]", '{"type": "os.system"}', '{"type": "Token", "id": "g", "text": 3, '
    '"token_id": 1}', '{"type": "Token", "id": "g", "text": "x"}',
    '{"type": "Token", "id": "g", "text": "x", "token_id": true}',
    '{"type": "Loaded", "info": {"type": "Span"}, "placement": null, "load_s": 1}',
])
def test_malformed_messages_are_refused(bad: str) -> None:
    with pytest.raises(wire.WireError):
        wire.loads(bad)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    value = wire.to_wire(p.Token(id="g", text="x", token_id=1))
    value["logprob"] = -0.5
    assert wire.from_wire(value) == p.Token(id="g", text="x", token_id=1)
