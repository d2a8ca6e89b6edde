"""Slash commands, shared by the TUI and the plain REPL: parse a line, apply settings to the
generation params, hand everything else back as an action for the front end to perform.

    run_command("/set temperature 0.7", params) → SettingsChanged(params', "temperature = 0.7")
    run_command("/regen", params)               → ActionRequested("regenerate")
    run_command("/set top_p 7", params)         → CommandFailed("top_p = 7.0 is invalid: …")
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from typing import Any

from glmchat.params import PARAM_NAMES, STRATEGIES, GenerationParams, param_problems

# name → (usage, what it does); the order is the order /help lists them in.
COMMANDS: dict[str, tuple[str, str]] = {
    "help": ("/help", "this list"),
    "set": ("/set [NAME VALUE]", "change a generation setting; alone: show them all"),
    "strategy": ("/strategy greedy|sample|beam [N]", "decoding strategy; N = beams for beam"),
    "temperature": ("/temperature T", "sampling temperature (> 0)"),
    "seed": ("/seed N", "sampling seed (-1 = fresh each reply)"),
    "system": ("/system [TEXT]", "system prompt; alone: back to the model's default"),
    "settings": ("/settings", "all settings (TUI: a form; REPL: a list)"),
    "regen": ("/regen", "make the last reply again"),
    "edit": ("/edit [N]", "edit prompt N (default: the last) and resend; later turns go"),
    "beams": ("/beams", "the last beam-search reply's beams with scores"),
    "pick": ("/pick N", "continue with beam N of the last reply"),
    "clear": ("/clear", "start a new conversation (alias /new)"),
    "restart": ("/restart", "restart the worker process (reloads the model)"),
    "save": ("/save PATH", "write the conversation to a new session file; later turns go there"),
    "quit": ("/quit", "leave (alias /exit)"),
}
ALIASES = {"new": "clear", "exit": "quit", "q": "quit", "regenerate": "regen", "h": "help",
           "?": "help", "temp": "temperature", "params": "set"}
ACTIONS = ("regen", "edit", "beams", "pick", "clear", "restart", "quit", "settings", "help",
           "save")

FIELD_TYPES: dict[str, Any] = {f.name: f.type for f in dataclasses.fields(GenerationParams)}


@dataclass(frozen=True)
class SettingsChanged:
    params: GenerationParams
    message: str


@dataclass(frozen=True)
class ActionRequested:
    action: str  # one of ACTIONS
    argument: int | None = None  # /edit N, /pick N: 1-based as typed
    text: str = ""  # /save PATH: the path


@dataclass(frozen=True)
class CommandFailed:
    error: str


Outcome = SettingsChanged | ActionRequested | CommandFailed


def is_command(line: str) -> bool:
    """A slash command; '//text' sends '/text' as a prompt."""
    return line.startswith("/") and not line.startswith("//")


def help_text() -> str:
    width = max(len(usage) for usage, _ in COMMANDS.values())
    lines = [f"{usage.ljust(width)}  {what}" for usage, what in COMMANDS.values()]
    lines.append("Setting names: " + ", ".join(PARAM_NAMES) + ". Start a prompt with // to "
                 "send a literal /.")
    return "\n".join(lines)


def settings_text(params: GenerationParams) -> str:
    return "\n".join(f"{name} = {format_value(getattr(params, name))}" for name in PARAM_NAMES)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(value) if value else "(none)"
    if isinstance(value, str):
        return value if value else "(model default)"
    return str(value)


def normalize_name(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def parse_value(name: str, text: str) -> Any:
    """``text`` as the type of setting ``name``; ValueError with a readable sentence if not."""
    kind = FIELD_TYPES[name]
    text = text.strip()
    if kind == "bool":
        lowered = text.lower()
        if lowered in ("true", "on", "yes", "1"):
            return True
        if lowered in ("false", "off", "no", "0"):
            return False
        raise ValueError(f"{name}: {text!r} is not true or false")
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a whole number") from None
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}: {text!r} is not a number") from None
    if kind == "list[str]":
        return [part.strip() for part in text.split(",") if part.strip()] if text else []
    return text


def apply_settings(params: GenerationParams, changes: dict[str, Any]) -> GenerationParams:
    """``params`` with ``changes``; ValueError naming the first problem of the result."""
    merged = params.to_dict() | changes
    problems = param_problems(merged)
    if problems:
        raise ValueError(problems[0])
    return GenerationParams.from_dict(merged)


def _set(params: GenerationParams, words: list[str], rest: str) -> Outcome:
    if not words:
        return ActionRequested("settings")
    name = normalize_name(words[0])
    if name not in FIELD_TYPES:
        return CommandFailed(f"unknown setting {words[0]!r}; settings: {', '.join(PARAM_NAMES)}")
    value_text = rest.split(None, 1)[1] if len(rest.split(None, 1)) > 1 else ""
    if not value_text and FIELD_TYPES[name] not in ("str", "list[str]"):
        return CommandFailed(f"/set {name} needs a value, e.g. /set {name} "
                             f"{format_value(getattr(GenerationParams(), name))}")
    return _change(params, {name: value_text}, raw=True)


def _change(params: GenerationParams, changes: dict[str, Any], raw: bool = False) -> Outcome:
    try:
        if raw:
            changes = {name: parse_value(name, text) for name, text in changes.items()}
        new = apply_settings(params, changes)
    except ValueError as exc:
        return CommandFailed(str(exc))
    message = ", ".join(f"{name} = {format_value(getattr(new, name))}" for name in changes)
    return SettingsChanged(new, message)


def _number_argument(name: str, words: list[str]) -> int | CommandFailed | None:
    if not words:
        return None
    try:
        number = int(words[0])
    except ValueError:
        return CommandFailed(f"/{name} takes a number, not {words[0]!r}")
    if number < 1:
        return CommandFailed(f"/{name} counts from 1")
    return number


def run_command(line: str, params: GenerationParams) -> Outcome:
    """Parse and apply one slash command against ``params`` (which is never modified)."""
    body = line.strip()[1:]
    head, _, rest = body.partition(" ")
    name = ALIASES.get(head.lower(), head.lower())
    try:
        words = shlex.split(rest)
    except ValueError:
        words = rest.split()
    if name not in COMMANDS:
        return CommandFailed(f"unknown command /{head}; /help lists the commands")
    if name == "set":
        return _set(params, words, rest.strip())
    if name == "strategy":
        if not words or words[0].lower() not in STRATEGIES or len(words) > 2:
            return CommandFailed("use /strategy greedy, /strategy sample or /strategy beam [N]")
        strategy = words[0].lower()
        if len(words) == 2:
            if strategy != "beam":
                return CommandFailed("only beam search takes a number (of beams)")
            return _change(params, {"strategy": strategy, "num_beams": words[1]}, raw=True)
        return _change(params, {"strategy": strategy})
    if name in ("temperature", "seed"):
        if len(words) != 1:
            return CommandFailed(f"use /{name} VALUE")
        return _change(params, {name: words[0]}, raw=True)
    if name == "system":
        return _change(params, {"system_prompt": rest.strip()})
    if name == "save":
        if not rest.strip():
            return CommandFailed("use /save PATH, e.g. /save ~/chat.jsonl")
        return ActionRequested("save", text=words[0] if len(words) == 1 else rest.strip())
    if name in ("edit", "pick"):
        number = _number_argument(name, words)
        if isinstance(number, CommandFailed):
            return number
        if name == "pick" and number is None:
            return CommandFailed("use /pick N, N from /beams")
        return ActionRequested(name, number)
    return ActionRequested(name)

