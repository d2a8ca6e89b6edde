"""`glmchat --plain`: a prompt_toolkit line REPL for terminals where a full-screen app is unwanted.

Enter sends. A line ending in a backslash continues on the next line; Ctrl+J (or Esc then
Enter) inserts a newline; a block between lines of three double quotes (\"\"\") is one prompt;
pasted text is inserted as is. Ctrl+C stops a reply; at the prompt, a second Ctrl+C in a row or
Ctrl+D leaves. The slash commands are the TUI's (glmchat.tui.commands).
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from glmchat.tui import commands
from glmchat.tui.conversation import Conversation, start_conversation
from glmchat.tui.format import human_bytes, stats_line, streaming_summary
from glmchat.tui.history import take_back
from glmchat.tui.plain_input import KEYS_HELP, clean_input, key_bindings
from prompt_toolkit import PromptSession
from prompt_toolkit.history import FileHistory, History
from prompt_toolkit.input import Input
from prompt_toolkit.output import Output

from glmchat import paths
from glmchat.backend import Backend, describe, make_backend
from glmchat.config import Config
from glmchat.errors import GlmchatError, UsageError
from glmchat.params import GenerationParams
from glmchat.protocol import (
    Event,
    Failed,
    Finished,
    GenerationResult,
    Loaded,
    LoadProgress,
    StepStats,
    Token,
)

STOP_GRACE_S = 5.0  # after Ctrl+C: how long the worker has to stop the reply


class SafeFileHistory(FileHistory):
    """prompt_toolkit's FileHistory, except that a history file that cannot be read or written
    (a directory, a full disk) costs the history, not the chat: said once, then in memory."""

    def __init__(self, path: Path, repl: PlainRepl) -> None:
        super().__init__(str(path))
        self.path, self.repl, self.failed = path, repl, False

    def _failed(self, exc: OSError) -> None:
        if not self.failed:
            self.failed = True
            self.repl.say(f"the prompt history {self.path} cannot be used "
                          f"({exc.strerror or exc}); history is kept for this run only",
                          "error")

    def load_history_strings(self) -> Iterable[str]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return list(super().load_history_strings())
        except OSError as exc:
            self._failed(exc)
            return []

    def store_string(self, string: str) -> None:
        if self.failed:
            return
        try:
            size: int | None = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        except OSError:
            size = None
        try:
            super().store_string(string)
        except OSError as exc:
            take_back(self.path, size)  # no torn entry left in the file
            self._failed(exc)


class PlainRepl:
    """The REPL loop. ``input``/``output`` (prompt_toolkit) and ``out`` are injectable for
    tests; ``client`` borrows a running backend instead of making one (make_backend: the
    local worker, a running local glmchat serve, or the configured server)."""

    def __init__(self, config: Config, args: argparse.Namespace | None = None, *,
                 client: Backend | None = None, out: TextIO | None = None,
                 input: Input | None = None, output: Output | None = None,
                 history: History | None = None) -> None:
        self.config = config
        self.raw = bool(getattr(args, "raw", False))
        self.conversation: Conversation = start_conversation(config, args)
        self.params: GenerationParams = (self.conversation.resumed_params
                                         or config.generation)
        self.owned = client is None
        self.client: Backend = client or make_backend(config, discover=True)
        self.out = out or sys.stdout
        self.color = self.out.isatty()
        if history is None:
            history = SafeFileHistory(paths.history_file(), self)
        self.session: PromptSession[str] = PromptSession(
            history=history, multiline=True, key_bindings=key_bindings(), input=input,
            output=output, prompt_continuation=lambda width, line, wrap: "... ".rjust(width))
        self.interrupts = 0  # Ctrl+C presses in a row at the prompt
        self.worker_stuck = False  # it did not stop a reply: replaced before the next one
        self.loader: threading.Thread | None = None
        self.load_events: queue.Queue[Event] = queue.Queue()
        self.load_error: Exception | None = None
        self.last_step_extra: dict[str, object] = {}  # the offload runtime's streaming stats

    # ---- output ---------------------------------------------------------------------------------

    def say(self, text: str, style: str = "") -> None:
        codes = {"dim": "2", "error": "31", "bold": "1"}
        if self.color and style in codes:
            text = f"\x1b[{codes[style]}m{text}\x1b[0m"
        self.out.write(text + "\n")
        self.out.flush()

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    # ---- the worker -----------------------------------------------------------------------------

    def start_loading(self) -> None:
        """Start the worker and load the model in a thread, so the prompt is usable at once."""
        events: queue.Queue[Event] = queue.Queue()
        self.load_events = events
        self.load_error = None

        # The process is started here, in the main thread: the worker's parent-death signal
        # fires when the *thread* that spawned it ends, and the loader thread ends soon.
        if self.client.crash is not None or (self.client.pid is not None
                                             and not self.client.alive):
            self.client.restart()
        elif not self.client.alive:
            self.client.start()

        def load() -> None:
            try:
                for event in self.client.load(self.config.model.spec()):
                    events.put(event)
            except Exception as exc:  # reported by ensure_ready, in the main thread
                self.load_error = exc

        self.loader = threading.Thread(target=load, name="load", daemon=True)
        self.loader.start()

    def ensure_ready(self) -> None:
        """Wait for the model (printing the load's progress); restart a dead worker first."""
        if self.worker_stuck and self.loader is None:
            self.worker_stuck = False
            self.client.close(timeout=1.0)
        if self.loader is None:
            if self.client.alive and self.client.loaded is not None:
                return
            self.say(f"starting {describe(self.client)}…" if self.client.pid is None
                     else "restarting the worker…", "dim")
            self.start_loading()
        assert self.loader is not None
        while self.loader.is_alive() or not self.load_events.empty():
            try:
                event = self.load_events.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(event, LoadProgress):
                self.say(f"[{event.done}/{event.total}] {event.what}", "dim")
            elif isinstance(event, Loaded):
                self.say(loaded_line(event, self.client), "dim")
                for note in event.placement.notes:
                    self.say(f"note: {note}", "dim")
                self.conversation.set_model(event)
        self.loader = None
        if self.load_error is not None:
            error, self.load_error = self.load_error, None
            raise error

    def reply(self) -> None:
        """Generate the reply to the conversation as it stands, streaming it out."""
        self.ensure_ready()
        messages = self.conversation.messages()
        params = self.params
        if params.strategy == "beam":
            params = params.replace(num_return_sequences=max(params.num_return_sequences,
                                                             params.num_beams))
        gen_id = self.client.generate(params, messages=[] if self.raw else messages,
                                      prompt=messages[-1].content, raw=self.raw)
        if self.raw:
            self.write("Output: ")
        text, result = self._stream(gen_id)
        if result is not None:
            self.conversation.add_assistant(result)
            self.write("\n")
            line = stats_line(result)
            streamed = streaming_summary(self.last_step_extra)
            if streamed:
                line += f" · {streamed}"
            if len(result.beams) > 1:
                line += f" · {len(result.beams)} beams: /beams lists them, /pick N"
            self.say(f"[{line}]", "dim")
            for span in result.spans:
                self.say(f"  {span.mask} → {result.text[span.start:span.end]!r}", "bold")
            for note in result.notes:
                self.say(note, "dim")
        elif text:
            self.conversation.add_assistant(None, text)

    def _finished(self, event: Finished, provisional: bool) -> tuple[str, GenerationResult]:
        """The reply is whole: a beam search's, shown only as progress so far, is printed now."""
        if provisional:
            self.write("\r\x1b[2K" if self.color else "")
            self.write(event.result.text)
        return event.result.text, event.result

    def _stream(self, gen_id: str) -> tuple[str, GenerationResult | None]:
        text = ""
        provisional = False
        self.last_step_extra = {}
        try:
            try:
                for event in self.client.stream(gen_id):
                    if getattr(event, "id", gen_id) != gen_id:
                        continue  # a reply given up on earlier, still draining
                    if isinstance(event, Token) and event.provisional:
                        provisional = True
                        text = event.text
                        if self.color:
                            self.write(f"\r\x1b[2K(beam search: {len(text)} characters so far)")
                    elif isinstance(event, Token):
                        text += event.text
                        self.write(event.text)
                    elif isinstance(event, StepStats) and event.new_tokens > 1:
                        self.last_step_extra = event.extra
                    elif isinstance(event, Finished):
                        return self._finished(event, provisional)
            except KeyboardInterrupt:
                self.interrupts = 1  # a second Ctrl+C at the prompt leaves
                done = self.client.finished_for(gen_id)  # it came just before the Ctrl+C
                if done is not None:
                    return self._finished(done, provisional)
                self.client.cancel(gen_id)
                deadline = time.monotonic() + STOP_GRACE_S
                try:
                    while (late := self.client.recv(max(0.0, deadline - time.monotonic()))):
                        if isinstance(late, Failed) and late.id in (gen_id, None):
                            raise (UsageError if late.usage else GlmchatError)(late.error)
                        if isinstance(late, Finished) and late.id == gen_id:
                            return self._finished(late, provisional)
                except KeyboardInterrupt:
                    self.write("\n")
                    return text, None  # stop waiting; the worker's late events are skipped
                if self.client.alive:  # it did not stop within the grace: stuck
                    self.write("\n")
                    self.say("(the worker did not stop the reply; the next prompt restarts it)",
                             "dim")
                    self.worker_stuck = True
                return text, None
        except GlmchatError as exc:
            self.write("\n")
            crashed = not self.client.alive
            self.say(f"{'the worker stopped' if crashed else 'the reply failed'}: {exc}"
                     + ("; the conversation is kept and the next prompt restarts the worker"
                        if crashed else ""), "error")
        return text, None

    # ---- commands -------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a slash command; False when it asks to leave."""
        outcome = commands.run_command(line, self.params)
        if isinstance(outcome, commands.CommandFailed):
            self.say(outcome.error, "error")
        elif isinstance(outcome, commands.SettingsChanged):
            self.params = outcome.params
            self.say(outcome.message, "dim")
        else:
            return self.action(outcome)
        return True

    def action(self, outcome: commands.ActionRequested) -> bool:
        action, number = outcome.action, outcome.argument
        if action == "quit":
            return False
        if action == "help":
            self.say(KEYS_HELP + "\n" + commands.help_text())
        elif action == "settings":
            self.say(commands.settings_text(self.params))
        elif action == "clear":
            self.conversation.clear()
            self.say("new conversation", "dim")
        elif action == "regen":
            try:
                self.conversation.regenerate()
            except LookupError as exc:
                self.say(str(exc), "error")
                return True
            self.reply()
        elif action == "edit":
            self._edit(number)
        elif action == "beams":
            self._beams()
        elif action == "pick":
            try:
                turn = self.conversation.choose_beam((number or 1) - 1)
            except (LookupError, IndexError) as exc:
                self.say(str(exc), "error")
                return True
            self.say(f"continuing with beam {number}:\n{turn.content}")
        elif action == "save":
            if self.conversation.save_as is None:
                self.say("this conversation is not recorded, so there is nothing to save",
                         "error")
                return True
            try:
                self.say(self.conversation.save_as(outcome.text), "dim")
            except GlmchatError as exc:
                self.say(f"not saved: {exc}", "error")
        elif action == "restart":
            self.ensure_ready()  # a load under way finishes first
            self.client.close()
            self.ensure_ready()
        return True

    def _edit(self, number: int | None) -> None:
        prompts = self.conversation.user_indexes()
        if not prompts or (number is not None and number > len(prompts)):
            self.say(f"there are {len(prompts)} prompts to edit", "error")
            return
        index = prompts[(number or len(prompts)) - 1]
        text = self.session.prompt("Edit> ", default=self.conversation.turns[index].content)
        if text.strip():
            self.conversation.edit(index, clean_input(text))
            self.reply()

    def _beams(self) -> None:
        last = self.conversation.last_assistant()
        if last is None or last.result is None or len(last.result.beams) < 2:
            self.say("the last reply has no beams: /strategy beam 4 first", "error")
            return
        for number, beam in enumerate(last.result.beams, 1):
            mark = "  (in the conversation)" if number - 1 == last.beam_index else ""
            self.say(f"#{number} score {beam.score:.3f} · {len(beam.token_ids)} tokens{mark}",
                     "bold")
            self.say(beam.text.strip() or "(empty)")

    # ---- the loop -------------------------------------------------------------------------------

    def read(self) -> str | None:
        """One prompt from the user; None to leave."""
        while True:
            try:
                text = self.session.prompt("Input: " if self.raw else "> ")
            except KeyboardInterrupt:
                if self.interrupts >= 1:
                    return None
                self.interrupts += 1
                self.say("(Ctrl+C again or Ctrl+D to leave)", "dim")
                continue
            except EOFError:
                return None
            self.interrupts = 0
            return text

    def run(self) -> int:
        self.say(f"glmchat --plain · /help for commands · {KEYS_HELP}", "dim")
        self.conversation.on_warning = lambda text: self.say(text, "error")
        for turn in self.conversation.turns:  # a resumed conversation
            self.say(("> " if turn.role == "user" else "") + turn.content,
                     "bold" if turn.role == "user" else "")
        for note in self.conversation.notes:
            self.say(note, "error")
        try:
            if self.client.loaded is None:
                self.start_loading()
            else:  # a borrowed worker that holds the model already
                self.conversation.set_model(self.client.loaded)
            while True:
                line = self.read()
                if line is None:
                    return 0
                if not line.strip():
                    continue
                if commands.is_command(line.strip()):
                    if not self.command(line.strip()):
                        return 0
                    continue
                text = clean_input(line)
                if text.startswith("//"):
                    text = text[1:]
                if self.raw:
                    self.conversation.clear()
                self.conversation.add_user(text)
                try:
                    self.reply()
                except KeyboardInterrupt:  # only while waiting for the model: see _stream
                    self.say("\n(not sent: the model was still loading; /regen sends it)",
                             "dim")
                    self.interrupts = 1
        except UsageError:
            raise
        except KeyboardInterrupt:
            self.write("\n")
            return 130
        finally:
            if self.owned:
                with contextlib.suppress(Exception):
                    self.client.close()


def loaded_line(event: Loaded, backend: Backend) -> str:
    """What --plain says when the model is ready, and who serves it."""
    if event.placement.runtime == "remote":
        return f"{event.info.name} · {describe(backend)}"
    tiers = ", ".join(f"{n} on {t}" for t, n in sorted(event.placement.layers_per_tier.items()))
    where = f" · {describe(backend)}" if event.info.backend else ""
    weights = f", {event.info.quantize}" if event.info.quantize != "none" else ""
    return (f"{event.info.name} loaded in {event.load_s:.1f} s (layers: {tiers}; "
            f"{human_bytes(sum(event.placement.bytes_per_tier.values()))}{weights}){where}")


def run_plain(config: Config, args: argparse.Namespace, **kwargs: Any) -> int:
    return PlainRepl(config, args, **kwargs).run()

