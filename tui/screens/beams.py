"""The beam view: every beam of the last beam-search reply with its score; pick one to continue
the conversation with it instead of the best."""

from __future__ import annotations

from typing import ClassVar

from rich.console import Group
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import OptionList
from textual.widgets.option_list import Option

from glmchat.protocol import Beam


def beam_option(number: int, beam: Beam, chosen: bool) -> Group:
    head = Text(f"#{number}", style="bold")
    head.append(f"  score {beam.score:.3f}  ·  {len(beam.token_ids)} tokens", style="dim")
    if chosen:
        head.append("  ← in the conversation", style="green")
    return Group(head, Text(beam.text.strip() or "(empty)"), Text(""))


class BeamScreen(ModalScreen[int | None]):
    """Dismisses with the chosen beam's index (Enter) or None (Esc)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Close")]

    def __init__(self, beams: list[Beam], chosen: int = 0) -> None:
        super().__init__()
        self.beams = beams
        self.chosen = chosen

    def compose(self) -> ComposeResult:
        with Vertical(id="beam-dialog") as dialog:
            dialog.border_title = f"{len(self.beams)} beams, best first"
            dialog.border_subtitle = "Enter continue with this beam · Esc close"
            yield OptionList(*[Option(beam_option(i + 1, beam, i == self.chosen), id=str(i))
                               for i, beam in enumerate(self.beams)], id="beam-list")

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        options.highlighted = self.chosen
        options.focus()

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option_index)

    def action_cancel(self) -> None:
        self.dismiss(None)
