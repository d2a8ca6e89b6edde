"""`glmchat serve`: load the model once and serve it over HTTP.

    glmchat serve                          a Unix socket in a 0700 runtime dir (the default)
    glmchat serve --port 8000              127.0.0.1:8000
    glmchat serve --host 0.0.0.0 --api-key-file FILE   any other address needs a key

Safe by default: the socket's directory is the user's alone, loopback needs no key, and
anything that reaches beyond this machine must present the key (compared in constant time;
never logged, never written to the state file). A request cannot load another model or read a
file: the server has no such endpoint. The running server announces itself in a state file
(``serve_state_file()``) that one-shot and REPL modes read to find it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from glmchat import paths
from glmchat.errors import UsageError
from glmchat.usage import Parser

DEFAULT_PORT = 8000


def runtime_dir() -> Path:
    """$XDG_RUNTIME_DIR/glmchat (per user, memory-backed), else the cache dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / paths.APP if runtime else paths.cache_dir()


def serve_state_file() -> Path:
    return runtime_dir() / "serve.json"


def default_socket() -> Path:
    return runtime_dir() / "serve.sock"


def build_parser() -> argparse.ArgumentParser:
    from glmchat.cli import add_model_flags

    parser = Parser(
        prog="glmchat serve",
        description="Load the model once and serve it: OpenAI-compatible /v1/chat/completions "
                    "and /v1/completions, glmchat's native event stream, /health, /metrics.")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="config file to use instead of the user's config.toml")
    where = parser.add_argument_group("where to listen (default: a Unix socket)")
    where.add_argument("--socket", type=Path, metavar="PATH",
                       help=f"Unix socket path (default {default_socket()})")
    where.add_argument("--host", metavar="ADDR",
                       help="TCP address; anything but loopback needs --api-key(-file)")
    where.add_argument("--port", type=int, metavar="N",
                       help=f"TCP port (default {DEFAULT_PORT}; 0 = any free port; "
                            "--port alone listens on 127.0.0.1)")
    auth = parser.add_argument_group("access and limits")
    auth.add_argument("--api-key", metavar="KEY",
                      help="require 'Authorization: Bearer KEY' (prefer --api-key-file: a "
                           "command line is visible to other users)")
    auth.add_argument("--api-key-file", type=Path, metavar="FILE",
                      help="read the API key from FILE (first line)")
    auth.add_argument("--max-tokens", type=int, default=2048, metavar="N",
                      help="most tokens one request may generate (default 2048)")
    auth.add_argument("--max-body-bytes", type=int, default=1 << 20, metavar="N",
                      help="largest request body (default 1 MiB)")
    auth.add_argument("--max-waiting", type=int, default=256, metavar="N",
                      help="requests that may wait behind the running one (default 256)")
    auth.add_argument("--kv-conversations", type=int, default=4, metavar="N",
                      help="conversations whose KV cache is kept between their turns "
                           "(default 4; each costs memory)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="loading progress and an access log on stderr")
    add_model_flags(parser)
    return parser


def read_key(args: argparse.Namespace) -> str | None:
    if args.api_key is not None and args.api_key_file is not None:
        raise UsageError("pass --api-key or --api-key-file, not both")
    if args.api_key_file is not None:
        try:
            key = args.api_key_file.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"--api-key-file {args.api_key_file}: cannot read it "
                             f"({exc.strerror or exc})") from None
        if not key or not key[0].strip():
            raise UsageError(f"--api-key-file {args.api_key_file} is empty; put the key on "
                             "its first line")
        return key[0].strip()
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty")
    return args.api_key.strip() if args.api_key else None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_flags(args: argparse.Namespace, key: str | None) -> None:
    for name in ("max_tokens", "max_body_bytes", "max_waiting", "kv_conversations"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.socket is not None and (args.host is not None or args.port is not None):
        raise UsageError("--socket listens on a Unix socket; drop --host/--port, or --socket")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number (0 to 65535)")
    if args.host is not None and not is_loopback(args.host) and key is None:
        raise UsageError(f"--host {args.host} can be reached from other machines; pass "
                         "--api-key-file FILE (or --api-key KEY), or listen on 127.0.0.1")


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def open_socket(args: argparse.Namespace) -> tuple[socket.socket, str, str | None]:
    """The listening socket, the URL clients use, and the Unix socket path (if any)."""
    if args.host is None and args.port is None:
        path = (args.socket or default_socket()).expanduser().absolute()
        _private_dir(path.parent)
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # left by a server that died
            else:
                raise UsageError(f"another glmchat serve is listening on {path}; stop it or "
                                 "pass --socket PATH")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
        except OSError as exc:
            raise UsageError(f"cannot listen on {path} ({exc.strerror or exc}); pass "
                             "--socket PATH") from None
        os.chmod(path, 0o600)
        sock.listen(128)
        return sock, f"unix:{path}", str(path)
    host = args.host or "127.0.0.1"
    port = DEFAULT_PORT if args.port is None else args.port
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick "
                         "another --port or --host") from None
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return sock, f"http://{shown}:{port}", None


def write_state(url: str, socket_path: str | None, info: Any, needs_key: bool) -> Path:
    path = serve_state_file()
    _private_dir(path.parent)
    state = {"url": url, "socket": socket_path, "pid": os.getpid(),
             "model": {"source": info.source, "name": info.name, "digest": info.digest,
                       "context_length": info.context_length},
             "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
             "api_key_required": needs_key}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    os.replace(tmp, path)
    return path


def remove_state(path: Path) -> None:
    """Remove the state file if it still announces this process."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text(encoding="utf-8")).get("pid") == os.getpid():
            path.unlink()


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve_main(argv: list[str]) -> int:
    from glmchat.cli import overrides_from
    from glmchat.config import load_config

    args = build_parser().parse_args(argv)
    key = read_key(args)
    check_flags(args, key)
    config = load_config(args.config, {k: v for k, v in overrides_from(args).items()
                                       if k == "model"})
    from glmchat.cli import check_model_path

    check_model_path(config)
    sock, url, socket_path = open_socket(args)  # before loading: a busy port fails fast
    try:
        return _run(args, config, key, sock, url, socket_path)
    finally:
        sock.close()
        if socket_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(socket_path)


def _run(args: argparse.Namespace, config: Any, key: str | None, sock: socket.socket,
         url: str, socket_path: str | None) -> int:
    import uvicorn

    from glmchat.serve_app import Server, ServeSettings
    from glmchat.serve_openai import Limits
    from glmchat.serve_worker import ServedWorker

    # read by the worker's model/prompt_cache.py: one KV cache per conversation, not one
    os.environ["GLMCHAT_KV_CONVERSATIONS"] = str(args.kv_conversations)
    worker = ServedWorker(config.model.spec(), max_waiting=args.max_waiting)
    state: Path | None = None
    try:
        print(f"glmchat serve: loading {config.model.path}…", file=sys.stderr)
        loaded = worker.start(verbose=args.verbose)
        info = loaded.info
        limits = Limits(max_tokens=min(args.max_tokens, info.context_length))
        server = Server(worker, ServeSettings(api_key=key, max_body_bytes=args.max_body_bytes,
                                              limits=limits))
        uv_config = uvicorn.Config(server.app(), log_level="info" if args.verbose else "warning",
                                   access_log=args.verbose, lifespan="off",
                                   timeout_graceful_shutdown=3)
        state = write_state(url, socket_path, info, key is not None)
        print(f"glmchat serve: {info.name} ({info.context_length} tokens of context) on {url}"
              f"{' (API key required)' if key else ''}; pid {os.getpid()}; Ctrl+C stops",
              file=sys.stderr, flush=True)
        # uvicorn re-raises the signal that stopped it once it has shut down; as exceptions
        # they unwind through here, so the state file and the worker are cleaned up.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        with contextlib.suppress(KeyboardInterrupt, SystemExit):
            uvicorn.Server(uv_config).run(sockets=[sock])
        return 0
    finally:
        if state is not None:
            remove_state(state)
        worker.close()
