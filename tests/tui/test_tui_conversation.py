"""Unit tests: conversation turns, branches and the observer hook the session store uses."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from glmchat.tui.conversation import Change, Conversation, start_conversation
from tui_fixtures import LOADED

from glmchat.config import Config, SessionsConfig
from glmchat.params import GenerationParams
from glmchat.protocol import Beam, GenerationResult, Timings


def result(text: str, beams: list[str] | None = None) -> GenerationResult:
    return GenerationResult(
        text=text, token_ids=[1, 2], prompt_token_ids=[3], finish_reason="eos",
        strategy="beam" if beams else "greedy", seed=None, params=GenerationParams(),
        timings=Timings(), beams=[Beam(b, [1], -0.1 * i) for i, b in enumerate(beams or [])])


def test_turns_become_chat_messages_and_observers_hear_each_change() -> None:
    seen: list[Change] = []
    conversation = Conversation()
    conversation.subscribe(lambda _c, change: seen.append(change))
    conversation.add_user("hi")
    conversation.add_assistant(result("hello"))
    assert [(m.role, m.content) for m in conversation.messages()] == [
        ("user", "hi"), ("assistant", "hello")]
    assert [c.kind for c in seen] == ["user", "assistant"]
    assert seen[1].turn is not None and seen[1].turn.result is not None


def test_edit_replaces_later_turns_and_keeps_them_as_a_branch() -> None:
    conversation = Conversation()
    for i in range(2):
        conversation.add_user(f"q{i}")
        conversation.add_assistant(result(f"a{i}"))
    conversation.edit(0, "q0 again")
    assert [t.content for t in conversation.turns] == ["q0 again"]
    assert [t.content for t in conversation.branches[0].turns] == ["q0", "a0", "q1", "a1"]
    with pytest.raises(IndexError):
        conversation.edit(3, "no such prompt")


def test_regenerate_drops_the_last_reply_only() -> None:
    conversation = Conversation()
    with pytest.raises(LookupError):
        conversation.regenerate()
    conversation.add_user("q")
    conversation.add_assistant(result("a"))
    assert conversation.regenerate() == 1
    assert [t.role for t in conversation.turns] == ["user"]
    assert conversation.branches[-1].reason == "regenerate"
    assert conversation.regenerate() == 1  # a prompt without a reply: answer it again


def test_choose_beam_replaces_the_reply_content() -> None:
    conversation = Conversation()
    conversation.add_user("q")
    conversation.add_assistant(result("best", beams=["best", "second"]))
    turn = conversation.choose_beam(1)
    assert (turn.content, turn.beam_index) == ("second", 1)
    assert conversation.messages()[-1].content == "second"
    with pytest.raises(IndexError):
        conversation.choose_beam(5)


def test_a_broken_off_reply_is_kept_without_a_result() -> None:
    conversation = Conversation()
    conversation.add_user("q")
    turn = conversation.add_assistant(None, "partial")
    assert (turn.content, turn.result) == ("partial", None)


def test_clear_keeps_the_old_turns_as_a_branch() -> None:
    conversation = Conversation()
    conversation.add_user("q")
    conversation.clear()
    assert len(conversation) == 0
    assert conversation.branches[-1].reason == "clear"


def test_the_session_store_records_turns_even_those_sent_before_the_model_loaded(
        tmp_path: Path) -> None:
    config = Config(sessions=SessionsConfig(dir=str(tmp_path)))
    args = argparse.Namespace(resume=None, session=None, no_save=False)
    conversation = start_conversation(config, args)
    conversation.add_user("typed while loading")
    conversation.set_model(LOADED)
    conversation.add_assistant(result("hello"))
    resumed = start_conversation(
        config, argparse.Namespace(resume=str(next(tmp_path.glob("*.jsonl"))), session=None,
                                   no_save=False))
    assert [(t.role, t.content) for t in resumed.turns] == [
        ("user", "typed while loading"), ("assistant", "hello")]


def test_no_save_keeps_nothing_on_disk(tmp_path: Path) -> None:
    config = Config(sessions=SessionsConfig(dir=str(tmp_path)))
    conversation = start_conversation(
        config, argparse.Namespace(resume=None, session=None, no_save=True))
    conversation.set_model(LOADED)
    conversation.add_user("q")
    assert not list(tmp_path.glob("*.jsonl"))
