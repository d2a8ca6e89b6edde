"""The conversation both chat front ends hold: turns, and the branches that edit and regenerate
leave behind. No Textual, no prompt_toolkit: the TUI, the REPL and the session store share it.

Every change goes through a method here (``add_user``, ``add_assistant``, ``edit``,
``regenerate``, ``choose_beam``, ``clear``, ``set_model``) and is announced to the observers
as one ``Change``; a session store records turns by subscribing, nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from glmchat.protocol import ChatMessage, GenerationResult, Loaded

if TYPE_CHECKING:
    import argparse

    from glmchat.config import Config
    from glmchat.params import GenerationParams


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    content: str
    result: GenerationResult | None = None  # assistant turns: how the reply was made
    beam_index: int = 0  # assistant turns: which of result.beams the content is


@dataclass
class Branch:
    """Turns that an edit or a regenerate replaced, kept so nothing the user saw is lost."""

    at: int  # index of the first replaced turn
    turns: list[Turn]
    reason: str  # "edit" | "regenerate" | "clear"


@dataclass(frozen=True)
class Change:
    """What changed. ``kind``: "user" | "assistant" | "edit" | "regenerate" | "beam" | "clear" |
    "model". ``index``: the turn it concerns (-1 for none)."""

    kind: str
    index: int = -1
    turn: Turn | None = None
    branch: Branch | None = None


Observer = Callable[["Conversation", Change], None]


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    branches: list[Branch] = field(default_factory=list)
    model: Loaded | None = None
    observers: list[Observer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # for the user at start (resume problems)
    resumed_params: GenerationParams | None = None  # a resumed session's last settings
    on_warning: Callable[[str], None] | None = None  # how the front end shows a warning
    # /save PATH: write the conversation to a new session file and keep saving there; returns
    # what to tell the user, raises GlmchatError. None: nothing records this conversation.
    save_as: Callable[[str], str] | None = None

    def warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            self.notes.append(message)

    # ---- observers ------------------------------------------------------------------------------

    def subscribe(self, observer: Observer) -> None:
        self.observers.append(observer)

    def _announce(self, change: Change) -> None:
        for observer in list(self.observers):
            observer(self, change)

    # ---- reading --------------------------------------------------------------------------------

    def messages(self) -> list[ChatMessage]:
        """The turns as the worker's chat messages (the system prompt travels in the params)."""
        return [ChatMessage(role=t.role, content=t.content) for t in self.turns]

    def user_indexes(self) -> list[int]:
        return [i for i, t in enumerate(self.turns) if t.role == "user"]

    def last_assistant(self) -> Turn | None:
        if self.turns and self.turns[-1].role == "assistant":
            return self.turns[-1]
        return None

    def __len__(self) -> int:
        return len(self.turns)

    # ---- changes --------------------------------------------------------------------------------

    def set_model(self, loaded: Loaded) -> None:
        self.model = loaded
        self._announce(Change("model"))

    def add_user(self, text: str) -> Turn:
        turn = Turn("user", text)
        self.turns.append(turn)
        self._announce(Change("user", len(self.turns) - 1, turn))
        return turn

    def add_assistant(self, result: GenerationResult | None, text: str | None = None) -> Turn:
        """Record a finished (or stopped) reply. ``result`` None: the reply broke off (worker
        crash, failure) and ``text`` is what had streamed by then."""
        content = text if text is not None else result.text if result is not None else ""
        turn = Turn("assistant", content, result)
        self.turns.append(turn)
        self._announce(Change("assistant", len(self.turns) - 1, turn))
        return turn

    def _cut(self, at: int, reason: str) -> Branch:
        branch = Branch(at, self.turns[at:], reason)
        del self.turns[at:]
        self.branches.append(branch)
        return branch

    def edit(self, index: int, text: str) -> Turn:
        """Replace user turn ``index`` with ``text``; the turns after it go to a branch."""
        if not 0 <= index < len(self.turns) or self.turns[index].role != "user":
            raise IndexError(f"turn {index} is not a prompt")
        branch = self._cut(index, "edit")
        turn = Turn("user", text)
        self.turns.append(turn)
        self._announce(Change("edit", index, turn, branch))
        return turn

    def regenerate(self) -> int:
        """Drop the last reply (to a branch) so it can be made again; returns the index the new
        reply will take. Raises LookupError when there is no prompt to answer."""
        if not self.turns:
            raise LookupError("nothing to regenerate yet; send a prompt first")
        at = len(self.turns) - 1 if self.turns[-1].role == "assistant" else len(self.turns)
        if at == 0 or self.turns[at - 1].role != "user":
            raise LookupError("nothing to regenerate yet; send a prompt first")
        branch = self._cut(at, "regenerate") if at < len(self.turns) else None
        self._announce(Change("regenerate", at, None, branch))
        return at

    def choose_beam(self, beam_index: int) -> Turn:
        """Continue with beam ``beam_index`` of the last reply instead of the best one."""
        turn = self.last_assistant()
        if turn is None or turn.result is None or not turn.result.beams:
            raise LookupError("the last reply has no beams; use /strategy beam first")
        beams = turn.result.beams
        if not 0 <= beam_index < len(beams):
            raise IndexError(f"there are {len(beams)} beams; pick 1 to {len(beams)}")
        turn.content = beams[beam_index].text
        turn.beam_index = beam_index
        self._announce(Change("beam", len(self.turns) - 1, turn))
        return turn

    def clear(self) -> None:
        if self.turns:
            self._cut(0, "clear")
        self._announce(Change("clear"))


def start_conversation(config: Config | None = None,
                       args: argparse.Namespace | None = None) -> Conversation:
    """The one place both front ends get their conversation. With the CLI's ``args`` it is
    recorded by the session store (``--resume`` fills the turns, ``--no-save`` keeps it in
    memory); tests pass no args and get a bare conversation."""
    conversation = Conversation()
    if config is None or args is None:
        return conversation
    from glmchat.sessions.recorder import open_recorder

    from glmchat.errors import GlmchatError

    recorder = open_recorder(config, args)
    if recorder is None:
        return conversation
    conversation.turns.extend(Turn(*turn) for turn in recorder.history())
    conversation.notes.extend(recorder.notes)
    conversation.resumed_params = recorder.resumed_params(config.generation)

    waiting: list[Change] = []  # a prompt typed while the model loads: the session file
    # starts with the model's record, so such changes are written once it is known

    def record(conv: Conversation, change: Change) -> None:
        if conv.model is None and recorder.session is None:
            waiting.append(change)
            return
        try:
            for pending in [change, *waiting] if change.kind == "model" else [change]:
                recorder.observe(conv, pending)
            waiting.clear()
        except GlmchatError as exc:  # whatever else goes wrong, the chat goes on
            conv.warn(f"the session could not be saved: {exc}")

    def save_failed(why: str) -> None:
        conversation.warn(f"The session could not be saved: {why}. The conversation is kept "
                          "in memory; /save PATH writes it to another file.")

    def save_as(path: str) -> str:
        if recorder.session is None and waiting:
            raise GlmchatError("nothing to save yet: the conversation is recorded once the "
                               "model has loaded")
        from pathlib import Path

        return f"saved to {recorder.save_as(Path(path))}; later turns go there too"

    recorder.on_save_error = save_failed
    conversation.save_as = save_as
    conversation.subscribe(record)
    return conversation
