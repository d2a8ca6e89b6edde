"""What a session is, in memory: a header and the events that followed it.

Turns form a tree: every user and assistant turn names its ``parent``. An edit is a new user
turn beside the one it replaces (``edit_of``), a regeneration a new assistant turn beside the
old reply (``regenerates``); nothing is overwritten. The active branch runs from the root to the
head: the latest turn appended, unless a later ``HeadMoved`` picked another one.

These dataclasses know nothing about JSON; records.py converts them to and from file lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmchat.params import GenerationParams
from glmchat.protocol import Beam, ChatMessage, GenerationResult, Span, Timings


@dataclass
class ModelRecord:
    """The model a reply came from: enough to load it again and to know if it changed."""

    name: str
    source: str  # what was asked for: "default", a directory, a .gguf file
    digest: str  # sha256 of the source weights
    dtype: str  # the dtype it ran in ("float32", …)
    architecture: str = ""
    n_params: int = 0
    context_length: int = 0
    quantize: str = "none"  # the weights' scheme ("int8", "int4-g32", …)
    backend: str = ""  # the server that generated (URL without credentials); "" = local worker


@dataclass
class PlacementSummary:
    runtime: str  # "resident" | "accelerate" | "glmchat"
    layers_per_tier: dict[str, int]
    bytes_per_tier: dict[str, int]
    n_layers: int
    gpu_available: bool


@dataclass
class SessionHeader:
    id: str
    created: str  # ISO 8601, UTC
    format_version: int
    glmchat_version: str
    model: ModelRecord
    placement: PlacementSummary | None = None


@dataclass
class Request:
    """Exactly what was sent to the worker for a reply, so replay can send it again."""

    messages: list[ChatMessage] = field(default_factory=list)
    prompt: str = ""
    raw: bool = False


@dataclass
class UserTurn:
    id: str
    parent: str | None
    time: str
    content: str
    edit_of: str | None = None  # the user turn this one replaces


@dataclass
class AssistantTurn:
    id: str
    parent: str | None  # the user turn it answers
    time: str
    text: str
    generated: bool = True  # False: typed by hand (an edit), nothing to replay
    request: Request = field(default_factory=Request)
    params: GenerationParams = field(default_factory=GenerationParams)
    strategy: str = ""
    seed: int | None = None
    token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    beams: list[Beam] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    regenerates: str | None = None  # the reply this one was made again for
    edit_of: str | None = None  # the reply this hand-typed one replaces
    beam_index: int = 0  # which of ``beams`` the conversation continues with


@dataclass
class SettingChanged:
    id: str
    time: str
    name: str
    value: Any


@dataclass
class ModelChanged:
    id: str
    time: str
    model: ModelRecord
    placement: PlacementSummary | None = None


@dataclass
class BeamChosen:
    """The conversation continues with another beam of an assistant turn."""

    id: str
    time: str
    turn: str
    beam_index: int


@dataclass
class HeadMoved:
    """The active branch now ends at ``turn`` (None: an empty conversation)."""

    id: str
    time: str
    turn: str | None


Turn = UserTurn | AssistantTurn
SessionEvent = UserTurn | AssistantTurn | SettingChanged | ModelChanged | BeamChosen | HeadMoved


@dataclass
class Session:
    path: Path
    header: SessionHeader
    events: list[SessionEvent] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # lines skipped on load, and why

    @property
    def id(self) -> str:
        return self.header.id

    def turns(self) -> dict[str, Turn]:
        return {e.id: e for e in self.events if isinstance(e, UserTurn | AssistantTurn)}

    def assistant_turns(self) -> list[AssistantTurn]:
        return [e for e in self.events if isinstance(e, AssistantTurn)]

    def user_turns(self) -> list[UserTurn]:
        return [e for e in self.events if isinstance(e, UserTurn)]

    def head(self) -> str | None:
        head: str | None = None
        for event in self.events:
            if isinstance(event, UserTurn | AssistantTurn):
                head = event.id
            elif isinstance(event, HeadMoved):
                head = event.turn
        return head

    def branch(self, tip: str | None = None) -> list[Turn]:
        """The turns from the root to ``tip`` (default: the head), oldest first."""
        turns = self.turns()
        node = self.head() if tip is None else tip
        out: list[Turn] = []
        seen: set[str] = set()
        while node is not None and node in turns and node not in seen:
            seen.add(node)
            out.append(turns[node])
            node = turns[node].parent
        out.reverse()
        return out

    def chosen_beam(self, turn: AssistantTurn) -> int:
        index = turn.beam_index
        for event in self.events:
            if isinstance(event, BeamChosen) and event.turn == turn.id:
                index = event.beam_index
        return index if 0 <= index < len(turn.beams) else 0

    def chosen_text(self, turn: AssistantTurn) -> str:
        """The reply's text as the conversation continues with it (a picked beam, if any)."""
        index = self.chosen_beam(turn)
        return turn.beams[index].text if index else turn.text

    def messages(self, tip: str | None = None) -> list[ChatMessage]:
        """The branch ending at ``tip`` as chat messages: the context to continue from."""
        return [ChatMessage("user", t.content) if isinstance(t, UserTurn)
                else ChatMessage("assistant", self.chosen_text(t))
                for t in self.branch(tip)]

    def alternatives(self, turn: Turn) -> list[Turn]:
        """Other turns with the same parent and role: earlier or later edits, regenerations."""
        return [t for t in self.turns().values()
                if t.id != turn.id and t.parent == turn.parent and type(t) is type(turn)]

    def settings(self) -> dict[str, Any]:
        """The latest value of every setting changed during the session."""
        return {e.name: e.value for e in self.events if isinstance(e, SettingChanged)}

    def model_for(self, event_id: str) -> tuple[ModelRecord, PlacementSummary | None]:
        """The model in use when ``event_id`` was recorded."""
        model, placement = self.header.model, self.header.placement
        for event in self.events:
            if event.id == event_id:
                break
            if isinstance(event, ModelChanged):
                model, placement = event.model, event.placement
        return model, placement

    def latest_model(self) -> ModelRecord:
        return self.current_model()[0]

    def current_model(self) -> tuple[ModelRecord, PlacementSummary | None]:
        """The model (and its placement) the latest replies came from."""
        changes = [e for e in self.events if isinstance(e, ModelChanged)]
        if changes:
            return changes[-1].model, changes[-1].placement
        return self.header.model, self.header.placement

    def first_prompt(self) -> str:
        users = self.user_turns()
        return users[0].content if users else ""


def result_of(turn: AssistantTurn) -> GenerationResult:
    """The reply as the worker's GenerationResult (what a front end shows for a resumed turn)."""
    return GenerationResult(
        text=turn.text, token_ids=list(turn.token_ids),
        prompt_token_ids=list(turn.prompt_token_ids), finish_reason=turn.finish_reason,
        strategy=turn.strategy, seed=turn.seed, params=turn.params, timings=turn.timings,
        beams=list(turn.beams), spans=list(turn.spans))
