"""The mask parser and the span helpers (glmchat/infill.py): pure text, no model."""

from __future__ import annotations

import itertools
import re

from hypothesis import given
from hypothesis import strategies as st

from glmchat.infill import (
    ANSI_STYLE,
    GMASK,
    MASK,
    MASK_KINDS,
    SMASK,
    ansi,
    has_masks,
    parse_masks,
    splice,
    styled_segments,
    unsplice,
)
from glmchat.protocol import Span

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def test_mask_wins_over_smask_and_gmask_which_stay_as_text() -> None:
    masked = parse_masks("a [gMASK] b [MASK] c [sMASK] d [MASK] e")
    assert masked.kind == MASK
    assert masked.segments == ("a [gMASK] b ", " c [sMASK] d ", " e")
    assert masked.blanks == 2
    assert dict(masked.ignored) == {SMASK: 1, GMASK: 1}
    warnings = masked.warnings()
    assert len(warnings) == 2 and "[sMASK] appears once but stays as text" in warnings[0]


def test_smask_before_gmask() -> None:
    masked = parse_masks("x [gMASK] y [sMASK]")
    assert masked.kind == SMASK and masked.segments == ("x [gMASK] y ", "")
    assert masked.ignored == ((GMASK, 1),)


def test_gmask_alone() -> None:
    masked = parse_masks("Once upon a time [gMASK]")
    assert masked.kind == GMASK and masked.blanks == 1 and masked.is_infill
    assert masked.warnings() == []


def test_raw_prompt_without_mask_is_a_continuation() -> None:
    masked = parse_masks("Once upon a time", raw=True)
    assert masked.kind == GMASK and masked.implicit and not masked.is_infill
    assert masked.segments == ("Once upon a time", "")
    assert masked.text() == "Once upon a time"


def test_chat_prompt_without_mask_is_not_infill() -> None:
    masked = parse_masks("hello")
    assert masked.kind is None and masked.blanks == 0 and not masked.is_infill


def test_misspelled_and_unbalanced_masks_are_text() -> None:
    for text in ("[mask]", "[MASK", "MASK]", "[ MASK ]", "[Mask]", "[GMASK]", "[smask]",
                 "[[MASK", "MASK", "[gMASK", "[s MASK]"):
        assert not has_masks(text), text
        assert parse_masks(text).kind is None


def test_masks_next_to_each_other_and_at_the_edges() -> None:
    masked = parse_masks("[MASK][MASK]")
    assert masked.segments == ("", "", "")
    text, spans = splice(masked, ["a", "bc"])
    assert text == "abc"
    assert spans == [Span(0, 1, MASK), Span(1, 3, MASK)]


def test_splice_of_a_cancelled_run_keeps_later_masks() -> None:
    masked = parse_masks("A [MASK] B [MASK] C")
    text, spans = splice(masked, ["x"])
    assert text == "A x B [MASK] C"
    assert spans == [Span(2, 3, MASK)]


def test_styled_segments_and_ansi_match_glm130b() -> None:
    text, spans = splice(parse_masks("The capital of France is [MASK]."), ["Paris"])
    assert styled_segments(text, spans) == [("The capital of France is ", None),
                                            ("Paris", "green underline"), (".", None)]
    assert ansi(text, spans) == ("The capital of France is \x1b[0;32m\x1b[4mParis"
                                 "\x1b[0m\x1b[0m.")
    text, spans = splice(parse_masks("Once [gMASK]"), ["upon"])
    assert ansi(text, spans) == "Once \x1b[4mupon\x1b[0m"
    assert ANSI_STYLE[GMASK] == ("\033[4m", "\033[0m")


# ---- properties ------------------------------------------------------------------------------

pieces = st.one_of(
    st.text(alphabet="abc [] MASKgs\n", max_size=8),
    st.sampled_from([*MASK_KINDS, "[mask]", "[MASK", "MASK]", "[sMASK", "[g MASK]"]),
)
prompts = st.lists(pieces, max_size=12).map("".join)
fill_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=10)


@given(prompts)
def test_parse_round_trips_the_text(text: str) -> None:
    masked = parse_masks(text)
    assert masked.text() == text
    if masked.kind is not None:
        assert masked.blanks == text.count(masked.kind)
        earlier = MASK_KINDS[:MASK_KINDS.index(masked.kind)]
        assert all(k not in text for k in earlier)  # GLM-130B's precedence
        assert all(masked.kind not in segment for segment in masked.segments)
    else:
        assert not has_masks(text)


@given(prompts, st.data())
def test_splice_puts_each_fill_at_its_span(text: str, data: st.DataObject) -> None:
    masked = parse_masks(text)
    fills = data.draw(st.lists(fill_text, min_size=masked.blanks, max_size=masked.blanks))
    result, spans = splice(masked, fills)
    assert [result[s.start:s.end] for s in spans] == fills
    assert all(s.mask == masked.kind for s in spans)
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))
    assert unsplice(result, spans) == text
    assert "".join(piece for piece, _ in styled_segments(result, spans)) == result
    assert ANSI_ESCAPE.sub("", ansi(result, spans)) == result or ANSI_ESCAPE.search(result)


@given(prompts)
def test_raw_parse_always_has_a_blank(text: str) -> None:
    masked = parse_masks(text, raw=True)
    assert masked.kind is not None and masked.blanks >= 1
    assert masked.text() == text
