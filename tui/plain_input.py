"""What the plain REPL's prompt accepts: Enter sends a complete input; a line ending in a
backslash continues; a block between lines of three double quotes is one prompt; Ctrl+J (or Esc
then Enter) inserts a newline."""

from __future__ import annotations

from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent

FENCE = '"""'
KEYS_HELP = ('Enter sends · a line ending in \\ continues · Ctrl+J or Esc Enter: newline · '
             '""" on its own line starts and ends a block · Ctrl+C stops a reply · '
             'Ctrl+C twice or Ctrl+D leaves')


def input_complete(text: str) -> bool:
    """Whether Enter should send ``text``: not when the last line ends in a backslash or a
    \"\"\" block is still open."""
    if text.endswith("\\"):
        return False
    stripped = text.lstrip()
    if stripped.startswith(FENCE):
        body = stripped[len(FENCE):]
        return FENCE in body
    return True


def clean_input(text: str) -> str:
    """The prompt as meant: fences removed, backslash continuations joined by newlines."""
    stripped = text.strip()
    if stripped.startswith(FENCE):
        body = stripped[len(FENCE):]
        end = body.rfind(FENCE)
        return (body[:end] if end >= 0 else body).strip("\n")
    return "\n".join(line[:-1] if line.endswith("\\") else line for line in text.split("\n"))


def key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("enter")
    def _enter(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        if input_complete(buffer.text):
            buffer.validate_and_handle()
        else:
            buffer.insert_text("\n")

    @bindings.add("c-j")
    @bindings.add("escape", "enter")
    def _newline(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    return bindings
