"""Driving the real `glmchat` with one fault injected, and checking what is left afterwards.

Every process a run starts carries GLMCHAT_FAULT_TAG=<random> in its environment (the worker
and multiprocessing's helpers inherit it), so "no process left behind" is checked by looking
for that tag in /proc, whoever the processes' parents are.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from glmchat.sessions.domain import ModelRecord, Session, UserTurn
from glmchat.sessions.store import SessionStore, load_session, new_event_id, utc_now

TAG = "GLMCHAT_FAULT_TAG"
SMALL = ("--max-new-tokens", "6")  # replies as short as a check needs


def tagged_processes(tag: str) -> list[int]:
    """Live processes (zombies have no environment) started by the run tagged ``tag``."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError), open(f"/proc/{entry}/environ", "rb") as f:
            if needle in f.read().split(b"\0"):
                found.append(int(entry))
    return found


def assert_none_left(tag: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = tagged_processes(tag)
    for pid in left:  # do not leave them to the next test either
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind {within:.0f} s after the run: {left}"


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr}"


def _limits(file_size: int | None) -> Callable[[], None] | None:
    if file_size is None:
        return None

    def apply() -> None:  # a full disk without root: writes past this many bytes fail
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, resource.RLIM_INFINITY))

    return apply


def _env(tag: str, env: dict[str, str] | None) -> dict[str, str]:
    return {**os.environ, TAG: tag, "GLMCHAT_DEBUG": "", **(env or {})}


def glmchat(*args: str, stdin: bytes = b"", env: dict[str, str] | None = None,
            file_size: int | None = None, timeout: float = 300) -> Run:
    """Run `python -m glmchat ARGS` to the end; then nothing it started may be left."""
    tag = secrets.token_hex(6)
    proc = subprocess.run([sys.executable, "-m", "glmchat", *args], input=stdin,
                          capture_output=True, env=_env(tag, env), timeout=timeout,
                          preexec_fn=_limits(file_size))
    assert_none_left(tag)
    return Run(proc.returncode, proc.stdout.decode("utf-8", "replace"),
               proc.stderr.decode("utf-8", "replace"))


class Live:
    """`glmchat` running in the background, for faults injected while it works."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.tag = secrets.token_hex(6)
        self.proc = subprocess.Popen([sys.executable, "-m", "glmchat", *args],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=_env(self.tag, env))
        self.out = b""
        self.err = b""

    def _read(self, timeout: float) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        streams = {self.proc.stdout.fileno(): "out", self.proc.stderr.fileno(): "err"}
        ready, _, _ = select.select(list(streams), [], [], timeout)
        for fd in ready:
            data = os.read(fd, 1 << 16)
            if streams[fd] == "out":
                self.out += data
            else:
                self.err += data

    def wait_for_output(self, chars: int = 1, timeout: float = 240) -> None:
        """Until the reply has begun (``chars`` bytes on stdout)."""
        deadline = time.monotonic() + timeout
        while len(self.out) < chars:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()  # a failing test leaves nothing running either
                raise AssertionError(f"no reply on stdout: {self.finish(5)}")
            self._read(0.05)

    def wait_until(self, done: Callable[[], bool], what: str, timeout: float = 240) -> None:
        """Until ``done()`` (reading the output meanwhile, so the pipes never fill)."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise AssertionError(f"never {what}: {self.finish(5)}")
            self._read(0.05)

    def worker_pid(self) -> int:
        import psutil

        for child in psutil.Process(self.proc.pid).children(recursive=True):
            if "spawn_main" in " ".join(child.cmdline()):
                return int(child.pid)
        raise AssertionError("no worker process found")

    def finish(self, timeout: float = 60) -> Run:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        assert_none_left(self.tag)
        return Run(self.proc.returncode, (self.out + out).decode("utf-8", "replace"),
                   (self.err + err).decode("utf-8", "replace"))


def assert_reported(run: Run, code: int, *phrases: str, error_line: bool = True) -> None:
    """The exit code, no traceback, and (for a failure) a `glmchat: error:` line; stderr says
    each of ``phrases``."""
    assert run.code == code, str(run)
    assert "Traceback" not in run.stdout + run.stderr, str(run)
    if code in (1, 2) and error_line:
        errors = [line for line in run.stderr.splitlines() if line.startswith("glmchat: error: ")]
        assert errors, str(run)
    for phrase in phrases:
        assert phrase in run.stderr, f"{phrase!r} not said:\n{run}"


def private_cache(tmp_path: Path) -> dict[str, str]:
    """An environment whose model cache is the test's own: the shared one (converted once for
    the whole suite) is never touched by a fault."""
    return {"XDG_CACHE_HOME": str(tmp_path / "cache")}


# ---- sessions made without a model ----------------------------------------------------------


def default_model_record() -> ModelRecord:
    """The embedded model as a session records it (so a continued session adds no event)."""
    from glmchat.model.sources import resolve

    resolved = resolve("default")
    return ModelRecord(name=resolved.name, source="default", digest=resolved.digest,
                       dtype="float32", architecture="LlamaForCausalLM", n_params=0,
                       context_length=8192)


def make_session(path: Path, prompts: tuple[str, ...] = ("Name a colour.",)) -> Session:
    store = SessionStore(path.parent)
    session = store.new_session(default_model_record(), path=path)
    parent = None
    for text in prompts:
        turn = UserTurn(id=new_event_id("u"), parent=parent, time=utc_now(), content=text)
        store.append(session, turn)
        parent = turn.id
    return session


def assert_readable(path: Path, *, events_at_least: int, warnings: int = 0) -> Session:
    """The file still loads as a session, with every event saved before the fault."""
    session = load_session(path)
    assert len(session.events) >= events_at_least, session.events
    assert len(session.warnings) == warnings, session.warnings
    return session


@contextlib.contextmanager
def read_only_mount(where: Path) -> Iterator[Callable[[], None]]:
    """A directory whose files the test writes, then makes read-only with the function this
    yields: a remounted tmpfs as root (root ignores file modes), the file modes otherwise."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        def by_modes() -> None:
            for path in where.iterdir():
                path.chmod(0o444)
            where.chmod(0o555)

        try:
            yield by_modes
        finally:
            where.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot make a read-only file as root here: {mounted.stderr!r}")
    try:
        yield lambda: subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


_LIMITED = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
            "(int(sys.argv[1]), resource.RLIM_INFINITY)); os.execv(sys.argv[2], sys.argv[2:])")


class Screen:
    """`glmchat` in a pseudo-terminal (the TUI, the plain REPL), tagged like ``Live``."""

    ALT_SCREEN_OFF = "\x1b[?1049l"  # the full-screen app handing the terminal back

    def __init__(self, *args: str, env: dict[str, str] | None = None,
                 file_size: int | None = None) -> None:
        import pty

        from glmchat.bench.tui import COLUMNS, LINES, Terminal

        self.tag = secrets.token_hex(6)
        saved = dict(os.environ)
        os.environ.update(_env(self.tag, env))
        argv = [sys.executable, "-m", "glmchat", *args]
        if file_size is not None:  # the limit set in a small wrapper that then becomes glmchat
            argv = [sys.executable, "-c", _LIMITED, str(file_size), *argv]
        try:
            self.terminal = Terminal(argv)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        del pty, COLUMNS, LINES
        self.proc = self.terminal.process

    def wait_for(self, text: str, timeout: float = 240, since: int = 0) -> float:
        try:
            return self.terminal.wait_for(text, timeout, since)
        except TimeoutError:
            self.kill()  # a failing test leaves nothing running either
            raise AssertionError(f"{text!r} never appeared; the screen said:\n"
                                 f"{self.terminal.output[-3000:]}") from None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait(10)
        for pid in tagged_processes(self.tag):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def send(self, keys: str) -> None:
        self.terminal.send(keys)

    @property
    def output(self) -> str:
        return self.terminal.output

    def finish(self, timeout: float = 30) -> int:
        """Wait for the process to exit (reading the screen meanwhile); no process left."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.terminal.read(0.05)
        if self.proc.poll() is None:
            self.kill()
            raise AssertionError(f"glmchat did not exit within {timeout} s:\n"
                                 f"{self.output[-2000:]}")
        with contextlib.suppress(OSError):
            os.close(self.terminal.master)
        assert_none_left(self.tag)
        return self.proc.returncode
