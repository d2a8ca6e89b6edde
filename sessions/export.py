"""A session as text: Markdown transcript, JSON document, and the summary `sessions show` prints.

Markdown marks what plain chat logs lose: ⟦…⟧ around text filled in for a [MASK], the other
beams of a beam-search reply with their scores, and turns that an edit or a regeneration
replaced (they stay in the file; the transcript follows the active branch).
"""

from __future__ import annotations

import json
import math
from typing import Any

from .domain import AssistantTurn, Session, Turn, UserTurn
from .records import event_to_record, header_to_record

SPAN_OPEN, SPAN_CLOSE = "⟦", "⟧"


def mark_spans(turn: AssistantTurn) -> str:
    """The reply with each infilled span wrapped in ⟦ ⟧."""
    text, out, at = turn.text, [], 0
    for span in sorted(turn.spans, key=lambda s: s.start):
        if not at <= span.start <= span.end <= len(text):
            continue
        out += [text[at:span.start], SPAN_OPEN, text[span.start:span.end], SPAN_CLOSE]
        at = span.end
    out.append(text[at:])
    return "".join(out)


def stats(turn: AssistantTurn) -> str:
    if not turn.generated:
        return "typed by hand"
    t = turn.timings
    parts = [f"{len(turn.token_ids)} tokens", turn.strategy]
    if turn.strategy == "sample":
        parts.append(f"seed {turn.seed}, temperature {turn.params.temperature:g}, "
                     f"top-k {turn.params.top_k}, top-p {turn.params.top_p:g}")
    elif turn.strategy == "beam":
        parts.append(f"{turn.params.num_beams} beams")
    parts += [f"{t.decode_tokens_per_s:.1f} tok/s", f"TTFT {t.ttft_s:.2f}s",
              f"stop: {turn.finish_reason}"]
    return ", ".join(parts)


def _score(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _replaced_note(session: Session, turn: Turn) -> str:
    others = session.alternatives(turn)
    if not others:
        return ""
    what = "edited prompt" if isinstance(turn, UserTurn) else "reply"
    return f"*({len(others)} other version{'s' if len(others) > 1 else ''} of this {what} " \
           "in the session file)*"


def to_markdown(session: Session) -> str:
    header = session.header
    model = header.model
    lines = [f"# glmchat session {header.id}", "",
             f"- started: {header.created}",
             f"- model: {model.name} ({model.source}, {model.dtype}, digest "
             f"{model.digest[:12] or 'unknown'})"
             + (f" served by {model.backend}" if model.backend else ""),
             f"- glmchat {header.glmchat_version}, session format {header.format_version}"]
    if header.placement is not None:
        tiers = ", ".join(f"{n} on {tier}" for tier, n in
                          sorted(header.placement.layers_per_tier.items()))
        lines.append(f"- layers: {tiers} ({header.placement.runtime})")
    replies = [t for t in session.assistant_turns() if t.generated]
    lines.append(f"- {len(session.user_turns())} prompts, {len(replies)} replies, "
                 f"{sum(len(t.token_ids) for t in replies)} tokens generated")
    settings = session.settings()
    if settings:
        lines.append("- settings changed: " + ", ".join(f"{k} = {v!r}"
                                                       for k, v in settings.items()))
    branch = session.branch()
    if any(isinstance(t, AssistantTurn) and t.spans for t in branch):
        lines.append(f"- {SPAN_OPEN} {SPAN_CLOSE} marks text filled in for a mask")
    for turn in branch:
        lines.append("")
        note = _replaced_note(session, turn)
        if isinstance(turn, UserTurn):
            lines += ["## User", "", turn.content]
        else:
            lines += ["## Assistant", "", mark_spans(turn), "", f"*{stats(turn)}*"]
            lines += _beams_markdown(session, turn)
        if note:
            lines += ["", note]
    return "\n".join(lines) + "\n"


def _beams_markdown(session: Session, turn: AssistantTurn) -> list[str]:
    if len(turn.beams) < 2:
        return []
    chosen = session.chosen_beam(turn)
    out = ["", "Beams:", ""]
    for i, beam in enumerate(turn.beams):
        mark = " (chosen)" if i == chosen else ""
        quoted = beam.text.replace("\n", " ")
        out.append(f"{i + 1}. score {_score(beam.score)}{mark}: {quoted}")
    return out


def to_json(session: Session) -> str:
    """The whole session, every branch included, as one JSON document."""
    document: dict[str, Any] = {
        "header": header_to_record(session.header),
        "events": [event_to_record(e) for e in session.events],
        "active_branch": [t.id for t in session.branch()],
    }
    return json.dumps(document, ensure_ascii=False, indent=2) + "\n"


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def show_text(session: Session, width: int = 100) -> str:
    """A compact view for the terminal: the header, then one line per turn of every branch."""
    header = session.header
    model = session.latest_model()
    users, replies = session.user_turns(), session.assistant_turns()
    lines = [f"session  {header.id}", f"file     {session.path}",
             f"started  {header.created}",
             f"model    {model.name} ({model.source}, {model.dtype}, "
             f"digest {model.digest[:12] or 'unknown'})"
             + (f" served by {model.backend}" if model.backend else ""),
             f"turns    {len(users)} prompts, {len(replies)} replies"]
    settings = session.settings()
    if settings:
        lines.append("settings " + ", ".join(f"{k}={v!r}" for k, v in settings.items()))
    active = {t.id for t in session.branch()}
    lines.append("")
    for turn in session.turns().values():
        mark = " " if turn.id in active else "~"  # ~: on a branch an edit/regenerate left
        if isinstance(turn, UserTurn):
            lines.append(f"{mark} {turn.id}  user       {_clip(turn.content, width - 26)}")
        else:
            lines.append(f"{mark} {turn.id}  assistant  {_clip(turn.text, width - 26)}")
            lines.append(f"{' ' * 26}[{stats(turn)}]")
    if len(active) < len(session.turns()):
        lines += ["", "~ = not on the active branch (replaced by an edit or a regeneration)"]
    return "\n".join(lines) + "\n"
