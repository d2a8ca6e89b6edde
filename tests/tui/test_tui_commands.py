"""Unit tests: the slash-command parser/applier shared by the TUI and the REPL."""

from __future__ import annotations

import pytest
from glmchat.tui.commands import (
    ActionRequested,
    CommandFailed,
    SettingsChanged,
    help_text,
    is_command,
    parse_value,
    run_command,
)

from glmchat.params import GenerationParams

PARAMS = GenerationParams()


def changed(line: str) -> GenerationParams:
    outcome = run_command(line, PARAMS)
    assert isinstance(outcome, SettingsChanged), outcome
    return outcome.params


def failed(line: str) -> str:
    outcome = run_command(line, PARAMS)
    assert isinstance(outcome, CommandFailed), outcome
    return outcome.error


def test_set_parses_each_type() -> None:
    assert changed("/set temperature 0.3").temperature == 0.3
    assert changed("/set max-new-tokens 12").max_new_tokens == 12
    assert changed("/set early_stopping on").early_stopping is True
    assert changed("/set stop END, ###").stop == ["END", "###"]
    assert changed("/set system_prompt be brief and kind").system_prompt == "be brief and kind"


def test_shortcuts() -> None:
    beam = changed("/strategy beam 6")
    assert (beam.strategy, beam.num_beams) == ("beam", 6)
    assert changed("/strategy sample").strategy == "sample"
    assert changed("/temp 1.2").temperature == 1.2
    assert changed("/seed 7").seed == 7
    assert changed("/system Answer in French.").system_prompt == "Answer in French."
    assert changed("/system").system_prompt == ""


def test_the_original_params_are_not_modified() -> None:
    changed("/set temperature 0.1")
    assert PARAMS.temperature == GenerationParams().temperature


@pytest.mark.parametrize(("line", "says"), [
    ("/set top_p 7", "top_p = 7.0 is invalid"),
    ("/set temperature warm", "'warm' is not a number"),
    ("/set max_new_tokens 2.5", "not a whole number"),
    ("/set colour blue", "unknown setting 'colour'"),
    ("/set temperature", "needs a value"),
    ("/strategy fast", "use /strategy greedy"),
    ("/strategy greedy 3", "only beam search takes a number"),
    ("/strategy beam 0", "num_beams = 0 is invalid"),
    ("/set min_new_tokens 999", "cannot exceed max_new_tokens"),
    ("/frobnicate", "unknown command /frobnicate"),
    ("/pick", "use /pick N"),
    ("/edit two", "takes a number"),
    ("/pick 0", "counts from 1"),
])
def test_bad_commands_say_what_is_wrong(line: str, says: str) -> None:
    assert says in failed(line)


@pytest.mark.parametrize(("line", "action", "argument"), [
    ("/help", "help", None), ("/?", "help", None), ("/regen", "regen", None),
    ("/edit", "edit", None), ("/edit 2", "edit", 2), ("/pick 3", "pick", 3),
    ("/beams", "beams", None), ("/clear", "clear", None), ("/new", "clear", None),
    ("/quit", "quit", None), ("/exit", "quit", None), ("/settings", "settings", None),
    ("/set", "settings", None), ("/restart", "restart", None),
])
def test_actions_go_back_to_the_front_end(line: str, action: str, argument: int | None) -> None:
    assert run_command(line, PARAMS) == ActionRequested(action, argument)


def test_command_detection_and_escape() -> None:
    assert is_command("/help")
    assert not is_command("//help is a literal slash")
    assert not is_command("hello /help")


def test_parse_value_matches_field_types() -> None:
    assert parse_value("top_k", " 40 ") == 40
    assert parse_value("stop", "") == []
    with pytest.raises(ValueError, match="true or false"):
        parse_value("early_stopping", "maybe")


def test_help_lists_every_command() -> None:
    text = help_text()
    for name in ("/set", "/strategy", "/system", "/regen", "/edit", "/beams", "/pick", "/clear",
                 "/quit", "/help"):
        assert name in text
