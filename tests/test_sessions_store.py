"""Unit tests for sessions: the store, the format's failure modes, the recorder, the commands.
No model is loaded; replies are made-up GenerationResults."""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from glmchat.sessions.cli import replay_main, sessions_main
from glmchat.sessions.domain import AssistantTurn, UserTurn
from glmchat.sessions.recorder import SessionRecorder, open_recorder
from glmchat.sessions.records import FORMAT_VERSION, SessionFileError
from glmchat.sessions.store import SessionStore, load_session
from hypothesis import given, settings
from hypothesis import strategies as st

from glmchat.params import GenerationParams
from glmchat.protocol import (
    Beam,
    ChatMessage,
    GenerationResult,
    Loaded,
    ModelInfo,
    Placement,
    Span,
    Timings,
)

INFO = ModelInfo(name="Tiny", source="default", weights_dir="/w", digest="ab" * 32,
                 architecture="LlamaForCausalLM", n_params=1000, dtype="float32", n_layers=2,
                 context_length=512, has_chat_template=True, eos_token_ids=[2])
PLACEMENT = Placement(device_map={"": "cpu"}, layers_per_tier={"cpu": 2},
                      bytes_per_tier={"cpu": 4000}, n_layers=2, runtime="resident",
                      gpu_available=False)


def result(text: str = "Hello there", strategy: str = "greedy", seed: int | None = None,
           **extra: Any) -> GenerationResult:
    ids = [100 + i for i in range(len(text.split()))]
    return GenerationResult(
        text=text, token_ids=ids, prompt_token_ids=[1, 5, 6], finish_reason="length",
        strategy=strategy, seed=seed, params=GenerationParams(strategy=strategy, seed=seed or -1),
        timings=Timings(prefill_tokens=3, decode_tokens=len(ids), decode_tokens_per_s=12.5,
                        ttft_s=0.1), **extra)


@pytest.fixture
def store(tmp_path: Path) -> SessionStore:
    return SessionStore(tmp_path / "sessions")


def recorded(store: SessionStore) -> SessionRecorder:
    recorder = SessionRecorder(store)
    recorder.start(INFO, PLACEMENT)
    return recorder


def one_exchange(store: SessionStore) -> Path:
    recorder = recorded(store)
    asked, request = recorder.ask("hi")
    recorder.assistant(result(), parent=asked.id, messages=request.messages)
    assert recorder.path is not None
    return recorder.path


# ---- the store -----------------------------------------------------------------------------------


def test_round_trip_keeps_every_field(store: SessionStore) -> None:
    recorder = recorded(store)
    assert recorder.path is None  # nothing saved until the first turn
    recorder.setting("temperature", 0.5)
    asked, request = recorder.ask("Fill: def f([MASK]):")
    beams = [Beam("a b", [7, 8], -0.25), Beam("a c", [7, 9], float("nan"))]
    reply = recorder.assistant(
        result("a b", strategy="beam", beams=beams, spans=[Span(0, 1, "[MASK]")]),
        parent=asked.id, messages=request.messages)
    sampled = recorder.assistant(result("x y z", strategy="sample", seed=42), parent=asked.id)

    session = load_session(recorder.path or Path())
    assert session.warnings == []
    assert session.header.model.digest == INFO.digest
    assert session.header.placement is not None
    assert session.header.placement.layers_per_tier == {"cpu": 2}
    assert session.settings() == {"temperature": 0.5}
    turns = session.turns()
    loaded = turns[reply.id]
    assert isinstance(loaded, AssistantTurn)
    assert loaded.token_ids == reply.token_ids and loaded.beams[0] == beams[0]
    assert loaded.beams[1].token_ids == [7, 9]
    assert loaded.spans == [Span(0, 1, "[MASK]")]
    assert loaded.request.messages == [ChatMessage("user", "Fill: def f([MASK]):")]
    assert loaded.timings.decode_tokens_per_s == 12.5
    again = turns[sampled.id]
    assert isinstance(again, AssistantTurn) and again.seed == 42 and again.strategy == "sample"


def test_each_line_is_one_json_object_and_the_header_comes_first(store: SessionStore) -> None:
    path = one_exchange(store)
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert records[0]["format"] == "glmchat-session"
    assert records[0]["version"] == FORMAT_VERSION
    assert [r["type"] for r in records] == ["header", "user", "assistant"]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


@settings(max_examples=40, deadline=None)
@given(text=st.text(min_size=1))
def test_any_text_survives(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    store = SessionStore(tmp_path_factory.mktemp("h"))
    recorder = recorded(store)
    turn = recorder.user(text)
    assert load_session(recorder.path or Path()).turns()[turn.id] == turn


def test_edits_and_regenerations_branch_and_keep_the_old_turns(store: SessionStore) -> None:
    recorder = recorded(store)
    first = recorder.user("one")
    first_reply = recorder.assistant(result("reply one"))
    second = recorder.user("two")
    old_reply = recorder.assistant(result("old two"))
    new_reply = recorder.regenerate(result("new two"), of=old_reply.id)
    assert new_reply.parent == second.id and new_reply.regenerates == old_reply.id
    edited = recorder.edit(second.id, "two, edited")
    assert isinstance(edited, UserTurn) and edited.parent == first_reply.id
    recorder.assistant(result("answer to edit"))

    session = load_session(recorder.path or Path())
    assert [m.content for m in session.messages()] == [
        "one", "reply one", "two, edited", "answer to edit"]
    assert len(session.turns()) == 7  # nothing overwritten
    assert {t.id for t in session.alternatives(session.turns()[edited.id])} == {second.id}
    recorder.select(new_reply.id)
    session = load_session(recorder.path or Path())
    assert [m.content for m in session.messages()][-1] == "new two"
    assert [t.id for t in session.branch()] == [first.id, first_reply.id, second.id,
                                                new_reply.id]


def test_a_chosen_beam_is_what_the_conversation_continues_with(store: SessionStore) -> None:
    recorder = recorded(store)
    recorder.user("q")
    reply = recorder.assistant(result("a b", strategy="beam",
                                      beams=[Beam("a b", [1], -0.1), Beam("c d", [2], -0.2)]))
    recorder.choose_beam(reply.id, 1)
    assert recorder.messages()[-1] == ChatMessage("assistant", "c d")
    assert recorder.history()[-1].beam_index == 1


def test_a_torn_last_line_is_skipped_with_a_warning(store: SessionStore) -> None:
    path = one_exchange(store)
    with path.open("ab") as f:
        f.write(b'{"type":"user","id":"u1","parent":null,"content":"half a li')
    session = load_session(path)
    assert len(session.events) == 2
    assert len(session.warnings) == 1 and "last line is incomplete" in session.warnings[0]

    # The next append ends the fragment first, so the new line stays whole.
    recorder = SessionRecorder(store)
    recorder.resume(path)
    recorder.start(INFO, PLACEMENT)
    turn = recorder.user("after the crash")
    session = load_session(path)
    assert session.events[-1] == turn
    assert len(session.warnings) == 1 and "line 4 is damaged" in session.warnings[0]


def test_an_empty_file_is_refused_but_can_become_a_session(store: SessionStore,
                                                           tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    with pytest.raises(SessionFileError, match="is empty: not a glmchat session"):
        load_session(empty)
    args = argparse.Namespace(session=empty, resume=None, no_save=False)
    recorder = open_recorder(_config(tmp_path), args, oneshot=True)
    assert recorder is not None
    recorder.start(INFO, PLACEMENT)
    recorder.user("first")
    assert len(load_session(empty).events) == 1


def test_a_newer_format_version_is_refused(store: SessionStore) -> None:
    path = one_exchange(store)
    lines = path.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["version"] = FORMAT_VERSION + 1
    newer = path.with_name("newer.jsonl")
    newer.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    with pytest.raises(SessionFileError, match=r"written by a newer glmchat .*upgrade glmchat"):
        load_session(newer)


def test_a_random_binary_file_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(random.Random(4).randbytes(20000))
    with pytest.raises(SessionFileError, match="is not a glmchat session file"):
        load_session(junk)
    not_ours = tmp_path / "other.jsonl"
    not_ours.write_text('{"hello": "world"}\n')
    with pytest.raises(SessionFileError, match="not a session header"):
        load_session(not_ours)


def _append_many(path_text: str, writer: int, count: int) -> None:
    store = SessionStore(Path(path_text).parent)
    recorder = SessionRecorder(store, path=Path(path_text))
    recorder.start(INFO, PLACEMENT)
    payload = f"writer {writer} " + "x" * 9000  # lines longer than a pipe buffer or a page
    for i in range(count):
        recorder.setting(f"w{writer}", f"{i} {payload}")


def test_concurrent_appends_from_two_processes_do_not_interleave(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    count = 150
    ctx = mp.get_context("spawn")
    writers = [ctx.Process(target=_append_many, args=(str(path), w, count)) for w in (1, 2)]
    for p in writers:
        p.start()
    for p in writers:
        p.join(120)
        assert p.exitcode == 0
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    records = [json.loads(line) for line in lines[:-1]]  # every line parses
    assert records[0]["type"] == "header" and all(r["type"] == "setting" for r in records[1:])
    for w in (1, 2):
        values = [r["value"] for r in records[1:] if r["name"] == f"w{w}"]
        assert [int(v.split()[0]) for v in values] == list(range(count))
    assert load_session(path).warnings == []


# ---- finding sessions ----------------------------------------------------------------------------


def test_resolve_by_id_prefix_and_file(store: SessionStore) -> None:
    path = one_exchange(store)
    assert store.resolve(path.stem) == path
    assert store.resolve(path.stem[:-2]) == path
    assert store.resolve(str(path)) == path
    with pytest.raises(SessionFileError, match="no session 'nope'"):
        store.resolve("nope")


def test_summaries_are_newest_first_and_name_broken_files(store: SessionStore) -> None:
    older = one_exchange(store)
    newer = one_exchange(store)
    _rewrite_created(older, "2020-01-01T00:00:00Z")
    (store.directory / "broken.jsonl").write_bytes(b"\x00\x01")
    rows = store.summaries()
    assert [r.path for r in rows[:2]] == [newer, older]
    assert rows[0].turns == 1 and rows[0].first_prompt == "hi" and rows[0].model == "Tiny"
    assert "not a glmchat session" in rows[2].problem


def _rewrite_created(path: Path, created: str) -> None:
    lines = path.read_text().splitlines(keepends=True)
    header = json.loads(lines[0])
    header["created"] = created
    path.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))


# ---- the recorder as a Conversation observer (tui/conversation.py's shape) -----------------------


@dataclass
class FakeTurn:
    role: str
    content: str
    result: GenerationResult | None = None
    beam_index: int = 0


@dataclass(frozen=True)
class FakeChange:
    kind: str
    index: int = -1
    turn: FakeTurn | None = None


@dataclass
class FakeConversation:
    turns: list[FakeTurn] = field(default_factory=list)
    model: Loaded | None = None


def test_observe_records_a_conversation_with_edits_and_regenerations(
        store: SessionStore) -> None:
    recorder = SessionRecorder(store)
    conv = FakeConversation(model=Loaded(INFO, PLACEMENT, 1.0))

    def add(turn: FakeTurn, kind: str | None = None) -> None:
        conv.turns.append(turn)
        recorder.observe(conv, FakeChange(kind or turn.role, len(conv.turns) - 1, turn))

    recorder.observe(conv, FakeChange("model"))
    add(FakeTurn("user", "one"))
    add(FakeTurn("assistant", "r1", result("r1")))
    add(FakeTurn("user", "two"))
    add(FakeTurn("assistant", "r2", result("r2")))
    del conv.turns[3:]
    recorder.observe(conv, FakeChange("regenerate", 3))
    add(FakeTurn("assistant", "r2 again", result("r2 again")))
    del conv.turns[2:]
    add(FakeTurn("user", "two, edited"), kind="edit")
    add(FakeTurn("assistant", "r3", result("r3", strategy="beam",
                                            beams=[Beam("r3", [1], -1.0), Beam("r4", [2], -2.0)])))
    conv.turns[3].content, conv.turns[3].beam_index = "r4", 1
    recorder.observe(conv, FakeChange("beam", 3, conv.turns[3]))

    session = load_session(recorder.path or Path())
    assert [m.content for m in session.messages()] == ["one", "r1", "two, edited", "r4"]
    replies = session.assistant_turns()
    assert replies[2].regenerates == replies[1].id
    assert replies[3].request.messages == [ChatMessage("user", "one"),
                                           ChatMessage("assistant", "r1"),
                                           ChatMessage("user", "two, edited")]
    assert [(t.role, t.content) for t in recorder.history()] == [
        ("user", "one"), ("assistant", "r1"), ("user", "two, edited"), ("assistant", "r4")]
    recorder.observe(conv, FakeChange("clear"))
    recorder.observe(conv, FakeChange("user", 0, FakeTurn("user", "fresh")))
    assert recorder.path is not None and recorder.path != session.path


def test_no_save_keeps_the_conversation_in_memory_only(store: SessionStore,
                                                       tmp_path: Path) -> None:
    args = argparse.Namespace(session=None, resume=None, no_save=True)
    recorder = open_recorder(_config(tmp_path), args)
    assert recorder is not None
    recorder.start(INFO, PLACEMENT)
    recorder.user("secret")
    assert recorder.path is None and recorder.messages() == [ChatMessage("user", "secret")]
    assert not (tmp_path / "sessions").exists()


# ---- the commands --------------------------------------------------------------------------------


def _config(tmp_path: Path) -> Any:
    from glmchat.config import load_config

    return load_config(_config_file(tmp_path))


def _config_file(tmp_path: Path) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(f'[sessions]\ndir = "{tmp_path / "sessions"}"\n')
    return config


def test_sessions_list_show_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = SessionStore(tmp_path / "sessions")
    recorder = recorded(store)
    recorder.user("Fill the [MASK] please")
    recorder.assistant(result("the blank", strategy="beam", spans=[Span(0, 3, "[MASK]")],
                              beams=[Beam("the blank", [1], -0.5), Beam("a gap", [2], -0.7)]))
    path = recorder.path
    assert path is not None
    cfg = str(_config_file(tmp_path))
    assert sessions_main(["--config", cfg]) == 0
    out = capsys.readouterr().out
    assert path.stem in out and "Tiny" in out and "Fill the [MASK] please" in out
    assert sessions_main(["--config", cfg, "show", path.stem]) == 0
    assert "the blank" in capsys.readouterr().out
    assert sessions_main(["--config", cfg, "export", path.stem, "--format", "md"]) == 0
    markdown = capsys.readouterr().out
    assert "⟦the⟧ blank" in markdown and "score -0.700" in markdown and "(chosen)" in markdown
    assert sessions_main(["--config", cfg, "export", str(path), "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert [e["type"] for e in document["events"]] == ["user", "assistant"]


def test_rm_asks_and_refuses_without_a_terminal(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = one_exchange(SessionStore(tmp_path / "sessions"))
    cfg = str(_config_file(tmp_path))
    assert sessions_main(["--config", cfg, "rm", path.stem]) == 2  # stdin is not a tty here
    assert "pass --yes" in capsys.readouterr().err and path.exists()
    assert sessions_main(["--config", cfg, "rm", path.stem, "--yes"]) == 0
    assert not path.exists()


@pytest.mark.parametrize("content,message", [
    (b"", "is empty"),
    (random.Random(7).randbytes(5000), "not a glmchat session file"),
    (b'{"format":"glmchat-session","version":99,"type":"header","id":"x","model":{}}\n',
     "newer glmchat"),
])
def test_bad_files_give_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            content: bytes, message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    for main, argv in ((replay_main, [str(bad), "--check"]),
                       (sessions_main, ["show", str(bad)]),
                       (sessions_main, ["export", str(bad)])):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_resume_continues_with_the_sessions_model_unless_one_is_typed(tmp_path: Path) -> None:
    weights = tmp_path / "my-model"
    weights.mkdir()
    recorder = SessionRecorder(SessionStore(tmp_path / "sessions"))
    recorder.start(dataclasses.replace(INFO, source=str(weights)), PLACEMENT)
    recorder.user("hi")
    assert recorder.path is not None
    resume = argparse.Namespace(session=None, resume=recorder.path.stem, no_save=False)

    config = _config(tmp_path)
    resumed = open_recorder(config, resume, oneshot=True)
    assert resumed is not None and resumed.notes == []
    assert config.model.path == str(weights)
    assert resumed.messages() == [ChatMessage("user", "hi")]

    config = _config(tmp_path)
    open_recorder(config, argparse.Namespace(**vars(resume), model="default"), oneshot=True)
    assert config.model.path == "default"

    weights.rmdir()
    config = _config(tmp_path)
    resumed = open_recorder(config, resume, oneshot=True)
    assert resumed is not None and config.model.path == "default"
    assert "is not there any more; continuing with default" in resumed.notes[0]


def test_resumed_params_are_the_last_replys_then_later_settings(store: SessionStore) -> None:
    recorder = recorded(store)
    base = GenerationParams()
    assert recorder.resumed_params(base) == base
    recorder.user("q")
    recorder.assistant(result("a", strategy="sample", seed=9))
    recorder.settings_changed(GenerationParams(strategy="sample"),
                              GenerationParams(strategy="sample", temperature=0.2))
    resumed = SessionRecorder(store)
    resumed.resume(recorder.path or Path())
    params = resumed.resumed_params(base)
    assert (params.strategy, params.seed, params.temperature) == ("sample", 9, 0.2)
