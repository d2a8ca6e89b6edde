"""Infill on the embedded model (SmolLM2-135M: no FIM tokens, so the re-ranking strategy), in
one in-process engine, and through the real CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from glmchat.model import fill, infill, rerank
from glmchat.model.engine import Engine

from glmchat.errors import UsageError
from glmchat.infill import MASK
from glmchat.params import GenerationParams
from glmchat.protocol import ChatMessage, Event, Generate, GenerationResult, ModelSpec, Token
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

FACT = "The capital of France is [MASK]."
TWO_BLANKS = "Water freezes at zero degrees [MASK]. It boils at one hundred degrees [MASK]."


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)

    def streamed(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Token))


@pytest.fixture(scope="module")
def engine() -> Iterator[tuple[Engine, Recorder]]:
    recorder = Recorder()
    engine = Engine(recorder)
    engine.load(ModelSpec())
    yield engine, recorder


def generate(engine: tuple[Engine, Recorder], prompt: str = "", *,
             messages: list[ChatMessage] | None = None, **params: Any) -> GenerationResult:
    eng, recorder = engine
    recorder.events.clear()
    request = Generate(id="t", params=GenerationParams(**params), prompt=prompt,
                       messages=messages or [])
    return eng.generate(request, lambda: False)


def test_factual_blank_in_a_chat_turn_is_filled_raw(engine: tuple[Engine, Recorder]) -> None:
    result = generate(engine, messages=[ChatMessage("user", FACT)])
    assert result.text == "The capital of France is Paris."
    (span,) = result.spans
    assert (span.start, span.end, span.mask) == (25, 30, MASK)
    assert span.score is not None and -3 < span.score < 0
    assert result.finish_reason == "stop"
    assert engine[1].streamed() == result.text  # what streamed is the result
    assert result.notes == []


def test_two_blanks_are_filled_left_to_right(engine: tuple[Engine, Recorder],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    blanks: list[fill.Blank] = []
    real = infill.RerankStrategy.fill

    def spy(self: infill.RerankStrategy, ctx: fill.FillContext,
            blank: fill.Blank) -> fill.Filled:
        blanks.append(blank)
        return real(self, ctx, blank)

    monkeypatch.setattr(infill.RerankStrategy, "fill", spy)
    result = generate(engine, TWO_BLANKS)
    assert result.text == ("Water freezes at zero degrees Celsius. "
                           "It boils at one hundred degrees Celsius.")
    assert [result.text[s.start:s.end] for s in result.spans] == ["Celsius", "Celsius"]
    first, second = blanks
    assert first.prefix == "Water freezes at zero degrees "
    assert first.suffix == ". It boils at one hundred degrees [MASK]."  # later: still masked
    assert second.prefix == "Water freezes at zero degrees Celsius. It boils at one hundred " \
                            "degrees "  # earlier: filled
    assert engine[1].streamed() == result.text


def test_reranker_prefers_the_fill_that_fits_the_suffix(
        engine: tuple[Engine, Recorder]) -> None:
    loaded = engine[0].loaded
    assert loaded is not None

    def encode(text: str) -> list[int]:
        return list(loaded.tokenizer(text)["input_ids"])

    prefix, suffix = "My favourite city is", ", the capital of Italy."
    prefix_ids = encode(prefix)
    candidates = [" Paris", " Rome"]
    with torch.inference_mode():
        prefilled = rerank.prefill_prefix(loaded.model, prefix_ids)
        alone = rerank.score_continuations(loaded.model, prefilled, [
            rerank.continuation_ids(encode, prefix, prefix_ids, c) for c in candidates], 2)
        fitted = rerank.score_continuations(loaded.model, prefilled, [
            rerank.continuation_ids(encode, prefix, prefix_ids, c + suffix)
            for c in candidates], 2)
    assert alone[0] > alone[1]  # from the prefix alone the model would say Paris...
    assert fitted[1] > fitted[0] + 2  # ...with the suffix in view, Rome wins clearly


def test_beam_infill_returns_n_ranked_fills(engine: tuple[Engine, Recorder]) -> None:
    result = generate(engine, FACT, strategy="beam", num_beams=4, num_return_sequences=3)
    assert result.text == "The capital of France is Paris."
    assert len(result.beams) == 3
    assert result.beams[0].text == result.text
    scores = [b.score for b in result.beams]
    assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
    assert len({b.text for b in result.beams}) == 3
    assert all(b.text.startswith("The capital of France is ") and b.text.endswith(".")
               for b in result.beams)


def test_gmask_at_the_end_streams_a_continuation(engine: tuple[Engine, Recorder]) -> None:
    result = generate(engine, "Once upon a time [gMASK]", max_new_tokens=6)
    (span,) = result.spans
    assert span.start == len("Once upon a time ") and span.end == len(result.text)
    assert result.text[span.start].strip()  # the fill starts a new word, no double space
    assert result.finish_reason == "length" and len(result.token_ids) == 6
    tokens = [e for e in engine[1].events if isinstance(e, Token)]
    assert len(tokens) > 2  # streamed as generated, not in one piece
    assert engine[1].streamed() == result.text


def test_sampled_infill_is_reproducible_with_a_seed(engine: tuple[Engine, Recorder]) -> None:
    one = generate(engine, FACT, strategy="sample", seed=7, num_beams=2)
    two = generate(engine, FACT, strategy="sample", seed=7, num_beams=2)
    assert one.text == two.text and one.seed == 7


def test_a_prompt_that_is_only_a_mask_is_filled_from_the_start(
        engine: tuple[Engine, Recorder]) -> None:
    result = generate(engine, "[MASK]", max_new_tokens=4)
    (span,) = result.spans
    assert (span.start, span.end) == (0, len(result.text)) and result.text


def test_cancel_keeps_unfilled_blanks_as_masks(engine: tuple[Engine, Recorder]) -> None:
    eng, _ = engine
    result = eng.generate(Generate(id="c", params=GenerationParams(), prompt=TWO_BLANKS),
                          lambda: True)
    assert result.finish_reason == "cancelled"
    assert result.text == TWO_BLANKS and result.spans == []


def test_too_few_new_tokens_for_the_blanks_is_a_usage_error(
        engine: tuple[Engine, Recorder]) -> None:
    with pytest.raises(UsageError, match="allow at least one token per blank"):
        generate(engine, TWO_BLANKS, max_new_tokens=1)


def test_masks_beyond_the_context_length_are_a_usage_error(
        engine: tuple[Engine, Recorder]) -> None:
    with pytest.raises(UsageError, match="reads at most 8192 tokens"):
        generate(engine, "word " * 9000 + "[MASK].")


# ---- the real CLI ---------------------------------------------------------------------------


def test_cli_json_lists_spans_with_offsets() -> None:
    done = run_cli("--json", FACT)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["text"] == "The capital of France is Paris."
    (span,) = record["spans"]
    assert (span["start"], span["end"], span["mask"]) == (25, 30, "[MASK]")
    assert record["text"][span["start"]:span["end"]] == "Paris"
    assert record["notes"] == []


def test_cli_color_highlights_the_fill_as_glm130b_does() -> None:
    done = run_cli("--color", FACT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "The capital of France is \x1b[0;32m\x1b[4mParis\x1b[0m\x1b[0m.\n"


def test_cli_pipe_is_plain_text_and_warns_about_other_masks() -> None:
    done = run_cli("--max-new-tokens", "4", input="Paris is in [MASK]. See [gMASK].\n")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert done.stdout.startswith("Paris is in ") and done.stdout.endswith(". See [gMASK].\n")
    assert "note: [gMASK] appears once but stays as text" in done.stderr
