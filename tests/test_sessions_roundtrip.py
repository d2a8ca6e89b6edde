"""Functional: save a conversation through the real CLI in pipe mode on the embedded model, then
replay it with the real `glmchat replay --check`. Greedy, a sampled turn with a fresh recorded
seed, and a beam search turn; then a hand-edited reply must make the check fail with a diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli
from glmchat.sessions.domain import AssistantTurn
from glmchat.sessions.store import load_session

pytestmark = pytest.mark.slow
TOKENS = ("--max-new-tokens", "6")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("roundtrip") / "chat.jsonl"
    greedy = run_cli("--session", str(path), *TOKENS, "Name a colour.")
    assert greedy.returncode == 0, greedy.stderr
    sampled = run_cli("--session", str(path), *TOKENS, "--strategy", "sample", "--seed", "-1",
                      input="And another one?")
    assert sampled.returncode == 0, sampled.stderr
    beam = run_cli("--resume", str(path), *TOKENS, "--strategy", "beam", "--num-beams", "3",
                   "--num-return-sequences", "2", "Why that one?")
    assert beam.returncode == 0, beam.stderr
    replies = load_session(path).assistant_turns()
    for run, reply in zip((greedy, sampled, beam), replies, strict=True):
        assert run.stdout.strip() == reply.text.strip()
    return path


def test_pipe_mode_saves_every_turn_and_continues_the_context(saved: Path) -> None:
    session = load_session(saved)
    assert session.warnings == []
    assert [t.content for t in session.user_turns()] == [
        "Name a colour.", "And another one?", "Why that one?"]
    greedy, sampled, beam = session.assistant_turns()
    assert [r.strategy for r in (greedy, sampled, beam)] == ["greedy", "sample", "beam"]
    assert isinstance(sampled.seed, int) and sampled.params.seed == -1  # the fresh seed is kept
    assert len(beam.beams) == 2 and beam.beams[0].score >= beam.beams[1].score
    assert beam.token_ids == beam.beams[0].token_ids
    # Each exchange was sent with the ones before it.
    assert [m.content for m in beam.request.messages] == [
        "Name a colour.", greedy.text, "And another one?", sampled.text, "Why that one?"]
    assert all(isinstance(t, AssistantTurn) and t.prompt_token_ids for t in (greedy, beam))
    assert len(beam.prompt_token_ids) > len(greedy.prompt_token_ids)


def test_replay_check_passes(saved: Path) -> None:
    replay = run_cli("replay", str(saved), "--check")
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert replay.stdout.count("tokens match") == 3
    assert "all 3 replayed replies match" in replay.stderr
    for reply in load_session(saved).assistant_turns():
        assert reply.text in replay.stdout


def test_a_hand_edited_reply_fails_the_check_with_a_diff(saved: Path, tmp_path: Path) -> None:
    header, user, reply = (json.loads(line) for line in saved.read_text().splitlines()[:3])
    reply["token_ids"][2] += 1
    header["model"]["digest"] = "0" * 64  # as if the weights had changed since
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in (header, user, reply)))
    replay = run_cli("replay", str(edited), "--check")
    assert replay.returncode == 1, replay.stdout + replay.stderr
    assert "weights differ from the session's" in replay.stderr
    assert replay.stderr.index("weights differ") < replay.stderr.index("1 of 1 replies differ")
    assert "the reply's tokens diverge at token 2" in replay.stdout
    assert "recorded ids" in replay.stdout and "replayed ids" in replay.stdout
    assert "1 of 1 replies differ" in replay.stderr
