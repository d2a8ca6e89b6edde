"""The plain REPL (`glmchat --plain`) on a pseudo-terminal: writes that fail mid-chat, and
`/save`'s refusals, driven as a user types them."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.faults.cases import fault
from tests.faults.harness import Screen, assert_readable, make_session

LIMIT = 20_000  # RLIMIT_FSIZE: both files below start just under it


def _type(screen: Screen, line: str) -> None:
    time.sleep(0.5)  # the prompt is up
    screen.send(line)
    time.sleep(0.3)  # typed, not pasted (a paste keeps its newline)
    screen.send("\r")


@fault("plain REPL with `--session` on a full disk (`RLIMIT_FSIZE`): the session file and "
       "the prompt history cannot grow",
       "the reply is shown; `The session could not be saved: … (File too large) … /save PATH` "
       "and `the prompt history … cannot be used` in place; `/save OTHER` writes it all",
       "the conversation in memory, then in OTHER; the session file as it was")
def test_plain_repl_disk_full_then_save_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    make_session(path, ("Name a colour.",))
    with path.open("ab") as f:  # a big file (blank lines are skipped), a small conversation
        f.write(b"\n" * (LIMIT - 100 - path.stat().st_size))
    before = path.read_bytes()
    data = tmp_path / "data"
    history = data / "glmchat" / "history"
    history.parent.mkdir(parents=True)
    history.write_text("\n# 2026-01-01 00:00:00\n+" + "x" * (LIMIT - 50) + "\n")
    history_before = history.read_bytes()
    elsewhere = tmp_path / "elsewhere.jsonl"
    screen = Screen("--plain", "--session", str(path), "--max-new-tokens", "6",
                    env={"XDG_DATA_HOME": str(data)}, file_size=LIMIT)
    screen.wait_for("Ctrl+D leaves", timeout=60)
    _type(screen, "Name a fruit.")
    screen.wait_for("cannot be used", timeout=60)  # the history, said at once
    screen.wait_for("could not be saved", timeout=180)
    screen.wait_for("/save PATH")
    screen.wait_for("tok/s", timeout=180)  # the reply was shown, in full
    since = len(screen.output)
    _type(screen, f"/save {elsewhere}")
    screen.wait_for("saved to", timeout=30, since=since)
    _type(screen, "/quit")
    assert screen.finish() == 0
    assert "Traceback" not in screen.output
    assert "File too large" in screen.output
    assert path.read_bytes() == before
    assert history.read_bytes() == history_before  # no torn entry
    session = assert_readable(elsewhere, events_at_least=3)
    assert [t.content for t in session.user_turns()] == ["Name a colour.", "Name a fruit."]
    assert session.assistant_turns() and session.assistant_turns()[-1].text


@fault("`/save PATH` in the REPL to a file that exists, or into a missing directory",
       "refused in place (`not saved: … exists already`, `… does not exist`); a new path "
       "gets the whole conversation, written to a temporary file and renamed",
       "the existing file, unchanged")
def test_plain_repl_save_refusals(tmp_path: Path) -> None:
    existing = tmp_path / "taken.jsonl"
    existing.write_text("mine\n")
    kept = tmp_path / "kept.jsonl"
    screen = Screen("--plain", "--no-save", "--max-new-tokens", "4")
    screen.wait_for("Ctrl+D leaves", timeout=60)
    _type(screen, "Name a colour.")
    screen.wait_for("tok/s", timeout=180)  # the reply is done
    for target, why in ((existing, "exists already"),
                        (tmp_path / "missing" / "s.jsonl", "does not exist")):
        since = len(screen.output)
        _type(screen, f"/save {target}")
        screen.wait_for("not saved", timeout=60, since=since)
        screen.wait_for(why, timeout=5, since=since)
    since = len(screen.output)
    _type(screen, f"/save {kept}")
    screen.wait_for("saved to", timeout=30, since=since)
    _type(screen, "/quit")
    assert screen.finish() == 0
    assert "Traceback" not in screen.output
    assert existing.read_text() == "mine\n"
    session = assert_readable(kept, events_at_least=2)
    assert [t.content for t in session.user_turns()] == ["Name a colour."]


@fault("TUI: the prompt history file cannot grow (a full disk, `RLIMIT_FSIZE`)",
       "`the prompt history … cannot be written (File too large); history is kept for this "
       "run only` in the transcript, once; the chat goes on; Ctrl+Q, exit 0",
       "the history file as it was; this run's prompts in memory (Up recalls them)")
def test_tui_history_disk_full(tmp_path: Path) -> None:
    data = tmp_path / "data"
    history = data / "glmchat" / "history"
    history.parent.mkdir(parents=True)
    history.write_text("\n# 2026-01-01 00:00:00\n+" + "x" * (LIMIT - 50) + "\n")
    before = history.read_bytes()
    cache = tmp_path / "cache" / "glmchat"  # its own worker.log, the shared converted model
    cache.mkdir(parents=True)
    (cache / "models").symlink_to(Path(os.environ["XDG_CACHE_HOME"]) / "glmchat" / "models")
    screen = Screen("--no-save", "--max-new-tokens", "4", file_size=LIMIT,
                    env={"XDG_DATA_HOME": str(data), "XDG_CACHE_HOME": str(cache.parent)})
    screen.wait_for("loaded in")
    screen.send("Name a colour.\r")
    screen.wait_for("cannot be written", timeout=60)
    screen.wait_for("File too large", timeout=10)
    time.sleep(1)
    screen.send("\x11")  # Ctrl+Q
    assert screen.finish() == 0
    assert "Traceback" not in screen.output
    assert history.read_bytes() == before
