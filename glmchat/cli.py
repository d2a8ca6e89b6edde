"""The `glmchat` command. Imports no torch: flags, config and dispatch only.

    glmchat                      chat (TUI on a terminal; --plain for the line REPL)
    glmchat "PROMPT"             one-shot: the completion on stdout
    echo PROMPT | glmchat        one-shot from stdin (--each-line: one prompt per line)
    glmchat replay FILE          regenerate a saved session (--check compares token ids)
    glmchat sessions …           list, show, export, remove saved sessions
    glmchat bench …              benchmarks
    glmchat serve                load the model once, serve it over HTTP (glmchat/serve.py)
    glmchat convert DIR          convert a GLM-130B checkpoint once (--out OUT)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glmchat import __version__
from glmchat.config import (
    DTYPES,
    OFFLOAD_READERS,
    OFFLOAD_RUNTIMES,
    QUANT_GROUPS,
    QUANTIZE,
    Config,
    load_config,
)
from glmchat.errors import GlmchatError, UsageError
from glmchat.params import BEAM_SCORERS, STRATEGIES
from glmchat.usage import Parser

SUBCOMMANDS = ("replay", "sessions", "bench", "serve", "convert")

# flag dest → (config section, key)
MODEL_FLAGS = {
    "model": "path", "dtype": "dtype", "gpu_memory": "gpu_memory", "cpu_memory": "cpu_memory",
    "offload_dir": "offload_dir", "offload_runtime": "offload_runtime",
    "offload_reader": "offload_reader", "threads": "threads",
    "tokenizer": "tokenizer", "num_heads": "num_heads",
    "quantize": "quantize", "quant_group": "quant_group",
}
# flag dest → [backend] key
BACKEND_FLAGS = {"backend": "url", "backend_model": "model", "api_key": "api_key",
                 "ca_file": "ca_file"}
GENERATION_FLAGS = (
    "strategy", "num_beams", "num_return_sequences", "temperature", "top_k", "top_p", "seed",
    "max_new_tokens", "min_new_tokens", "length_penalty", "no_repeat_ngram_size",
    "early_stopping", "stop", "system_prompt", "beam_scorer",
)


def _memory(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB or 'auto'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: memory cannot be negative")
    return value


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model and placement")
    s = argparse.SUPPRESS
    g.add_argument("--model", "-m", default=s, metavar="PATH",
                   help="'default' (embedded SmolLM2-135M-Instruct), a HuggingFace model "
                        "directory, or a .gguf file")
    g.add_argument("--dtype", choices=DTYPES, default=s, help="weight dtype in memory")
    g.add_argument("--gpu-memory", type=_memory, default=s, metavar="GIB",
                   help="GiB per GPU for weights (like --bminf-memory-limit); 'auto' = free")
    g.add_argument("--cpu-memory", type=_memory, default=s, metavar="GIB",
                   help="GiB of CPU RAM for weights; the rest is offloaded to disk")
    g.add_argument("--offload-dir", default=s, metavar="DIR",
                   help="where converted weights offloaded to disk go")
    g.add_argument("--offload-runtime", choices=OFFLOAD_RUNTIMES, default=s,
                   help="who streams offloaded layers: glmchat (prefetching) or accelerate")
    g.add_argument("--offload-reader", choices=OFFLOAD_READERS, default=s,
                   help="glmchat runtime on CPU: mmap (compute from the page cache), direct "
                        "(O_DIRECT reads into slot buffers), auto (direct when the weights "
                        "do not fit in half the free RAM)")
    g.add_argument("--threads", type=int, default=s, metavar="N",
                   help="CPU threads for torch (0 = torch's default)")
    g.add_argument("--tokenizer", default=s, metavar="FILE",
                   help="GLM-130B: its ice_text.model (else the checkpoint dir, "
                        "~/.icetk_models)")
    g.add_argument("--num-heads", type=int, default=s, metavar="N",
                   help="GLM-130B: attention heads (0 = from the checkpoint)")
    # Checked with the config (one error line, exit 2), not by argparse's choices.
    g.add_argument("--quantize", default=s, metavar="|".join(QUANTIZE),
                   help="weight-only quantized decoder layers (converted once, cached)")
    g.add_argument("--quant-group", type=int, default=s, metavar="N",
                   help="int4 group size along the input dimension: "
                        + ", ".join(map(str, QUANT_GROUPS)))


def add_backend_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("backend (who generates)")
    s = argparse.SUPPRESS
    g.add_argument("--backend", default=s, metavar="URL",
                   help="a glmchat serve or OpenAI-compatible server (vLLM, SGLang, llama.cpp, "
                        "Ollama, …), e.g. http://host:8000/v1; 'local' = the local worker")
    g.add_argument("--backend-model", default=s, metavar="NAME",
                   help="the server's model id (default: the one it serves)")
    g.add_argument("--api-key", default=s, metavar="env:VAR|file:PATH",
                   help="where the server's API key is (default: $GLMCHAT_API_KEY)")
    g.add_argument("--ca-file", default=s, metavar="FILE",
                   help="PEM bundle to verify the server's TLS certificate with")


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("generation")
    s = argparse.SUPPRESS
    g.add_argument("--strategy", choices=STRATEGIES, default=s)
    g.add_argument("--num-beams", type=int, default=s, metavar="N")
    g.add_argument("--num-return-sequences", "-n", type=int, default=s, metavar="N",
                   help="beam search: how many of the best beams to return")
    g.add_argument("--temperature", type=float, default=s, metavar="T")
    g.add_argument("--top-k", type=int, default=s, metavar="K")
    g.add_argument("--top-p", type=float, default=s, metavar="P")
    g.add_argument("--seed", type=int, default=s, metavar="N",
                   help="sampling seed (-1 = fresh each reply)")
    g.add_argument("--max-new-tokens", type=int, default=s, metavar="N")
    g.add_argument("--min-new-tokens", type=int, default=s, metavar="N")
    g.add_argument("--length-penalty", type=float, default=s, metavar="X")
    g.add_argument("--no-repeat-ngram-size", type=int, default=s, metavar="N")
    g.add_argument("--early-stopping", action="store_true", default=s,
                   help="beam search: stop once num_beams hypotheses are finished")
    g.add_argument("--stop", action="append", default=s, metavar="TEXT",
                   help="stop when the reply contains TEXT (repeatable)")
    g.add_argument("--system", dest="system_prompt", default=s, metavar="TEXT",
                   help="system prompt for chat models")
    g.add_argument("--beam-scorer", choices=BEAM_SCORERS, default=s,
                   help="beam search scoring: transformers' or GLM-130B's (auto = the "
                        "model's own)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="glmchat",
        description="Chat with large language models that do not fit in your GPU.",
        epilog="Subcommands: glmchat replay FILE [--check] · glmchat sessions "
               "[list|show|export|rm] · glmchat bench [engine|offload|make-model] · "
               "glmchat serve [--port N] · "
               "glmchat convert DIR [--out OUT] (GLM-130B checkpoint, once). "
               "A prompt that is a subcommand's name goes after --.",
    )
    parser.add_argument("prompt", nargs="*", help="one-shot prompt (else read stdin if piped)")
    parser.add_argument("--version", action="version", version=f"glmchat {__version__}")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="config file to use instead of the user's config.toml")
    out = parser.add_argument_group("modes and output")
    out.add_argument("--plain", action="store_true", help="line REPL instead of the TUI")
    out.add_argument("--each-line", action="store_true",
                     help="one-shot: one prompt per stdin line (blank lines skipped)")
    out.add_argument("--json", action="store_true",
                     help="one-shot: JSON Lines (text, tokens, finish reason, beams, timings)")
    out.add_argument("--raw", action="store_true", help="no chat template: plain continuation")
    out.add_argument("--color", action="store_true", help="one-shot: highlight infilled spans")
    out.add_argument("-v", "--verbose", action="store_true",
                     help="progress and stats on stderr")
    out.add_argument("--session", type=Path, metavar="FILE",
                     help="one-shot: append the exchange to FILE and continue its context")
    out.add_argument("--resume", metavar="ID|FILE", help="continue a saved conversation")
    out.add_argument("--no-save", action="store_true", help="do not save this conversation")
    add_model_flags(parser)
    add_backend_flags(parser)
    add_generation_flags(parser)
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Only the flags the user typed (SUPPRESS keeps the others out of ``args``)."""
    given = vars(args)
    model = {key: given[dest] for dest, key in MODEL_FLAGS.items() if dest in given}
    generation = {name: given[name] for name in GENERATION_FLAGS if name in given}
    out: dict[str, dict[str, Any]] = {}
    if model:
        out["model"] = model
    if generation:
        out["generation"] = generation
    backend = {key: given[dest] for dest, key in BACKEND_FLAGS.items() if dest in given}
    if backend:
        out["backend"] = backend
    return out


def config_from(args: argparse.Namespace) -> Config:
    return load_config(args.config, overrides_from(args))


def check_model_path(config: Config) -> None:
    """Cheap checks in the front end, so a typo fails before the worker starts."""
    path = config.model.path
    if config.backend.url not in ("", "local"):
        return  # the server has the model
    if path != "default" and not Path(path).expanduser().exists():
        raise UsageError(f"model path {path} does not exist; pass a model directory, a .gguf "
                         "file, or 'default'")


def error(message: str) -> None:
    print(f"glmchat: error: {message}", file=sys.stderr)


def guarded(action: Callable[[], int]) -> int:
    """Run a command, turning what can go wrong into the exit code and one line on stderr:
    our errors (their own code), Ctrl+C (130), a closed pipe (`glmchat sessions | head`: 0)."""
    try:
        return action()
    except GlmchatError as exc:
        error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away: say nothing more, and let the interpreter's final flush of
        # stdout go nowhere instead of raising again.
        with contextlib.suppress(OSError, ValueError):  # stdout may not be a file
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class _Termination:
    """SIGTERM (a `kill`, a closing terminal's session manager) ends a command the way Ctrl+C
    does — the partial reply saved, the worker stopped — with exit code 143."""

    received = False

    @classmethod
    def handle(cls, signum: int, frame: object) -> None:
        cls.received = True
        raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        from glmchat.client import deferred  # no torch: the worker pipe's signal guard

        signal.signal(signal.SIGTERM, deferred(_Termination.handle))
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, deferred(signal.default_int_handler))
    code = guarded(lambda: _main(argv))
    return 128 + signal.SIGTERM if _Termination.received and code == 130 else code


def _main(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    config = config_from(args)
    check_model_path(config)
    prompt = " ".join(args.prompt)
    if prompt or not sys.stdin.isatty() or args.each_line:
        from glmchat.oneshot import run_oneshot

        return run_oneshot(config, args, prompt)
    return _interactive(config, args)


def _interactive(config: Config, args: argparse.Namespace) -> int:
    if args.plain or config.ui.frontend == "plain":
        from glmchat.tui.plain import run_plain

        return run_plain(config, args)
    from glmchat.tui.app import run_tui

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the full-screen app: the default
    return run_tui(config, args)


def _subcommand(name: str, argv: list[str]) -> int:
    if name == "convert":
        from glmchat.convert import convert_main

        return convert_main(argv)
    if name == "bench":
        from glmchat.bench.cli import main as bench_main

        return bench_main(argv)
    if name == "serve":
        from glmchat.serve import serve_main

        return serve_main(argv)
    if name == "replay":
        from glmchat.sessions.cli import replay_main

        return replay_main(argv)
    from glmchat.sessions.cli import sessions_main

    return sessions_main(argv)


if __name__ == "__main__":
    sys.exit(main())
