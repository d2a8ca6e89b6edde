"""`glmchat sessions …` and `glmchat replay …`. Imports no torch (replay's worker does).

    glmchat sessions                          list, newest first
    glmchat sessions show ID|FILE             header and every turn
    glmchat sessions export ID|FILE --format md|json [-o FILE]
    glmchat sessions rm ID|FILE [--yes]       asks first
    glmchat replay FILE [--check]             generate every reply again (and compare)

Exit codes: 0 ok, 1 runtime failure or (replay --check) a divergence, 2 usage or a bad file,
130 interrupted.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from glmchat.cli import add_backend_flags, add_model_flags, config_from, guarded
from glmchat.errors import UsageError
from glmchat.usage import Parser

from .domain import Session
from .export import show_text
from .store import SessionStore, SessionSummary


def _warn(session: Session) -> None:
    for warning in session.warnings:
        print(f"glmchat: warning: {warning}", file=sys.stderr)


def _run(args: argparse.Namespace, action: Callable[[argparse.Namespace], int]) -> int:
    return guarded(lambda: action(args))


def _store(args: argparse.Namespace) -> SessionStore:
    return SessionStore(config_from(args).sessions.path())


# ---- glmchat sessions ----------------------------------------------------------------------------


def sessions_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="glmchat sessions",
                    description="List, show, export and remove saved sessions.")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="config file to use instead of the user's config.toml")
    commands = parser.add_subparsers(dest="command", metavar="{list,show,export,rm}")
    commands.add_parser("list", help="sessions, newest first (the default)")
    show = commands.add_parser("show", help="a session's header and turns")
    show.add_argument("ref", metavar="ID|FILE")
    export = commands.add_parser("export", help="a session as Markdown or JSON")
    export.add_argument("ref", metavar="ID|FILE")
    export.add_argument("--format", choices=("md", "json"), default="md")
    export.add_argument("-o", "--output", type=Path, metavar="FILE",
                        help="write here instead of stdout")
    rm = commands.add_parser("rm", help="remove a session (asks first)")
    rm.add_argument("ref", metavar="ID|FILE")
    rm.add_argument("--yes", "-y", action="store_true", help="do not ask")
    return parser


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:max(1, width - 1)] + "…"


def list_table(rows: list[SessionSummary], width: int) -> str:
    lines = [f"{'ID':<21} {'STARTED':<16} {'MODEL':<24} {'TURNS':>5}  FIRST PROMPT"]
    for row in rows:
        if row.problem:
            lines.append(f"{row.id:<21} {'?':<16} {'?':<24} {'?':>5}  ({_clip(row.problem, 60)})")
            continue
        started = row.created.replace("T", " ").removesuffix("Z")[:16]
        lines.append(f"{row.id:<21} {started:<16} {_clip(row.model, 24):<24} {row.turns:>5}  "
                     f"{_clip(row.first_prompt, max(10, width - 72))}")
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    rows = store.summaries()
    if not rows:
        print(f"glmchat: no sessions yet in {store.directory}", file=sys.stderr)
        return 0
    print(list_table(rows, shutil.get_terminal_size((120, 24)).columns))
    return 0


def _show(args: argparse.Namespace) -> int:
    session = _store(args).open(args.ref)
    _warn(session)
    sys.stdout.write(show_text(session, shutil.get_terminal_size((100, 24)).columns))
    return 0


def _export(args: argparse.Namespace) -> int:
    store = _store(args)
    session = store.open(args.ref)
    _warn(session)
    text = store.export(session, args.format)
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        args.output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {args.output} ({exc.strerror})") from None
    print(f"glmchat: wrote {args.output}", file=sys.stderr)
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = _store(args)
    session = store.open(args.ref)  # only a file that loads as a session is removed
    if not args.yes:
        if not sys.stdin.isatty():
            raise UsageError(f"not removing {session.path} without confirmation; "
                             "pass --yes to remove it")
        prompts = len(session.user_turns())
        first = _clip(session.first_prompt(), 50)
        print(f"remove session {session.id} ({prompts} prompts, {first!r}), "
              f"file {session.path}? [y/N] ", end="", file=sys.stderr, flush=True)
        if input().strip().lower() not in ("y", "yes"):
            print("glmchat: kept it", file=sys.stderr)
            return 0
    store.remove(session)
    print(f"glmchat: removed {session.path}", file=sys.stderr)
    return 0


def sessions_main(argv: list[str]) -> int:
    args = sessions_parser().parse_args(argv)
    action = {"show": _show, "export": _export, "rm": _rm}.get(args.command or "list", _list)
    return _run(args, action)


# ---- glmchat replay ------------------------------------------------------------------------------


def replay_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="glmchat replay",
        description="Generate every reply of a saved session again, with the recorded model, "
                    "params and seed, streaming as it goes.")
    parser.add_argument("ref", metavar="FILE", help="a session file (or a session id)")
    parser.add_argument("--check", action="store_true",
                        help="compare token ids and texts: exit 0 when all match, 1 with the "
                             "first divergence otherwise")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="config file to use instead of the user's config.toml")
    parser.add_argument("-v", "--verbose", action="store_true", help="model load progress")
    add_model_flags(parser)
    add_backend_flags(parser)
    return parser


def _replay(args: argparse.Namespace) -> int:
    from .replay import Replayer

    config = config_from(args)
    session = SessionStore(config.sessions.path()).open(args.ref)
    _warn(session)
    replayer = Replayer(session, config, check=args.check, path_typed="model" in vars(args),
                        dtype_typed="dtype" in vars(args), verbose=args.verbose,
                        quantize_typed="quantize" in vars(args) or "quant_group" in vars(args))
    report = replayer.run()
    if not args.check:
        return 0
    for line in report.skipped:
        print(f"glmchat: {line}", file=sys.stderr)
    if report.ok:
        print(f"glmchat: all {report.matched} replayed replies match the recording",
              file=sys.stderr)
        return 0
    print(report.first_divergence)
    print(f"glmchat: {report.diverged} of {report.replies} replies differ from the recording",
          file=sys.stderr)
    return 1


def replay_main(argv: list[str]) -> int:
    args = replay_parser().parse_args(argv)
    return _run(args, _replay)
