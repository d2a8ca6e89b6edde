"""The app's state and the life of a reply, under the Textual app in ``app.py``.

State lives here and only here: the conversation, the generation params, the worker's phase and
the reply in flight. Widgets get attributes and method calls down and send messages up; the
engine link posts the worker's events, which the ``@on`` handlers below turn into state changes.
``app.py`` adds the layout, the keys, the actions and the slash commands on top.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from glmchat.tui.conversation import Conversation, start_conversation
from glmchat.tui.engine_link import EngineLink, worker_log_path
from glmchat.tui.format import eta, stats_line
from glmchat.tui.history import PromptHistory
from glmchat.tui.widgets.prompt import PromptEditor
from glmchat.tui.widgets.side_panel import SidePanel
from glmchat.tui.widgets.transcript import Reply, Transcript
from textual import on
from textual.app import App

from glmchat import paths
from glmchat.backend import Backend, make_backend
from glmchat.config import Config
from glmchat.errors import GlmchatError
from glmchat.params import GenerationParams
from glmchat.protocol import (
    Failed,
    Finished,
    Loaded,
    LoadProgress,
    Memory,
    Ready,
    StepStats,
    Token,
)


@dataclass
class Options:
    """What the app needs beyond the config; the CLI fills it from its flags."""

    raw: bool = False  # no chat template: each prompt is a plain continuation
    history: bool = True  # read and extend the prompt history file
    client: Backend | None = None  # a backend to borrow (tests); None = make_backend(config)
    start_engine: bool = True  # False: no worker at all (snapshot tests feed events by hand)
    args: argparse.Namespace | None = None  # the CLI's flags, for the session hook


@dataclass
class InFlight:
    """The reply being made: waiting for the model (gen_id None) or streaming."""

    turn_index: int
    reply: Reply
    gen_id: str | None = None
    text: str = ""
    stopping: bool = False
    started: float = field(default_factory=time.monotonic)


def request_params(params: GenerationParams) -> GenerationParams:
    """The params sent for a chat reply: beam search returns every beam, for the beam view."""
    if params.strategy == "beam":
        return params.replace(num_return_sequences=max(params.num_return_sequences,
                                                       params.num_beams))
    return params


class ChatCore(App[int]):
    """State and the reply lifecycle; see the module docstring."""

    def __init__(self, config: Config, options: Options) -> None:
        super().__init__()
        self.config = config
        self.options = options
        self.params = config.generation
        self.conversation: Conversation = start_conversation(config, options.args)
        if self.conversation.resumed_params is not None:
            self.params = self.conversation.resumed_params
        self.history = PromptHistory(paths.history_file() if options.history else None)
        self.history.on_error = lambda text: self.conversation.warn(text)  # in the transcript
        self.link = EngineLink(self, config.model.spec(), options.client,
                               lambda: make_backend(config, stderr_path=worker_log_path()))
        self.phase = "starting"  # starting | loading | ready | crashed | failed
        self.in_flight: InFlight | None = None
        self.editing: int | None = None  # turn index of the prompt being edited
        self.load_started = time.monotonic()

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    @property
    def editor(self) -> PromptEditor:
        return self.query_one(PromptEditor)

    @property
    def panel(self) -> SidePanel:
        return self.query_one(SidePanel)

    async def begin_reply(self) -> None:
        reply = await self.transcript.add_reply(len(self.conversation))
        self.in_flight = InFlight(turn_index=len(self.conversation), reply=reply)
        self.panel.start_reply()
        if self.phase == "ready":
            self.dispatch()
        elif self.phase in ("crashed", "failed"):
            reply.set_status("restarting the worker…")
            self.restart_worker()
        else:
            reply.set_status("waiting for the model to load…")
        self.refresh_bindings()

    def dispatch(self) -> None:
        """Send the reply in flight to the worker."""
        flight = self.in_flight
        assert flight is not None
        messages = self.conversation.messages()
        prompt = messages[-1].content if messages else ""
        try:
            flight.gen_id = self.link.generate(request_params(self.params),
                                               [] if self.options.raw else messages, prompt,
                                               self.options.raw)
        except GlmchatError as exc:
            self.post_message(EngineLink.WorkerDied(str(exc)))
            return
        flight.reply.set_status("reading the prompt…")

    # ---- engine events --------------------------------------------------------------------------

    @on(EngineLink.EventsReceived)
    async def _events(self, message: EngineLink.EventsReceived) -> None:
        for event in message.events:
            if isinstance(event, Token | StepStats | Finished) or (
                    isinstance(event, Failed) and event.id is not None):
                await self._generation_event(event)
            elif isinstance(event, Memory):
                self.panel.show_memory(event)
            elif isinstance(event, LoadProgress):
                if self.phase == "starting":
                    self.panel.show_status(f"loading {self.config.model.path}…")
                self.phase = "loading"
                self.panel.show_loading(event.done, event.total, event.what,
                                        eta(time.monotonic() - self.load_started, event.done,
                                            event.total))
            elif isinstance(event, Loaded):
                self._loaded(event)
            elif isinstance(event, Ready):
                self.panel.show_status(f"worker {event.pid} up; loading {self.config.model.path}…")
            elif isinstance(event, Failed):
                self.panel.show_status("the model did not load")
                await self.transcript.add_notice(f"The model did not load: {event.error}",
                                                 "error")
                await self._end_reply_without_result(f"not sent: {event.error}")
                self.phase = "failed"  # last: whoever watches the phase sees the notice drawn

    def _loaded(self, loaded: Loaded) -> None:
        self.phase = "ready"
        self.panel.show_loaded(loaded)
        for note in loaded.placement.notes:
            self.call_later(self.transcript.add_notice, f"Note: {note}")
        self.conversation.set_model(loaded)
        if self.in_flight is not None and self.in_flight.gen_id is None:
            self.dispatch()

    async def _generation_event(self, event: Token | StepStats | Finished | Failed) -> None:
        flight = self.in_flight
        if flight is None or event.id != flight.gen_id:
            return  # a reply that was given up on (crash, clear) still draining
        if isinstance(event, Token):
            if event.provisional:
                flight.text = event.text
                flight.reply.replace_text(event.text)
            else:
                flight.text += event.text
                flight.reply.append_text(event.text)
            if not flight.stopping:
                flight.reply.set_status("generating… (Esc stops)")
        elif isinstance(event, StepStats):
            self.panel.show_step(event)
        elif isinstance(event, Finished):
            await self._finished(flight, event)
        else:
            await self._failed(flight, event.error)

    async def _finished(self, flight: InFlight, event: Finished) -> None:
        # Everything synchronous first; the reply counts as in flight until it is drawn, so
        # nothing (a new prompt, a test, the app closing) sees it over while it still draws.
        result = event.result
        self.conversation.add_assistant(result)
        self.panel.show_result(result)
        stats = stats_line(result)
        if len(result.beams) > 1:
            stats += f" · {len(result.beams)} beams: Ctrl+B to view"
        if result.spans:
            stats += f" · {len(result.spans)} infilled spans highlighted"
        try:
            await flight.reply.finish(result.text, stats,
                                      spans=[(span.start, span.end) for span in result.spans])
            for note in result.notes:  # what the backend could not do, said under the reply
                await self.transcript.add_notice(note)
        finally:
            self.in_flight = None
            self.refresh_bindings()

    async def _failed(self, flight: InFlight, error: str) -> None:
        try:
            if flight.text:
                self.conversation.add_assistant(None, flight.text)
                await flight.reply.finish(flight.text, f"failed: {error}", error=True)
            else:
                await flight.reply.remove()
                await self.transcript.add_notice(
                    f"The reply failed: {error}. Ctrl+R tries again.", "error")
        finally:
            self.in_flight = None
            self.refresh_bindings()

    async def _end_reply_without_result(self, status: str) -> None:
        if self.in_flight is not None:
            await self._failed(self.in_flight, status)

    @on(EngineLink.WorkerDied)
    async def _worker_died(self, message: EngineLink.WorkerDied) -> None:
        self.panel.show_status(f"worker stopped: {message.cause}")
        await self.transcript.add_notice(
            f"The worker stopped: {message.cause}. The conversation is kept; your next prompt "
            "restarts the worker (or /restart now).", "error")
        if self.in_flight is not None:
            await self._failed(self.in_flight, "the worker stopped")
        self.phase = "crashed"  # last, as for a failed load

    def restart_worker(self) -> None:
        self.phase = "starting"
        self.load_started = time.monotonic()
        self.panel.show_status("restarting the worker…")
        self.link.start(restart=True)
