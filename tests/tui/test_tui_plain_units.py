"""Unit tests: the REPL's multiline rules, the shared history file and the stats formatting."""

from __future__ import annotations

from pathlib import Path

from glmchat.tui.format import eta, human_bytes
from glmchat.tui.history import PromptHistory, load_history
from glmchat.tui.plain_input import clean_input, input_complete
from prompt_toolkit.history import FileHistory


def test_backslash_continues_a_line() -> None:
    assert not input_complete("first line \\")
    assert input_complete("first line \\\nsecond")
    assert clean_input("first line \\\nsecond") == "first line \nsecond"


def test_triple_quotes_make_a_block() -> None:
    assert not input_complete('"""\ndef f():\n    return 1')
    block = '"""\ndef f():\n    return 1\n"""'
    assert input_complete(block)
    assert clean_input(block) == "def f():\n    return 1"


def test_plain_lines_are_sent_as_typed() -> None:
    assert input_complete("hello")
    assert clean_input("hello") == "hello"


def test_history_file_is_shared_with_prompt_toolkit(tmp_path: Path) -> None:
    path = tmp_path / "history"
    FileHistory(str(path)).store_string("from the repl\nsecond line")
    history = PromptHistory(path)
    history.add("from the tui")
    assert load_history(path) == ["from the repl\nsecond line", "from the tui"]
    assert list(FileHistory(str(path)).load_history_strings()) == [
        "from the tui", "from the repl\nsecond line"]


def test_history_walks_back_and_forth(tmp_path: Path) -> None:
    history = PromptHistory(None)
    for entry in ("one", "two"):
        history.add(entry)
    assert history.older() == "two"
    assert history.older() == "one"
    assert history.older() == "one"
    assert history.newer() == "two"
    assert history.newer() == ""


def test_formatting() -> None:
    assert human_bytes(3 * (1 << 30)) == "3.0 GiB"
    assert human_bytes(512) == "512 B"
    assert eta(2.0, 1, 4) == "6.0 s"
    assert eta(2.0, 0, 4) == ""
