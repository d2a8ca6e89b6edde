"""Config: the packaged config.toml is the schema and the defaults; user files and flags."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from glmchat.cli import build_parser, config_from
from glmchat.config import default_toml_text, load_config
from glmchat.errors import UsageError
from glmchat.params import GenerationParams

REPO = Path(__file__).resolve().parents[1]


def test_packaged_config_is_the_repo_config_toml() -> None:
    assert default_toml_text() == (REPO / "config.toml").read_text()


def test_config_toml_documents_every_generation_param_with_the_dataclass_default() -> None:
    documented = tomllib.loads(default_toml_text())["generation"]
    defaults = dataclasses.asdict(GenerationParams())
    assert documented == defaults


def test_defaults_when_no_user_file(isolated_xdg: Path) -> None:
    config = load_config()
    assert config.model.path == "default"
    assert config.model.cpu_memory is None and config.model.gpu_memory is None
    assert config.files == []


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_user_file_overrides_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, '[generation]\ntemperature = 0.3\n[model]\ncpu_memory = 2\n')
    config = load_config(path)
    assert config.generation.temperature == 0.3
    assert config.generation.top_p == 0.9  # untouched keys keep the default
    assert config.model.cpu_memory == 2.0


def test_user_file_in_xdg_config_dir_is_read(isolated_xdg: Path) -> None:
    user = Path(isolated_xdg / "config" / "glmchat" / "config.toml")
    user.parent.mkdir(parents=True, exist_ok=True)
    user.write_text('[generation]\nmax_new_tokens = 7\n')
    try:
        assert load_config().generation.max_new_tokens == 7
    finally:
        user.unlink()


def test_flag_wins_only_where_typed(tmp_path: Path) -> None:
    path = _write(tmp_path, '[generation]\ntemperature = 0.3\ntop_k = 5\n')
    args = build_parser().parse_args(["--config", str(path), "--top-k", "9", "hi"])
    config = config_from(args)
    assert config.generation.top_k == 9  # typed
    assert config.generation.temperature == 0.3  # not typed: the file's value stands


@pytest.mark.parametrize(("text", "needle"), [
    ('[generation\ntop_k = 5\n', "line 1"),
    ('[generation]\ntop_k = \n', "line 2"),
    ('[generation]\ntopk = 5\n', "unknown key 'topk'"),
    ('[gen]\ntop_k = 5\n', "unknown section [gen]"),
    ('[generation]\ntop_p = 1.5\n', "top_p = 1.5"),
    ('[generation]\nnum_beams = 0\n', "num_beams = 0"),
    ('[generation]\ntemperature = -1\n', "temperature = -1"),
    ('[generation]\nstrategy = "fast"\n', "strategy = 'fast'"),
    ('[model]\ncpu_memory = "lots"\n', "cpu_memory = 'lots'"),
    ('[model]\ndtype = "int3"\n', "dtype = 'int3'"),
    ('[model]\noffload_reader = "fast"\n', "offload_reader = 'fast'"),
    ('[generation]\nstrategy = "beam"\nnum_beams = 2\nnum_return_sequences = 3\n',
     "cannot exceed num_beams"),
])
def test_bad_config_names_file_key_and_what_is_allowed(tmp_path: Path, text: str,
                                                       needle: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert needle in message
    assert "\n" not in message


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_invalid_flag_values_are_usage_errors() -> None:
    for flags in (["--num-beams", "0"], ["--top-p", "1.5"], ["--temperature", "-0.5"],
                  ["--strategy", "beam", "--num-beams", "2", "-n", "3"],
                  ["--min-new-tokens", "9", "--max-new-tokens", "3"]):
        args = build_parser().parse_args([*flags, "hi"])
        with pytest.raises(UsageError, match="command line"):
            config_from(args)
