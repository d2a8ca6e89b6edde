"""`glmchat bench SUBCOMMAND …`: benchmarks. Each subcommand is a module with ``main(argv)``;
add one by adding a line to SUBCOMMANDS."""

from __future__ import annotations

import importlib
import sys

from glmchat.errors import GlmchatError

SUBCOMMANDS = {
    "engine": "glmchat.bench.engine",
    "tui": "glmchat.bench.tui",
    "make-model": "glmchat.bench.make_model",
    "offload": "glmchat.bench.offload",
    "quality": "glmchat.bench.quality",
    "serve": "glmchat.bench.serve",
    "serve-load": "glmchat.bench.serve_load",
    "glm": "glmchat.bench.glm",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: glmchat bench {{{','.join(SUBCOMMANDS)}}} …", file=sys.stderr)
        return 2 if argv and argv[0] not in ("-h", "--help") else 0
    module = importlib.import_module(SUBCOMMANDS[argv[0]])
    try:
        return int(module.main(argv[1:]))
    except GlmchatError as exc:
        print(f"glmchat bench {argv[0]}: error: {exc}", file=sys.stderr)
        return exc.exit_code
