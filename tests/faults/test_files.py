"""Files glmchat writes or reads, made unwritable, read-only, a directory, or full."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from glmchat.tui.app import Options, make_app

from glmchat.client import EngineClient
from tests.faults.cases import fault
from tests.faults.harness import (
    SMALL,
    assert_readable,
    assert_reported,
    glmchat,
    make_session,
    private_cache,
    read_only_mount,
)


@fault("`--session` in a directory that does not exist",
       "usage error before any generation: one line, exit 2", "nothing is created")
def test_session_in_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "s.jsonl"
    run = glmchat("--session", str(target), *SMALL, "hi")
    assert_reported(run, 2, "does not exist")
    assert run.stdout == ""  # nothing generated
    assert not (tmp_path / "no").exists()


@fault("`--session` path is a directory, or under a regular file",
       "usage error before any generation, exit 2", "the directory / file untouched")
def test_session_path_is_a_directory_or_under_a_file(tmp_path: Path) -> None:
    assert_reported(glmchat("--session", str(tmp_path), *SMALL, "hi"), 2, "is a directory")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    assert_reported(glmchat("--session", str(blocker / "s.jsonl"), *SMALL, "hi"), 2,
                    "is not a directory")
    assert blocker.read_text() == "not a directory\n"


@fault("`--session` file on a read-only file system",
       "usage error before any generation, exit 2", "the session file, unchanged")
def test_session_file_read_only(tmp_path: Path) -> None:
    with read_only_mount(tmp_path / "ro") as make_read_only:
        path = tmp_path / "ro" / "s.jsonl"
        make_session(path)
        before = path.read_bytes()
        make_read_only()
        run = glmchat("--session", str(path), *SMALL, "hi")
        assert_reported(run, 2, "cannot save to")
        assert run.stdout == ""
        assert path.read_bytes() == before
        assert_readable(path, events_at_least=1)


@fault("disk full while saving a one-shot exchange (`RLIMIT_FSIZE`)",
       "the reply is still printed; `glmchat: error: cannot save to … (File too large)`, "
       "exit 1; the half-written line is taken back",
       "every event saved before; the file loads without a warning")
def test_session_disk_full_mid_conversation(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    make_session(path, ("Name a colour.", "Name a fruit."))
    room = path.stat().st_size + 400  # the next prompt fits, the reply's record does not
    run = glmchat("--session", str(path), *SMALL, "Name an animal.", file_size=room)
    assert_reported(run, 1, "cannot save to", "File too large")
    assert run.stdout.strip(), "the reply must still be shown"
    session = assert_readable(path, events_at_least=2)
    assert [e.content for e in session.events[:2]] == ["Name a colour.", "Name a fruit."]
    assert not session.assistant_turns()


@fault("config file is a directory, or not UTF-8",
       "one line naming the file, exit 2; no worker started", "the config file untouched")
def test_config_file_unreadable(tmp_path: Path) -> None:
    folder = tmp_path / "config.toml"
    folder.mkdir()
    assert_reported(glmchat("--config", str(folder), "hi"), 2, str(folder))
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'[generation]\nstop = ["\xff"]\n')
    assert_reported(glmchat("--config", str(binary), "hi"), 2, str(binary))
    assert binary.read_bytes() == b'[generation]\nstop = ["\xff"]\n'


@fault("TUI: the session file becomes unwritable mid-chat (replaced by a directory)",
       "`The session could not be saved: … /save PATH writes it to another file` in the "
       "transcript; the chat goes on; `/save PATH` writes everything there",
       "the whole conversation, in memory and then in PATH")
def test_tui_save_fails_mid_chat_then_save_elsewhere(client: EngineClient,
                                                     tmp_path: Path) -> None:
    from glmchat.cli import build_parser
    from glmchat.config import Config, SessionsConfig
    from glmchat.params import GenerationParams
    from tests.app_helpers import notices, reply_done, send, wait_for
    from tests.tui.test_tui_functional import SIZE

    config = Config(generation=GenerationParams(max_new_tokens=4),
                    sessions=SessionsConfig(dir=str(tmp_path / "sessions")))
    app = make_app(config, Options(client=client, history=False,
                                   args=build_parser().parse_args([])))
    elsewhere = tmp_path / "elsewhere.jsonl"

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.phase == "ready", "the model")
            await send(app, pilot, "Name a colour.")
            await reply_done(app, pilot)
            [saved] = (tmp_path / "sessions").glob("*.jsonl")
            saved.unlink()
            saved.mkdir()  # the fault: every later append fails
            await send(app, pilot, "Name a fruit.")
            await reply_done(app, pilot)
            await wait_for(pilot, lambda: any("could not be saved" in n
                                              for n in notices(app, "error")), "the warning")
            assert len(app.conversation.turns) == 4
            await send(app, pilot, f"/save {elsewhere}")
            await wait_for(pilot, lambda: any("saved to" in n for n in notices(app)),
                           "/save's answer")

    asyncio.run(main())
    session = assert_readable(elsewhere, events_at_least=4)
    assert [t.content for t in session.user_turns()] == ["Name a colour.", "Name a fruit."]
    assert len(session.assistant_turns()) == 2


# ---- the cache: converted models, digests, offload dir ---------------------------------------


def _shared_models() -> Path:
    """The suite's converted copy of the embedded model (conftest converts it once)."""
    return Path(os.environ["XDG_CACHE_HOME"]) / "glmchat" / "models"


@contextlib.contextmanager
def _read_only_cache(tmp_path: Path, converted: bool) -> Iterator[dict[str, str]]:
    """A private cache dir that cannot be written; ``converted``: its models/ is a link to the
    shared converted copy (nothing writes through it: nothing needs converting)."""
    env = private_cache(tmp_path)
    app = Path(env["XDG_CACHE_HOME"]) / "glmchat"
    if os.geteuid() == 0:
        with read_only_mount(app) as make_read_only:
            if converted:
                (app / "models").symlink_to(_shared_models())
            make_read_only()
            yield env
        return
    app.mkdir(parents=True)  # not read_only_mount's modes: chmod would follow the link
    if converted:
        (app / "models").symlink_to(_shared_models())
    app.chmod(0o555)
    try:
        yield env
    finally:
        app.chmod(0o755)


@fault("model cache read-only (or not writable) when the model must be converted",
       "`glmchat: error: cannot write …/glmchat/models (Read-only file system); set "
       "XDG_CACHE_HOME to a writable directory …`, exit 2, before any reply", "—")
def test_model_cache_read_only_before_conversion(tmp_path: Path) -> None:
    with _read_only_cache(tmp_path, converted=False) as env:
        run = glmchat(*SMALL, "hi", env=env)
    assert_reported(run, 2, "cannot write", "glmchat/models", "XDG_CACHE_HOME")
    assert run.stdout == ""


@fault("cache dir read-only once the model is converted (digest cache, probes unwritable)",
       "a documented fallback: the chat works; the digest is computed again each start, "
       "exit 0", "the converted copy, untouched")
def test_cache_read_only_after_conversion(tmp_path: Path) -> None:
    with _read_only_cache(tmp_path, converted=True) as env:
        run = glmchat(*SMALL, "Name a colour.", env=env)
    assert_reported(run, 0)
    assert run.stdout.strip()


@fault("the models cache dir is a regular file",
       "`glmchat: error: cannot write …/models (a file is where a directory should be); set "
       "XDG_CACHE_HOME …`, exit 2", "the file, untouched")
def test_models_cache_is_a_file(tmp_path: Path) -> None:
    env = private_cache(tmp_path)
    blocker = Path(env["XDG_CACHE_HOME"]) / "glmchat" / "models"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("mine\n")
    run = glmchat(*SMALL, "hi", env=env)
    assert_reported(run, 2, "cannot write", "a file is where a directory should be",
                    "XDG_CACHE_HOME")
    assert blocker.read_text() == "mine\n"


@fault("the digest cache (`digests.json`) is a directory, or not a JSON object",
       "a documented fallback: ignored, the digest is computed again; exit 0", "—")
def test_digest_cache_damaged(tmp_path: Path) -> None:
    env = private_cache(tmp_path)
    app = Path(env["XDG_CACHE_HOME"]) / "glmchat"
    app.mkdir(parents=True)
    (app / "models").symlink_to(_shared_models())
    (app / "digests.json").mkdir()
    assert_reported(glmchat(*SMALL, "hi", env=env), 0)
    assert [p.name for p in app.iterdir() if p.name.endswith(".tmp")] == []
    (app / "digests.json").rmdir()
    (app / "digests.json").write_text("[1, 2]")
    assert_reported(glmchat(*SMALL, "hi", env=env), 0)
    assert isinstance(json.loads((app / "digests.json").read_text()), dict)  # made anew


@fault("`--offload-dir` is a regular file, or read-only, when layers go to disk",
       "`glmchat: error: offload dir … is not writable (…); pass --offload-dir DIR`, exit 2",
       "the file, untouched")
def test_offload_dir_unwritable(tmp_path: Path) -> None:
    disk = ("--offload-runtime", "accelerate", "--cpu-memory", "0.05")
    blocker = tmp_path / "offload"
    blocker.write_text("mine\n")
    run = glmchat(*disk, "--offload-dir", str(blocker), *SMALL, "hi")
    assert_reported(run, 2, "offload dir", "a file is where the directory should be",
                    "--offload-dir")
    assert blocker.read_text() == "mine\n"
    with read_only_mount(tmp_path / "ro") as make_read_only:
        make_read_only()
        run = glmchat(*disk, "--offload-dir", str(tmp_path / "ro"), *SMALL, "hi")
    assert_reported(run, 2, "offload dir", "not writable", "--offload-dir")
