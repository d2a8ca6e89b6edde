"""SessionRecorder: what the front ends call as a conversation happens.

    recorder = open_recorder(config, args)        # --resume / --session / --no-save handled
    recorder.start(loaded.info, loaded.placement)  # when the model is loaded
    prompt = recorder.user("What is 2+2?")
    messages = recorder.messages()                 # the active branch: send these
    gen_id = client.generate(params, messages=messages)
    …
    recorder.assistant(result, parent=prompt.id, messages=messages)

Every call appends one line to the session file (created by the first one). With saving off
(--no-save, or [sessions] save = false) the recorder keeps the same state in memory only, so a
front end can use it the same way either way.

A front end that keeps its own index-based conversation (tui/conversation.py) subscribes
``recorder.observe`` instead of calling the methods one by one.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from glmchat.config import Config
from glmchat.errors import GlmchatError, UsageError
from glmchat.params import GenerationParams
from glmchat.protocol import ChatMessage, GenerationResult, Loaded, ModelInfo, Placement

from .domain import (
    AssistantTurn,
    BeamChosen,
    HeadMoved,
    ModelChanged,
    Request,
    Session,
    SessionEvent,
    SettingChanged,
    Turn,
    UserTurn,
    result_of,
)
from .records import SessionWriteError, model_record, placement_summary
from .store import SessionStore, check_writable, new_event_id, utc_now


class _Head:
    def __repr__(self) -> str:
        return "HEAD"


HEAD = _Head()  # "the turn the active branch ends at", the default parent of a new turn
Parent = str | None | _Head


class ResumedTurn(NamedTuple):
    """One turn of a resumed conversation, in tui.conversation.Turn's field order."""

    role: str
    content: str
    result: GenerationResult | None
    beam_index: int


class _TurnLike(Protocol):
    role: str
    content: str
    result: GenerationResult | None
    beam_index: int


class _ConversationLike(Protocol):
    @property
    def turns(self) -> Any: ...  # a sequence of _TurnLike
    @property
    def model(self) -> Loaded | None: ...


class _ChangeLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def index(self) -> int: ...
    @property
    def turn(self) -> Any: ...  # _TurnLike | None


class SessionRecorder:
    def __init__(self, store: SessionStore, config: Config | None = None, *,
                 save: bool | None = None, path: Path | None = None) -> None:
        self.store = store
        self.save = (config.sessions.save if config is not None else True) if save is None \
            else save
        self.session: Session | None = None
        self._path = path  # where a new session goes (--session FILE); else the store's dir
        self._conversation_ids: list[str] = []  # observe(): turn ids parallel to the turns
        self._regenerating: str | None = None  # observe(): the reply being made again
        self.notes: list[str] = []  # for the user: lines skipped on resume, a model gone
        # A write that failed: why. From then on events are kept in memory only (the file is
        # left as it was) until ``save_as`` writes everything to a new file.
        self.save_error: str | None = None
        self.on_save_error: Callable[[str], None] | None = None  # told once per failure

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def path(self) -> Path | None:
        """The session file, once something has been saved to it."""
        if self.session is None or not self.save or not self.session.events:
            return None
        return self.session.path

    def resume(self, ref: str | Path) -> Session:
        """Continue a saved session (ID, start of an ID, or file); later turns go to its file.
        Call before ``start``. Problems with the file raise SessionFileError (a UsageError)."""
        path = ref if isinstance(ref, Path) else self.store.resolve(ref)
        self.session = self.store.load(path)
        self.notes.extend(self.session.warnings)
        self._conversation_ids = [t.id for t in self.session.branch()]
        return self.session

    def start(self, info: ModelInfo, placement: Placement | None = None) -> None:
        """The model is loaded (again, or another one): later replies come from it."""
        model = model_record(info)
        summary = placement_summary(placement) if placement is not None else None
        session = self.session
        if session is None or (not session.events and not session.path.exists()):
            path = self._path if session is None else session.path
            self.session = self.store.new_session(model, summary, path=path)
            return
        current = session.latest_model()
        if (current.source, current.digest, current.dtype, current.backend,
                current.quantize) != (model.source, model.digest, model.dtype, model.backend,
                                      model.quantize):
            self._write(ModelChanged(new_event_id("m"), utc_now(), model, summary))

    def new(self) -> None:
        """Start a new conversation (/clear): the next turn goes to a new session file."""
        if self.session is not None:
            self.session = self.store.new_session(*self.session.current_model())
        self._path = None
        self.save_error = None  # a new file: try writing again
        self._conversation_ids = []
        self._regenerating = None

    def _session(self) -> Session:
        if self.session is None:
            raise RuntimeError("SessionRecorder.start(info, placement) must come first")
        return self.session

    def _write(self, *events: SessionEvent) -> None:
        """Append to the file; a failed write never raises: it is kept in memory, and
        ``on_save_error`` (or ``notes``) hears about it once."""
        session = self._session()
        if self.save and self.save_error is None:
            try:
                self.store.append(session, *events)
                return
            except SessionWriteError as exc:
                self.save_error = str(exc)
                session.events.extend(events)
                if self.on_save_error is not None:
                    self.on_save_error(self.save_error)
                else:
                    self.notes.append(self.save_error)
                return
        session.events.extend(events)

    def save_as(self, path: Path) -> Path:
        """Write the whole conversation so far to a new session file ``path`` and keep saving
        there (/save PATH: after a failed write, or to save a --no-save chat after all).
        Raises GlmchatError when there is nothing to save or ``path`` cannot be written."""
        session = self.session
        if session is None:
            raise GlmchatError("nothing to save yet: the conversation is recorded once the "
                               "model has loaded")
        path = path.expanduser()
        check_writable(path, new=True)
        self.store.write_copy(session, path)
        session.path = path
        self.save, self.save_error, self._path = True, None, path
        return path

    def _parent(self, parent: Parent) -> str | None:
        return self._session().head() if isinstance(parent, _Head) else parent

    def _turn(self, turn_id: str) -> Turn:
        turns = self._session().turns()
        if turn_id not in turns:
            raise KeyError(f"no turn {turn_id!r} in session {self._session().id}")
        return turns[turn_id]

    # ---- reading ---------------------------------------------------------------------------------

    def messages(self, tip: str | None = None) -> list[ChatMessage]:
        """The active branch (or the one ending at ``tip``) as chat messages."""
        return self.session.messages(tip) if self.session is not None else []

    def history(self) -> list[ResumedTurn]:
        """The active branch, for a front end to show after --resume."""
        if self.session is None:
            return []
        out = []
        for turn in self.session.branch():
            if isinstance(turn, UserTurn):
                out.append(ResumedTurn("user", turn.content, None, 0))
            else:
                out.append(ResumedTurn(
                    "assistant", self.session.chosen_text(turn),
                    result_of(turn) if turn.generated else None,
                    self.session.chosen_beam(turn)))
        return out

    def resumed_params(self, base: GenerationParams) -> GenerationParams:
        """The generation settings to continue a resumed conversation with: the last reply's
        params, then the settings changed after it (``base`` when there is no reply yet)."""
        if self.session is None:
            return base
        params = base
        known = {f.name for f in dataclasses.fields(GenerationParams)}
        for event in self.session.events:
            if isinstance(event, AssistantTurn) and event.generated:
                params = event.params
            elif isinstance(event, SettingChanged) and event.name in known:
                params = params.replace(**{event.name: event.value})
        return params

    # ---- recording -------------------------------------------------------------------------------

    def user(self, text: str, *, parent: Parent = HEAD, edit_of: str | None = None) -> UserTurn:
        turn = UserTurn(id=new_event_id("u"), parent=self._parent(parent), time=utc_now(),
                        content=text, edit_of=edit_of)
        self._write(turn)
        return turn

    def ask(self, text: str, *, raw: bool = False) -> tuple[UserTurn, Request]:
        """Record a prompt that continues the active branch; return it with what to send the
        worker: the branch as chat messages, or (raw) the branch's texts run together."""
        turn = self.user(text)
        if raw:
            context = "".join(m.content for m in self.messages(turn.id))
            return turn, Request(prompt=context, raw=True)
        return turn, Request(messages=self.messages(turn.id))

    def assistant(self, result: GenerationResult, *, parent: Parent = HEAD,
                  messages: list[ChatMessage] | None = None, prompt: str = "",
                  raw: bool = False, text: str | None = None,
                  regenerates: str | None = None) -> AssistantTurn:
        """A reply. ``messages``/``prompt``/``raw``: exactly what was sent to the worker
        (default: the messages of the branch ending at ``parent``). ``text``: what the front end
        kept, when not ``result.text``."""
        parent_id = self._parent(parent)
        if messages is None:
            messages = [] if raw else self.messages(parent_id) if parent_id else []
        turn = AssistantTurn(
            id=new_event_id("a"), parent=parent_id, time=utc_now(),
            text=result.text if text is None else text,
            request=Request(messages=list(messages), prompt=prompt, raw=raw),
            params=result.params, strategy=result.strategy, seed=result.seed,
            token_ids=list(result.token_ids), prompt_token_ids=list(result.prompt_token_ids),
            finish_reason=result.finish_reason, beams=list(result.beams),
            spans=list(result.spans), timings=result.timings, regenerates=regenerates)
        self._write(turn)
        return turn

    def regenerate(self, result: GenerationResult, *, of: str,
                   messages: list[ChatMessage] | None = None, prompt: str = "",
                   raw: bool = False) -> AssistantTurn:
        """A new reply to the prompt that reply ``of`` answered; the old one stays."""
        old = self._turn(of)
        return self.assistant(result, parent=old.parent, messages=messages, prompt=prompt,
                              raw=raw, regenerates=of)

    def edit(self, turn_id: str, text: str) -> Turn:
        """Replace a turn with ``text`` on a new branch: a user turn (to resend), or a reply
        typed by hand (never replayed). The old turn and what followed it stay in the file."""
        old = self._turn(turn_id)
        if isinstance(old, UserTurn):
            return self.user(text, parent=old.parent, edit_of=old.id)
        turn = AssistantTurn(id=new_event_id("a"), parent=old.parent, time=utc_now(),
                             text=text, generated=False, edit_of=old.id)
        self._write(turn)
        return turn

    def setting(self, name: str, value: Any) -> None:
        self._write(SettingChanged(new_event_id("s"), utc_now(), name, value))

    def settings_changed(self, old: GenerationParams, new: GenerationParams) -> None:
        """Record every generation setting that differs between ``old`` and ``new``."""
        before, after = old.to_dict(), new.to_dict()
        changes = [SettingChanged(new_event_id("s"), utc_now(), name, value)
                   for name, value in after.items() if before.get(name) != value]
        if changes:
            self._write(*changes)

    def choose_beam(self, turn_id: str, beam_index: int) -> None:
        self._write(BeamChosen(new_event_id("b"), utc_now(), turn_id, beam_index))

    def select(self, turn_id: str | None) -> None:
        """Make the active branch end at ``turn_id`` (None: start over from the root)."""
        self._write(HeadMoved(new_event_id("h"), utc_now(), turn_id))

    # ---- tui.conversation.Conversation observer --------------------------------------------------

    def observe(self, conversation: _ConversationLike, change: _ChangeLike) -> None:
        """Record a Conversation change. Assumes the front end sent the turns before a reply
        as its chat messages (Conversation.messages()). Write failures go to on_save_error."""
        ids = self._conversation_ids
        kind, index = change.kind, change.index
        if kind == "model":
            if conversation.model is not None:
                self.start(conversation.model.info, conversation.model.placement)
        elif kind == "user":
            ids.append(self.user(change.turn.content, parent=ids[-1] if ids else None).id)
        elif kind == "assistant":
            turn: _TurnLike = change.turn
            parent = ids[index - 1] if 0 < index <= len(ids) else None
            if turn.result is None:
                recorded: Turn = AssistantTurn(id=new_event_id("a"), parent=parent,
                                               time=utc_now(), text=turn.content,
                                               generated=False)
                self._write(recorded)
            else:
                sent = [ChatMessage(t.role, t.content) for t in conversation.turns[:index]]
                recorded = self.assistant(turn.result, parent=parent, messages=sent,
                                          text=turn.content, regenerates=self._regenerating)
            self._regenerating = None
            del ids[index:]
            ids.append(recorded.id)
        elif kind == "edit":
            old = ids[index] if index < len(ids) else None
            del ids[index:]
            ids.append(self.user(change.turn.content, parent=ids[-1] if ids else None,
                                 edit_of=old).id)
        elif kind == "regenerate":
            self._regenerating = ids[index] if index < len(ids) else None
            del ids[index:]
        elif kind == "beam" and index < len(ids):
            self.choose_beam(ids[index], change.turn.beam_index)
        elif kind == "clear":
            self.new()


def open_recorder(config: Config, args: argparse.Namespace, *,
                  oneshot: bool = False) -> SessionRecorder | None:
    """The recorder the command line asks for: --session FILE, --resume ID|FILE, --no-save.
    One-shot mode records only with --session or --resume (returns None otherwise).

    A resumed conversation continues with its own model (``config.model.path`` is set to it)
    unless --model was typed, or that model is no longer there (then ``notes`` says so)."""
    session_file: Path | None = getattr(args, "session", None)
    resume: str | None = getattr(args, "resume", None)
    no_save = bool(getattr(args, "no_save", False))
    if session_file is not None and resume:
        raise UsageError("--session FILE and --resume ID|FILE both name a session; pass one")
    if oneshot and session_file is None and not resume:
        return None
    explicit = session_file is not None or (oneshot and bool(resume))
    save = not no_save and (explicit or config.sessions.save)
    store = SessionStore(config.sessions.path())
    if session_file is not None and save:
        check_writable(session_file.expanduser())  # before any generation: exit 2 now
    recorder = SessionRecorder(store, save=save, path=session_file)
    if resume:
        recorder.resume(resume)
        if explicit and save:
            check_writable(recorder._session().path)
    elif session_file is not None and session_file.is_file() and session_file.stat().st_size:
        recorder.resume(session_file)
    latest = recorder.session.latest_model() if recorder.session is not None else None
    if latest is not None and latest.backend and not latest.digest and \
            config.backend.url == "" and "backend" not in vars(args):
        # A conversation with a server that names no weights continues with that server.
        config.backend.url, config.backend.model = latest.backend, latest.source
    elif recorder.session is not None and "model" not in vars(args):
        source = recorder.session.latest_model().source
        if source == "default" or Path(source).expanduser().exists():
            config.model.path = source
        elif source != config.model.path:
            recorder.notes.append(f"the session's model {source} is not there any more; "
                                  f"continuing with {config.model.path}")
    return recorder
