"""Streaming text out of tokens: UTF-8 splits and stop strings, with the real tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from glmchat.model.textstream import TextStream, held_back, stop_index
from hypothesis import given, settings
from hypothesis import strategies as st


@pytest.fixture(scope="module")
def tokenizer(default_weights_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_weights_dir)


def _decoder(tokenizer):  # type: ignore[no-untyped-def]
    def decode(ids: Sequence[int]) -> str:
        return str(tokenizer.decode(list(ids), skip_special_tokens=True))
    return decode


@pytest.mark.parametrize("text", ["Paris is the capital.", "naïve café — 東京 🚀 ok",
                                  "line one\nline two\n\n  indented"])
def test_streamed_deltas_join_to_the_decoded_text(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(_decoder(tokenizer))
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_never_shown_and_cuts_the_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    text = "First answer. STOP here and more text"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(_decoder(tokenizer), ["STOP"])
    shown = ""
    for token_id in ids:
        shown += stream.push(token_id)
        if stream.stopped:
            break
    shown += stream.flush()
    assert stream.stopped
    assert shown == "First answer. " == stream.text


@given(st.text(max_size=30), st.lists(st.text(min_size=1, max_size=5), max_size=3))
@settings(max_examples=200)
def test_held_back_text_is_a_prefix_of_some_stop(text: str, stops: list[str]) -> None:
    n = held_back(text, stops)
    assert 0 <= n <= len(text)
    if n:
        assert any(s.startswith(text[len(text) - n:]) for s in stops)
    if stop_index(text, stops) is None:
        # nothing shorter than what is held back could still become a stop
        for k in range(n + 1, min(len(text), max((len(s) for s in stops), default=0)) + 1):
            assert not any(s.startswith(text[len(text) - k:]) for s in stops)
