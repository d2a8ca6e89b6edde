"""glmchat serve's OpenAI request mapping, without a server: OpenAI's and vLLM's field names
become GenerationParams, and what cannot be honoured is refused with the right status."""

from __future__ import annotations

from typing import Any

import pytest

from glmchat.protocol import ChatMessage
from glmchat.serve_openai import ApiError, Limits, ParsedRequest, parse_request

MODELS = ("SmolLM2-135M-Instruct", "default")


def parse(chat: bool = True, **body: Any) -> ParsedRequest:
    if chat:
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
    else:
        body.setdefault("prompt", "hi")
    return parse_request(body, chat=chat, model_ids=MODELS, limits=Limits(max_tokens=100))


def test_openai_defaults_and_greedy_at_temperature_zero() -> None:
    p = parse()
    assert p.params.strategy == "sample" and p.params.temperature == 1.0
    assert p.params.top_p == 1.0 and p.params.top_k == 0 and p.params.max_new_tokens == 100
    assert parse(temperature=0).params.strategy == "greedy"


def test_vllm_names_map_onto_our_params() -> None:
    p = parse(chat=False, max_tokens=9, min_tokens=3, top_k=-1, top_p=0.5, seed=7, stop="END",
              temperature=0.3, return_token_ids=True, stream=True,
              stream_options={"include_usage": True})
    assert (p.params.max_new_tokens, p.params.min_new_tokens, p.params.top_k) == (9, 3, 0)
    assert (p.params.top_p, p.params.seed, p.params.stop) == (0.5, 7, ["END"])
    assert p.return_token_ids and p.stream and p.include_usage and p.prompt == "hi"
    beam = parse(use_beam_search=True, n=2, best_of=5, length_penalty=0.5)
    assert beam.beam and beam.params.num_beams == 5 and beam.params.num_return_sequences == 2
    assert beam.params.length_penalty == 0.5
    assert parse(max_completion_tokens=4, max_tokens=50).params.max_new_tokens == 4


def test_messages_roles_and_text_parts() -> None:
    p = parse(messages=[{"role": "developer", "content": "be brief"},
                        {"role": "user", "content": [{"type": "text", "text": "a"},
                                                     {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": None}])
    assert p.messages == [ChatMessage("system", "be brief"), ChatMessage("user", "ab"),
                          ChatMessage("assistant", "")]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "gpt-4o"}, 404, "model"),
    ({"max_tokens": 101}, 400, "max_tokens"),
    ({"n": 17}, 400, "n"),
    ({"temperature": 3}, 400, "temperature"),
    ({"temperature": "hot"}, 422, "temperature"),
    ({"stream": "yes"}, 422, "stream"),
    ({"stop": ["ok", ""]}, 422, "stop"),
    ({"logprobs": True}, 422, "logprobs"),
    ({"tools": [{"type": "function"}]}, 422, "tools"),
    ({"presence_penalty": 0.5}, 422, "presence_penalty"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 422, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 422, "messages"),
    ({"min_tokens": 200, "max_tokens": 50}, 422, None),
])
def test_refusals(body: dict[str, Any], status: int, param: str | None) -> None:
    with pytest.raises(ApiError) as caught:
        parse(**body)
    assert caught.value.status == status and caught.value.param == param
    assert set(caught.value.body()["error"]) == {"message", "type", "param", "code"}


def test_harmless_fields_are_accepted() -> None:
    p = parse(user="me", response_format={"type": "text"}, logprobs=False,
              presence_penalty=0, model="default")
    assert p.model == "default"
    with pytest.raises(ApiError):
        parse_request([], chat=True, model_ids=MODELS, limits=Limits())
