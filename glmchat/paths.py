"""Where glmchat keeps files. XDG base directories, via platformdirs.

| what                         | where (Linux)                                   |
|------------------------------|-------------------------------------------------|
| user config                  | $XDG_CONFIG_HOME/glmchat/config.toml            |
| converted models (GGUF → st) | $XDG_CACHE_HOME/glmchat/models/<digest>/        |
| disk offload of converted    | $XDG_CACHE_HOME/glmchat/offload/                |
| sessions                     | $XDG_DATA_HOME/glmchat/sessions/                |
| REPL history                 | $XDG_DATA_HOME/glmchat/history                  |
"""

from __future__ import annotations

from pathlib import Path

import platformdirs

APP = "glmchat"


def config_dir() -> Path:
    return Path(platformdirs.user_config_dir(APP))


def user_config_file() -> Path:
    return config_dir() / "config.toml"


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir(APP))


def models_cache_dir() -> Path:
    return cache_dir() / "models"


def default_offload_dir() -> Path:
    return cache_dir() / "offload"


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APP))


def default_sessions_dir() -> Path:
    return data_dir() / "sessions"


def history_file() -> Path:
    return data_dir() / "history"
