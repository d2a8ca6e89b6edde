"""What comes in on stdin, and session files damaged or from elsewhere."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

from tests.faults.cases import fault
from tests.faults.harness import (
    SMALL,
    Live,
    assert_readable,
    assert_reported,
    glmchat,
    make_session,
)


@fault("invalid UTF-8 on stdin", "`stdin is not UTF-8 text (…)`, exit 2, before any worker",
       "—")
def test_invalid_utf8_on_stdin() -> None:
    run = glmchat(*SMALL, stdin=b"Name a colour\xff please\n")
    assert_reported(run, 2, "stdin is not UTF-8")


@fault("invalid UTF-8 in one line of `--each-line`",
       "`stdin is not UTF-8 text (line N, …)`, exit 2, before any prompt is sent", "—")
def test_invalid_utf8_in_each_line() -> None:
    run = glmchat("--each-line", *SMALL, stdin=b"Name a colour.\nand \xc3\x28 this\n")
    assert_reported(run, 2, "line 2")
    assert run.stdout == ""


@fault("NUL bytes and a 10 MB line on stdin (`--each-line`)",
       "the NUL line is answered; the 10 MB line fails at once (`far more than the N tokens …`), "
       "exit 2", "the replies printed before it")
def test_nul_bytes_and_a_10mb_line() -> None:
    huge = b"word " * (2 * 1024 * 1024)  # 10 MiB, one line
    run = glmchat("--each-line", *SMALL, stdin=b"Name a\x00 colour.\n" + huge + b"\n",
                  timeout=240)
    assert_reported(run, 2, "far more than")
    assert run.stdout.strip(), "the first line's reply"


@fault("session file from a newer glmchat", "`written by a newer glmchat …; upgrade`, exit 2",
       "the file, untouched")
def test_session_from_a_newer_format(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    make_session(path)
    lines = path.read_text().splitlines()
    header = json.loads(lines[0]) | {"version": 99}
    path.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    before = path.read_bytes()
    for args in (("--session", str(path), *SMALL, "hi"), ("sessions", "show", str(path)),
                 ("replay", str(path))):
        assert_reported(glmchat(*args), 2, "newer glmchat")
    assert path.read_bytes() == before


@fault("torn last line in a session (a crash mid-write)",
       "`sessions show` warns that the last line is incomplete and shows the rest, exit 0",
       "every whole line")
def test_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    make_session(path, ("Name a colour.", "Name a fruit."))
    with path.open("ab") as f:
        f.write(b'{"type": "user", "id": "u1", "content": "Name an ani')
    run = glmchat("sessions", "show", str(path))
    assert_reported(run, 0, "last line is incomplete")
    assert "Name a colour." in run.stdout and "Name a fruit." in run.stdout
    assert_readable(path, events_at_least=2, warnings=1)


def _append_many(path: str, prefix: str, count: int) -> None:
    from glmchat.sessions.domain import UserTurn
    from glmchat.sessions.store import SessionStore, load_session, new_event_id, utc_now

    store = SessionStore(Path(path).parent)
    session = load_session(Path(path))
    for i in range(count):
        store.append(session, UserTurn(id=new_event_id("u"), parent=None, time=utc_now(),
                                       content=f"{prefix} {i} " + "x" * 3000))


@fault("two processes appending to one session at once",
       "appends are locked and whole: no line is interleaved or lost", "every event of both")
def test_two_appenders(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    make_session(path)
    spawn = mp.get_context("spawn")
    writers = [spawn.Process(target=_append_many, args=(str(path), name, 150))
               for name in ("left", "right")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    session = assert_readable(path, events_at_least=301)
    contents = [e.content for e in session.events[1:]]
    for name in ("left", "right"):
        assert [c.split()[1] for c in contents if c.startswith(name)] == \
            [str(i) for i in range(150)]


@fault("a bad flag (`--temperature x`)",
       "two lines: `glmchat: error: argument --temperature: …` and `see glmchat --help`, exit 2",
       "—")
def test_usage_error_is_one_line() -> None:
    run = glmchat("--temperature", "x", "hi")
    assert_reported(run, 2, "--temperature")
    assert run.stderr.splitlines() == [
        "glmchat: error: argument --temperature: invalid float value: 'x'",
        "see glmchat --help"]
    sub = glmchat("sessions", "show")
    assert_reported(sub, 2)
    assert sub.stderr.splitlines()[-1] == "see glmchat sessions show --help"
    assert len(sub.stderr.splitlines()) == 2


@fault("a saved reply's text edited by hand, then `replay --check`",
       "a divergence: `the reply's text diverges at character N: the recorded text is not what "
       "the recorded tokens decode to`, exit 1", "the session file, untouched")
def test_replay_check_catches_an_edited_text(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    made = glmchat("--session", str(path), *SMALL, "Name a colour.")
    assert_reported(made, 0)
    lines = path.read_text().splitlines()
    reply = json.loads(lines[-1])
    assert reply["type"] == "assistant" and reply["text"]
    reply["text"] = "Edited: " + reply["text"]  # the token ids stay as they were
    path.write_text("\n".join([*lines[:-1], json.dumps(reply)]) + "\n")
    before = path.read_bytes()
    run = glmchat("replay", str(path), "--check")
    assert_reported(run, 1, "differ from the recording", error_line=False)  # a finding
    assert "text diverges at character 0" in run.stdout
    assert "recorded tokens decode to" in run.stdout
    assert path.read_bytes() == before


@fault("two `glmchat --session FILE \"…\"` one-shots at once on one session",
       "both answer, exit 0; their appends are locked and whole (two branches from the same "
       "turn)", "every event of both, the file loads without a warning")
def test_two_one_shots_on_one_session(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    make_session(path, ("Name a colour.",))
    prompts = ("Name a fruit.", "Name an animal.")
    runs = [Live("--session", str(path), *SMALL, prompt) for prompt in prompts]
    for live in runs:
        assert_reported(live.finish(240), 0)
    session = assert_readable(path, events_at_least=5)
    users = {t.content: t for t in session.user_turns()}
    assert set(prompts) <= set(users)
    replies = session.assistant_turns()
    for prompt in prompts:
        [reply] = [r for r in replies if r.parent == users[prompt].id]
        assert reply.text
    for line in path.read_bytes().splitlines():
        json.loads(line)  # nothing torn or interleaved
