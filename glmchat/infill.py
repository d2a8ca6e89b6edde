"""Infill masks with GLM-130B's semantics: parse a prompt's blanks, splice fills back, style them.

Pure text, no torch: the worker (model/infill.py) and every front end share it.

    [MASK]   a short blank (a few words)
    [sMASK]  a sentence (GLM-130B never trained it: accepted, with a note)
    [gMASK]  long generation

Which masks are blanks follows GLM-130B's generate.py: if the text has ``[MASK]``, those are the
blanks; else ``[sMASK]``; else ``[gMASK]``. Masks of another kind stay in the text, as text. A
raw prompt without any mask is a plain continuation, as if ``[gMASK]`` were appended. Anything
that is not exactly one of the three spellings (``[mask]``, ``[MASK``, ``[ MASK ]``) is text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from glmchat.protocol import Span

MASK = "[MASK]"
SMASK = "[sMASK]"
GMASK = "[gMASK]"
MASK_KINDS: tuple[str, ...] = (MASK, SMASK, GMASK)  # GLM-130B's order of precedence
MASK_PATTERN = re.compile(r"\[(?:MASK|sMASK|gMASK)\]")

SMASK_NOTE = ("[sMASK] (fill a sentence) is accepted, but GLM-130B never trained it; "
              "[MASK] or [gMASK] may fill better")

# How GLM-130B's generate.py prints a filled blank on a terminal.
ANSI_STYLE = {GMASK: ("\033[4m", "\033[0m"),
              MASK: ("\x1b[0;32m\033[4m", "\033[0m\x1b[0m"),
              SMASK: ("\x1b[0;32m\033[4m", "\033[0m\x1b[0m")}
# The same looks as Rich/Textual style strings, for the TUI.
RICH_STYLE = {GMASK: "underline", MASK: "green underline", SMASK: "green underline"}


@dataclass(frozen=True)
class MaskedText:
    """A prompt cut at its blanks: ``segments[i]`` is the text before blank ``i`` and the last
    segment the text after the last blank, so there is one more segment than blanks. Masks of
    the other kinds are inside the segments, as text."""

    segments: tuple[str, ...]
    kind: str | None  # the kind of mask being filled; None: no blank at all
    implicit: bool = False  # raw prompt without masks: [gMASK] appended
    ignored: tuple[tuple[str, int], ...] = ()  # (other mask kind, count) left as text

    @property
    def blanks(self) -> int:
        return len(self.segments) - 1

    @property
    def is_infill(self) -> bool:
        """The prompt has explicit blanks, so it goes down the infill path (raw, no template)."""
        return self.kind is not None and not self.implicit

    def text(self) -> str:
        """The prompt as written (an implicit [gMASK] is not shown)."""
        if self.kind is None or self.implicit:
            return "".join(self.segments)
        return self.kind.join(self.segments)

    def warnings(self) -> list[str]:
        """What the user should know: other masks left as text. (The [sMASK] note is separate
        because it is said only once per session: see ``SMASK_NOTE``.)"""
        out = []
        for other, count in self.ignored:
            times = "once" if count == 1 else f"{count} times"
            out.append(f"{other} appears {times} but stays as text: this prompt's blanks are "
                       f"its {self.kind} masks (GLM-130B fills only one kind: "
                       f"{', then '.join(MASK_KINDS)})")
        return out


def has_masks(text: str) -> bool:
    return MASK_PATTERN.search(text) is not None


def parse_masks(text: str, *, raw: bool = False) -> MaskedText:
    """Cut ``text`` at the blanks GLM-130B would fill. ``raw``: a prompt without masks becomes a
    continuation (one implicit [gMASK] at the end)."""
    counts = {kind: text.count(kind) for kind in MASK_KINDS}
    kind = next((k for k in MASK_KINDS if counts[k]), None)
    if kind is None:
        if raw:
            return MaskedText(segments=(text, ""), kind=GMASK, implicit=True)
        return MaskedText(segments=(text,), kind=None)
    ignored = tuple((k, counts[k]) for k in MASK_KINDS if k != kind and counts[k])
    return MaskedText(segments=tuple(text.split(kind)), kind=kind, ignored=ignored)


def splice(masked: MaskedText, fills: Sequence[str]) -> tuple[str, list[Span]]:
    """The text with the first ``len(fills)`` blanks filled, and where each fill landed. Blanks
    beyond ``fills`` (a cancelled run) stay as their mask, unmarked."""
    if len(fills) > masked.blanks:
        raise ValueError(f"{len(fills)} fills for {masked.blanks} blanks")
    kind = masked.kind or GMASK
    parts: list[str] = []
    spans: list[Span] = []
    at = 0
    for i, segment in enumerate(masked.segments):
        parts.append(segment)
        at += len(segment)
        if i == masked.blanks:
            break
        if i < len(fills):
            parts.append(fills[i])
            spans.append(Span(start=at, end=at + len(fills[i]), mask=kind))
            at += len(fills[i])
        else:
            parts.append(kind)
            at += len(kind)
    return "".join(parts), spans


def unsplice(text: str, spans: Sequence[Span]) -> str:
    """Put the masks back where the spans are: the inverse of ``splice`` for a full result."""
    out: list[str] = []
    at = 0
    for span in sorted(spans, key=lambda s: s.start):
        out.append(text[at:span.start])
        out.append(span.mask)
        at = span.end
    out.append(text[at:])
    return "".join(out)


def _pieces(text: str, spans: Sequence[Span]) -> list[tuple[str, str | None]]:
    """``text`` as (piece, mask kind of the span it is, or None) in order, no empty pieces."""
    out: list[tuple[str, str | None]] = []
    at = 0
    for span in sorted(spans, key=lambda s: s.start):
        if span.start > at:
            out.append((text[at:span.start], None))
        if span.end > max(span.start, at):
            out.append((text[max(span.start, at):span.end], span.mask))
        at = max(at, span.end)
    if at < len(text):
        out.append((text[at:], None))
    return out


def styled_segments(text: str, spans: Sequence[Span]) -> list[tuple[str, str | None]]:
    """``text`` as (piece, style) pairs in order: filled spans carry a Rich style string
    ("underline" for [gMASK], "green underline" for [MASK]/[sMASK]), the rest None. Empty
    pieces are left out. For the TUI: ``Text.assemble(*styled_segments(text, spans))``."""
    return [(piece, None if mask is None else RICH_STYLE.get(mask, "underline"))
            for piece, mask in _pieces(text, spans)]


def ansi(text: str, spans: Sequence[Span]) -> str:
    """``text`` with its filled spans highlighted as GLM-130B prints them on a terminal."""
    out: list[str] = []
    for piece, mask in _pieces(text, spans):
        if mask is None:
            out.append(piece)
        else:
            begin, end = ANSI_STYLE.get(mask, ANSI_STYLE[GMASK])
            out.append(f"{begin}{piece}{end}")
    return "".join(out)
