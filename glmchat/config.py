"""Configuration: the packaged config.toml holds every key with its default.

| file                                   | who reads it          | when                        |
|----------------------------------------|-----------------------|-----------------------------|
| glmchat/config.toml (package data)     | load_config           | always: defaults + schema   |
| $XDG_CONFIG_HOME/glmchat/config.toml   | load_config           | if present, unless --config |
| --config FILE                          | load_config           | instead of the user file    |
| command-line flags                     | cli → load_config     | only the flags typed        |
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from glmchat import paths
from glmchat.backend import BackendConfig, backend_problems
from glmchat.errors import UsageError
from glmchat.params import GenerationParams, param_problems
from glmchat.protocol import ModelSpec

DTYPES = ("auto", "float32", "bfloat16", "float16")
OFFLOAD_RUNTIMES = ("glmchat", "accelerate")
OFFLOAD_READERS = ("auto", "mmap", "direct")
FRONTENDS = ("tui", "plain")
QUANTIZE = ("none", "int8", "int4")
QUANT_GROUPS = (32, 64, 128, 256)


@dataclass
class ModelConfig:
    path: str = "default"
    dtype: str = "auto"
    gpu_memory: float | None = None  # GiB per GPU; None = what is free
    cpu_memory: float | None = None  # GiB; None = what is available
    offload_dir: str = ""
    offload_runtime: str = "glmchat"
    offload_reader: str = "auto"
    threads: int = 0
    tokenizer: str = ""
    num_heads: int = 0
    quantize: str = "none"
    quant_group: int = 32

    def spec(self) -> ModelSpec:
        return ModelSpec(path=self.path, dtype=self.dtype, gpu_memory=self.gpu_memory,
                         cpu_memory=self.cpu_memory, offload_dir=self.offload_dir,
                         offload_runtime=self.offload_runtime,
                         offload_reader=self.offload_reader, threads=self.threads,
                         tokenizer=self.tokenizer, num_heads=self.num_heads,
                         quantize=self.quantize, quant_group=self.quant_group)


@dataclass
class SessionsConfig:
    dir: str = ""
    save: bool = True

    def path(self) -> Path:
        return Path(self.dir).expanduser() if self.dir else paths.default_sessions_dir()


@dataclass
class UIConfig:
    frontend: str = "tui"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationParams = field(default_factory=GenerationParams)
    sessions: SessionsConfig = field(default_factory=SessionsConfig)
    ui: UIConfig = field(default_factory=UIConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    files: list[Path] = field(default_factory=list)


def default_toml_text() -> str:
    return resources.files("glmchat").joinpath("config.toml").read_text(encoding="utf-8")


def _defaults() -> dict[str, dict[str, Any]]:
    return tomllib.loads(default_toml_text())


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist; create it or drop --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path} cannot be read ({exc}); check its permissions"
                         ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path}: syntax error: {exc}; fix that line") from None


def _memory_problem(value: Any) -> str | None:
    if value == "auto":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return None
    return 'use a number of GiB >= 0, or "auto"'


def _model_problems(values: dict[str, Any]) -> list[str]:
    out = []
    checks: dict[str, tuple[bool, str]] = {
        "path": (isinstance(values.get("path"), str) and bool(values.get("path")),
                 'use "default" or a path to a model directory or .gguf file'),
        "dtype": (values.get("dtype") in DTYPES, "use one of " + ", ".join(DTYPES)),
        "gpu_memory": (_memory_problem(values.get("gpu_memory")) is None,
                       'use a number of GiB >= 0, or "auto"'),
        "cpu_memory": (_memory_problem(values.get("cpu_memory")) is None,
                       'use a number of GiB >= 0, or "auto"'),
        "offload_dir": (isinstance(values.get("offload_dir"), str), "use a directory path"),
        "offload_runtime": (values.get("offload_runtime") in OFFLOAD_RUNTIMES,
                            "use one of " + ", ".join(OFFLOAD_RUNTIMES)),
        "offload_reader": (values.get("offload_reader") in OFFLOAD_READERS,
                           "use one of " + ", ".join(OFFLOAD_READERS)),
        "threads": (isinstance(values.get("threads"), int)
                    and not isinstance(values.get("threads"), bool) and values["threads"] >= 0,
                    "use an integer >= 0 (0 = torch's default)"),
        "tokenizer": (isinstance(values.get("tokenizer"), str), "use a file path"),
        "num_heads": (isinstance(values.get("num_heads"), int)
                      and not isinstance(values.get("num_heads"), bool)
                      and values["num_heads"] >= 0,
                      "use an integer >= 0 (0 = from the checkpoint)"),
        "quantize": (values.get("quantize") in QUANTIZE, "use one of " + ", ".join(QUANTIZE)),
        "quant_group": (values.get("quant_group") in QUANT_GROUPS
                        and not isinstance(values.get("quant_group"), bool),
                        "use one of " + ", ".join(map(str, QUANT_GROUPS))),
    }
    for key, (ok, allowed) in checks.items():
        if key in values and not ok:
            out.append(f"{key} = {values[key]!r} is invalid: {allowed}")
    return out


def _section_problems(section: str, values: dict[str, Any]) -> list[str]:
    if section == "model":
        return _model_problems(values)
    if section == "generation":
        return param_problems(values)
    if section == "sessions":
        out = []
        if "dir" in values and not isinstance(values["dir"], str):
            out.append(f"dir = {values['dir']!r} is invalid: use a directory path")
        if "save" in values and not isinstance(values["save"], bool):
            out.append(f"save = {values['save']!r} is invalid: use true or false")
        return out
    if section == "backend":
        return backend_problems(values)
    if section == "ui" and values.get("frontend", "tui") not in FRONTENDS:
        return [f"frontend = {values['frontend']!r} is invalid: use tui or plain"]
    return []


def _check_keys(data: dict[str, Any], defaults: dict[str, dict[str, Any]], where: str) -> None:
    for section, values in data.items():
        if section not in defaults:
            raise UsageError(f"{where}: unknown section [{section}]; "
                             f"known sections: {', '.join(defaults)}")
        if not isinstance(values, dict):
            raise UsageError(f"{where}: {section} must be a [section] table")
        for key in values:
            if key not in defaults[section]:
                raise UsageError(f"{where}: unknown key {key!r} in [{section}]; known keys: "
                                 f"{', '.join(defaults[section])}")
        problems = _section_problems(section, values)
        if problems:
            raise UsageError(f"{where}: [{section}] {problems[0]}")


def load_config(config_file: Path | None = None,
                overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Defaults ← user file (or ``config_file``) ← ``overrides`` (the flags the user typed)."""
    merged = _defaults()
    files: list[Path] = []
    user_file = config_file if config_file is not None else paths.user_config_file()
    if config_file is not None or user_file.is_file():
        data = _read_toml(user_file)
        _check_keys(data, merged, f"config file {user_file}")
        for section, values in data.items():
            merged[section].update(values)
        files.append(user_file)
    if overrides:
        _check_keys(overrides, merged, "command line")
        for section, values in overrides.items():
            merged[section].update(values)
    # A combination can be invalid even when each value is fine (min > max, say).
    gen_problems = param_problems(merged["generation"])
    if gen_problems:
        where = "command line" if overrides and overrides.get("generation") else (
            f"config file {files[-1]}" if files else "config")
        raise UsageError(f"{where}: {gen_problems[0]}")

    m = merged["model"]
    return Config(
        model=ModelConfig(
            path=m["path"], dtype=m["dtype"],
            gpu_memory=None if m["gpu_memory"] == "auto" else float(m["gpu_memory"]),
            cpu_memory=None if m["cpu_memory"] == "auto" else float(m["cpu_memory"]),
            offload_dir=m["offload_dir"], offload_runtime=m["offload_runtime"],
            offload_reader=m["offload_reader"], threads=m["threads"],
            tokenizer=m["tokenizer"], num_heads=m["num_heads"],
            quantize=m["quantize"], quant_group=m["quant_group"]),
        generation=GenerationParams.from_dict(merged["generation"]),
        sessions=SessionsConfig(**merged["sessions"]),
        ui=UIConfig(**merged["ui"]),
        backend=BackendConfig(**{**merged["backend"],
                                 "timeout": float(merged["backend"]["timeout"])}),
        files=files,
    )
