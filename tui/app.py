"""The Textual chat app: layout, keys, actions and slash commands. ``make_app`` builds it for the
CLI and the tests alike. The state it acts on, and the life of a reply from prompt to the
worker's last event, live in ``chat_core.ChatCore``, its base class.
"""

from __future__ import annotations

import argparse
import time
from typing import ClassVar

from glmchat.tui import commands
from glmchat.tui.chat_core import ChatCore, InFlight, Options
from glmchat.tui.conversation import Conversation
from glmchat.tui.format import stats_line
from glmchat.tui.widgets.key_bar import KeyBar
from glmchat.tui.widgets.prompt import PromptEditor
from glmchat.tui.widgets.side_panel import SidePanel
from glmchat.tui.widgets.transcript import Transcript, UserPrompt
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import TextArea

from glmchat.config import Config
from glmchat.errors import GlmchatError
from glmchat.params import GenerationParams

__all__ = ["GlmchatApp", "Options", "make_app", "run_tui"]  # Options: for the tests

QUIT_GRACE_S = 0.5  # after Ctrl+Q: how long the worker has to exit by itself
STOP_GRACE_S = 5.0  # after Esc: how long the worker has to stop before it is replaced
KEYS_HELP = ("Keys: Enter send · Ctrl+J newline · Esc stop the reply · Ctrl+R regenerate · "
             "Ctrl+E edit the last prompt (or Tab to a prompt, Enter) · Ctrl+B beams · "
             "F2 settings · Ctrl+N new chat · Up/Down history · Ctrl+Q quit")


class GlmchatApp(ChatCore):
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

    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="chat"):
                yield Transcript(id="transcript")
                yield PromptEditor(self.history, id="editor")
            yield SidePanel(id="side")
        yield KeyBar(id="keys")

    async def on_mount(self) -> None:
        # Said in the transcript, where it happened (a session that could not be saved).
        self.conversation.on_warning = self._warn_in_transcript
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

    def _warn_in_transcript(self, text: str) -> None:
        self.call_later(self.transcript.add_notice, text, "error")

    def _start_engine(self) -> None:
        self.load_started = time.monotonic()
        self.link.start()
        # Markdown is imported lazily for a fast first paint; import it while the model loads,
        # not when the first reply starts streaming.
        self.run_worker(_warm_markdown, thread=True, name="warm-markdown", exit_on_error=False)

    def on_unmount(self) -> None:
        # Quitting gives the terminal back at once: the worker is told to shut down and is
        # reaped after the screen is restored (run_tui), not waited for here.
        self.link.shutdown_soon()

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
            self.set_timer(STOP_GRACE_S, lambda: self._stop_overdue(flight))
        elif self.editing is not None:
            self.editing = None
            self._show_editing(None)
            self.editor.clear()
        elif isinstance(self.screen, ModalScreen):
            self.screen.dismiss(None)

    async def _stop_overdue(self, flight: InFlight) -> None:
        """Stop was pressed and the worker has not answered (a stuck forward): keep what came,
        and replace the worker so the chat can go on."""
        if self.in_flight is not flight:
            return
        await self._failed(flight, "the worker did not stop")
        await self.transcript.add_notice(
            "The worker did not stop the reply (stuck?): restarting it. The conversation is "
            "kept.", "error")
        self.restart_worker()

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
        elif action == "save":
            await self.transcript.add_notice(*save_conversation(self.conversation, outcome.text))
        else:
            await self.run_action(action)  # clear, settings, help


def save_conversation(conversation: Conversation, path: str) -> tuple[str, str]:
    """/save PATH: (what to say, notice style)."""
    if conversation.save_as is None:
        return "this conversation is not recorded, so there is nothing to save", "error"
    try:
        return conversation.save_as(path), "info"
    except GlmchatError as exc:
        return f"not saved: {exc}", "error"


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
        # The screen is back already; the worker was asked to stop while the app closed. A
        # worker stuck in a forward is terminated after a moment (it is never left behind).
        app.link.close(timeout=QUIT_GRACE_S)
    return code if isinstance(code, int) else 0
