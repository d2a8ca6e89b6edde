"""The Textual chat app. ``make_app`` builds it for the CLI and the tests alike.

State lives here and only here: the conversation, the generation params, the reply in flight.
Widgets get attributes and method calls down and send messages up; the engine link posts the
worker's events, which the ``@on`` handlers below turn into state changes.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from typing import ClassVar

from glmchat.tui import commands
from glmchat.tui.conversation import Conversation, start_conversation
from glmchat.tui.engine_link import EngineLink
from glmchat.tui.format import eta, stats_line
from glmchat.tui.history import PromptHistory
from glmchat.tui.widgets.key_bar import KeyBar
from glmchat.tui.widgets.prompt import PromptEditor
from glmchat.tui.widgets.side_panel import SidePanel
from glmchat.tui.widgets.transcript import Reply, Transcript, UserPrompt
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import TextArea

from glmchat import paths
from glmchat.client import EngineClient
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

KEYS_HELP = ("Keys: Enter send · Ctrl+J newline · Esc stop the reply · Ctrl+R regenerate · "
             "Ctrl+E edit the last prompt (or Tab to a prompt, Enter) · Ctrl+B beams · "
             "F2 settings · Ctrl+N new chat · Up/Down history · Ctrl+Q quit")


@dataclass
class Options:
    """What the app needs beyond the config; the CLI fills it from its flags."""

    raw: bool = False  # no chat template: each prompt is a plain continuation
    history: bool = True  # read and extend the prompt history file
    client: EngineClient | None = None  # a worker to borrow (tests); None = start our own
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


class GlmchatApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "glmchat"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop", "Stop", priority=True),
        Binding("ctrl+c", "interrupt", "Stop", show=False, priority=True),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+e", "edit_last", "Edit prompt", priority=True),
        Binding("ctrl+b", "beams", "Beams"),
        Binding("f2", "settings", "Settings"),
        Binding("ctrl+n", "clear", "New chat"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, config: Config, options: Options) -> None:
        super().__init__()
        self.config = config
        self.options = options
        self.params = config.generation
        self.conversation: Conversation = start_conversation(config, options.args)
        if self.conversation.resumed_params is not None:
            self.params = self.conversation.resumed_params
        self.history = PromptHistory(paths.history_file() if options.history else None)
        self.link = EngineLink(self, config.model.spec(), options.client)
        self.phase = "starting"  # starting | loading | ready | crashed | failed
        self.in_flight: InFlight | None = None
        self.editing: int | None = None  # turn index of the prompt being edited
        self.load_started = time.monotonic()

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                yield Transcript(id="transcript")
                yield PromptEditor(self.history, id="editor")
            yield SidePanel(id="side")
        yield KeyBar(id="keys")

    @property
    def transcript(self) -> Transcript:
        return self.query_one(Transcript)

    @property
    def editor(self) -> PromptEditor:
        return self.query_one(PromptEditor)

    @property
    def panel(self) -> SidePanel:
        return self.query_one(SidePanel)

    async def on_mount(self) -> None:
        self.conversation.on_warning = lambda text: self.notify(text, severity="warning")
        self.panel.show_settings(self.params)
        self.editor.focus()
        await self._show_resumed()
        if self.options.start_engine:
            # After the first frame: spawning the worker competes with the first paint.
            self.call_after_refresh(self._start_engine)

    async def _show_resumed(self) -> None:
        """A resumed conversation's turns, and anything the session store had to say."""
        for index, turn in enumerate(self.conversation.turns):
            if turn.role == "user":
                await self.transcript.add_prompt(turn.content, index)
            else:
                reply = await self.transcript.add_reply(index)
                await reply.finish(turn.content, stats_line(turn.result) if turn.result
                                   else "(from the saved session)")
        for note in self.conversation.notes:
            await self.transcript.add_notice(note, "error")

    def _start_engine(self) -> None:
        self.load_started = time.monotonic()
        self.link.start()
        # Markdown is imported lazily for a fast first paint; import it while the model loads,
        # not when the first reply starts streaming.
        self.run_worker(_warm_markdown, thread=True, name="warm-markdown", exit_on_error=False)

    async def on_unmount(self) -> None:
        await asyncio.to_thread(self.link.close)

    # ---- the prompt -----------------------------------------------------------------------------

    @on(PromptEditor.Submitted)
    async def _submitted(self, event: PromptEditor.Submitted) -> None:
        text = event.text
        if commands.is_command(text.strip()):
            await self.run_slash_command(text.strip())
            return
        if text.startswith("//"):
            text = text[1:]
        await self.send_prompt(text)

    async def send_prompt(self, text: str) -> None:
        if self.in_flight is not None:
            self.editor.set_prompt(text)
            self.notify("A reply is still coming: Esc stops it.", severity="warning")
            return
        if self.editing is not None:
            index, self.editing = self.editing, None
            self._show_editing(None)
            await self.transcript.remove_from_turn(index)
            self.conversation.edit(index, text)
        else:
            self.conversation.add_user(text)
        await self.transcript.add_prompt(text, len(self.conversation) - 1)
        await self.begin_reply()

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

    # ---- actions --------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "stop":
            return True  # Esc also leaves an edit; always active
        if action in ("regenerate", "edit_last", "clear") and self.in_flight is not None:
            return None  # shown greyed out: they apply once the reply is over
        if action == "beams":
            last = self.conversation.last_assistant()
            return bool(last and last.result and len(last.result.beams) > 1)
        return True

    def action_stop(self) -> None:
        flight = self.in_flight
        if flight is not None:
            if flight.gen_id is None:
                self.call_later(self._end_reply_without_result, "stopped before it started")
                return
            flight.stopping = True
            flight.reply.set_status("stopping…")
            self.link.cancel(flight.gen_id)
        elif self.editing is not None:
            self.editing = None
            self._show_editing(None)
            self.editor.clear()
        elif isinstance(self.screen, ModalScreen):
            self.screen.dismiss(None)

    def action_interrupt(self) -> None:
        """Ctrl+C: stop a reply, copy a selection, else say how to quit. Never a traceback."""
        if self.in_flight is not None:
            self.action_stop()
        elif isinstance(self.focused, TextArea) and self.focused.selected_text:
            self.focused.action_copy()
        else:
            self.notify("Ctrl+Q quits; Esc stops a reply.", title="Quit?")

    async def action_regenerate(self) -> None:
        if self.in_flight is not None:
            return
        try:
            at = self.conversation.regenerate()
        except LookupError as exc:
            self.notify(str(exc), severity="warning")
            return
        await self.transcript.remove_from_turn(at)
        await self.begin_reply()

    def action_edit_last(self) -> None:
        prompts = self.conversation.user_indexes()
        if prompts:
            self.edit_turn(prompts[-1])
        else:
            self.notify("No prompt to edit yet.", severity="warning")

    def edit_turn(self, turn_index: int) -> None:
        if self.in_flight is not None:
            self.notify("A reply is still coming: Esc stops it.", severity="warning")
            return
        self.editing = turn_index
        self.editor.set_prompt(self.conversation.turns[turn_index].content)
        self.editor.focus()
        self._show_editing(turn_index)

    def _show_editing(self, turn_index: int | None) -> None:
        if turn_index is None:
            self.editor.border_title = None
            self.editor.remove_class("editing")
        else:
            number = self.conversation.user_indexes().index(turn_index) + 1
            self.editor.border_title = (f"editing prompt {number}: Enter resends and replaces "
                                        "what came after · Esc cancels")
            self.editor.add_class("editing")

    @on(UserPrompt.EditRequested)
    def _edit_requested(self, event: UserPrompt.EditRequested) -> None:
        self.edit_turn(event.turn_index)

    def action_beams(self) -> None:
        last = self.conversation.last_assistant()
        if last is None or last.result is None or len(last.result.beams) < 2:
            self.notify("The last reply has no beams: /strategy beam 4 first.",
                        severity="warning")
            return
        from glmchat.tui.screens.beams import BeamScreen  # imported on first use: faster start

        self.push_screen(BeamScreen(last.result.beams, last.beam_index), self._beam_chosen)

    async def _beam_chosen(self, index: int | None) -> None:
        if index is not None:
            await self.pick_beam(index)

    async def pick_beam(self, index: int) -> None:
        try:
            turn = self.conversation.choose_beam(index)
        except (LookupError, IndexError) as exc:
            self.notify(str(exc), severity="warning")
            return
        reply = self.transcript.reply_for(len(self.conversation) - 1)
        if reply is not None and turn.result is not None:
            stats = (f"beam {index + 1} of {len(turn.result.beams)} · score "
                     f"{turn.result.beams[index].score:.3f} · Ctrl+B to view")
            await reply.finish(turn.content, stats)

    def action_settings(self) -> None:
        from glmchat.tui.screens.settings import SettingsScreen  # imported on first use

        self.push_screen(SettingsScreen(self.params), self._settings_saved)

    def _settings_saved(self, params: GenerationParams | None) -> None:
        if params is not None and params != self.params:
            self.params = params
            self.panel.show_settings(params)
            self.notify("Settings saved; they apply from the next reply.")

    async def action_clear(self) -> None:
        if self.in_flight is not None:
            return
        self.conversation.clear()
        self.editing = None
        self._show_editing(None)
        await self.transcript.remove_children()
        await self.transcript.add_notice("New conversation.")

    async def action_help(self) -> None:
        await self.transcript.add_notice(KEYS_HELP + "\n\n" + commands.help_text())

    async def action_quit(self) -> None:
        if self.in_flight is not None and self.in_flight.gen_id is not None:
            self.link.cancel(self.in_flight.gen_id)
        self.exit(0)

    # ---- slash commands -------------------------------------------------------------------------

    async def run_slash_command(self, line: str) -> None:
        outcome = commands.run_command(line, self.params)
        if isinstance(outcome, commands.CommandFailed):
            self.editor.set_prompt(line)
            await self.transcript.add_notice(outcome.error, "error")
        elif isinstance(outcome, commands.SettingsChanged):
            self.params = outcome.params
            self.panel.show_settings(self.params)
            await self.transcript.add_notice(f"{outcome.message} (from the next reply)")
        else:
            await self.run_action_command(outcome)

    async def run_action_command(self, outcome: commands.ActionRequested) -> None:
        action, number = outcome.action, outcome.argument
        if action == "edit":
            prompts = self.conversation.user_indexes()
            if not prompts or (number is not None and number > len(prompts)):
                await self.transcript.add_notice(
                    f"there are {len(prompts)} prompts to edit", "error")
                return
            self.edit_turn(prompts[(number or len(prompts)) - 1])
        elif action == "pick":
            await self.pick_beam((number or 1) - 1)
        elif action == "regen":
            await self.action_regenerate()
        elif action == "restart":
            if self.in_flight is None:
                self.restart_worker()
        elif action == "quit":
            await self.action_quit()
        elif action == "beams":
            self.action_beams()
        else:
            await self.run_action(action)  # clear, settings, help


def _warm_markdown() -> None:
    from glmchat.tui.widgets.transcript import chat_markdown_parser
    from textual.widgets import Markdown

    chat_markdown_parser().parse("# warm\n\n- up `code`\n")
    del Markdown


def make_app(config: Config, options: Options | argparse.Namespace | None = None) -> GlmchatApp:
    """The app for ``config``; ``options`` from the CLI's flags or built by a test."""
    if isinstance(options, argparse.Namespace):
        options = Options(raw=bool(getattr(options, "raw", False)), args=options)
    return GlmchatApp(config, options or Options())


def run_tui(config: Config, args: argparse.Namespace) -> int:
    app = make_app(config, args)
    try:
        code = app.run()
    finally:
        app.link.close()
    return code if isinstance(code, int) else 0
