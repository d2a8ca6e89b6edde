"""The key bar: the bindings that apply now, on one line. Textual's Footer makes a widget per
key, which cost about 0.2 s of the first paint here; this is one Static redrawn when the
screen's bindings change (focus moves, a reply starts or ends)."""

from __future__ import annotations

from rich.text import Text
from textual.screen import Screen
from textual.widgets import Static


class KeyBar(Static):
    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)
        self._bindings_changed(self.screen)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def _bindings_changed(self, screen: Screen[object]) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        seen: set[str] = set()
        for _node, binding, enabled, _tooltip in screen.active_bindings.values():
            if not binding.show or binding.action in seen:
                continue
            seen.add(binding.action)
            key = self.app.get_key_display(binding)
            text.append(f" {key} ", style="bold reverse" if enabled else "dim reverse")
            text.append(f" {binding.description}  ", style="" if enabled else "dim")
        self.update(text)
