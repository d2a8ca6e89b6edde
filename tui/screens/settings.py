"""The settings screen: every generation setting as a form. Values are parsed and checked by the
same code as ``/set`` (glmchat.tui.commands); a bad value gets its error under its field and the
screen stays open."""

from __future__ import annotations

from typing import Any, ClassVar

from glmchat.tui.commands import FIELD_TYPES, normalize_name, parse_value
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Select, Static

from glmchat.params import (
    BEAM_SCORERS,
    PARAM_NAMES,
    STRATEGIES,
    GenerationParams,
    param_problems,
)

HINTS: dict[str, str] = {
    "strategy": "greedy, sample or beam",
    "max_new_tokens": "≥ 1",
    "min_new_tokens": "EOS not before this many",
    "temperature": "sample: > 0",
    "top_k": "sample: 0 = off",
    "top_p": "sample: in (0, 1]",
    "seed": "sample: -1 = fresh each reply",
    "num_beams": "beam: 1 to 64",
    "num_return_sequences": "beam: beams kept",
    "length_penalty": "beam: > 0 favours longer",
    "early_stopping": "beam: stop at num_beams finished",
    "no_repeat_ngram_size": "0 = off",
    "stop": "comma-separated stop strings",
    "system_prompt": "empty = the model's default",
    "beam_scorer": "beam: auto, transformers or glm130b",
}


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(value)
    return str(value)


def field_of(problem: str) -> str:
    """The setting a param_problems sentence is about (they start with its name)."""
    first = normalize_name(problem.split(" ", 1)[0].rstrip(":"))
    return first if first in FIELD_TYPES else "strategy"


class SettingsScreen(ModalScreen[GenerationParams | None]):
    """Dismisses with the new params (Save, Ctrl+S) or None (Cancel, Esc)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"), Binding("ctrl+s", "save", "Save")]

    def __init__(self, params: GenerationParams) -> None:
        super().__init__()
        self.params = params

    def compose(self) -> ComposeResult:
        with Vertical(id="settings-dialog") as dialog:
            dialog.border_title = "Generation settings"
            dialog.border_subtitle = "Ctrl+S save · Esc cancel"
            with VerticalScroll(id="settings-form"):
                for name in PARAM_NAMES:
                    with Horizontal(classes="field"):
                        yield Label(name.replace("_", " "), classes="field-label")
                        yield self._editor(name)
                        yield Label(HINTS.get(name, ""), classes="field-hint")
                    yield Static("", id=f"error-{name}", classes="field-error")
            with Horizontal(id="settings-buttons"):
                yield Button("Save", variant="primary", id="save")
                yield Button("Cancel", id="cancel")

    def _editor(self, name: str) -> Select[str] | Checkbox | Input:
        value = getattr(self.params, name)
        if name in ("strategy", "beam_scorer"):
            choices = STRATEGIES if name == "strategy" else BEAM_SCORERS
            return Select([(s, s) for s in choices], value=value, allow_blank=False,
                          id=f"field-{name}", compact=True)
        if FIELD_TYPES[name] == "bool":
            return Checkbox(value=bool(value), id=f"field-{name}", compact=True)
        return Input(_text(value), id=f"field-{name}", compact=True)

    def values(self) -> tuple[dict[str, Any], dict[str, str]]:
        """(parsed values, errors by field) from the form as it stands."""
        values: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name in PARAM_NAMES:
            widget = self.query_one(f"#field-{name}")
            if isinstance(widget, Select | Checkbox):
                values[name] = widget.value
            elif isinstance(widget, Input):
                try:
                    values[name] = parse_value(name, widget.value)
                except ValueError as exc:
                    errors[name] = str(exc)
        if not errors:
            for problem in param_problems(values):
                errors.setdefault(field_of(problem), problem)
        return values, errors

    def show_errors(self, errors: dict[str, str]) -> None:
        for name in PARAM_NAMES:
            label = self.query_one(f"#error-{name}", Static)
            label.update(Text(errors.get(name, "")))
            label.display = name in errors
        if errors:
            first = next(iter(errors))
            self.query_one(f"#field-{first}").focus()

    def on_mount(self) -> None:
        self.show_errors({})
        self.query_one("#field-strategy").focus()

    def action_save(self) -> None:
        values, errors = self.values()
        self.show_errors(errors)
        if not errors:
            self.dismiss(GenerationParams.from_dict(values))

    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#save")
    def _save_pressed(self) -> None:
        self.action_save()

    @on(Button.Pressed, "#cancel")
    def _cancel_pressed(self) -> None:
        self.action_cancel()

    @on(Input.Submitted)
    def _input_submitted(self) -> None:
        self.action_save()
