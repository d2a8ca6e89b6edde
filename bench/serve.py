"""`glmchat bench serve`: what a running `glmchat serve` saves, and what its HTTP hop costs.

1. one-shot wall time: `glmchat PROMPT` as a fresh process that loads the model itself (cold:
   no server), against the second `glmchat PROMPT` while a server runs (it finds the server by
   its state file and loads nothing).
2. streaming cost per token: the same greedy reply (N tokens, forced) from a local worker over
   its pipe and from the server over its Unix socket (and, with --tcp, 127.0.0.1), timed at
   the client between the first and the last token and inside the worker (its own decode
   timing), and the latency the hop adds (client TTFT less the worker's), medians of R runs.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from glmchat.bench.serve_load import started_server

from glmchat.usage import Parser

PROMPT = "Write a haiku about the sea."


def oneshot_wall(runtime_dir: Path, *extra: str) -> tuple[float, str]:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime_dir)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "glmchat", "-v", "--max-new-tokens", "8",
                           *extra, PROMPT], env=env, capture_output=True, text=True,
                          timeout=600)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"glmchat exited {done.returncode}: {done.stderr.strip()}")
    backend = next((line.split("backend: ", 1)[1] for line in done.stderr.splitlines()
                    if "backend: " in line), "?")
    return wall, backend


def per_token_s(backend: Any, tokens: int) -> tuple[float, float, float]:
    """Seconds per token between the first and the last token, seen by the client and by the
    worker (its own decode timing); and the latency the hop adds: the client's time to first
    token less the worker's (request in → first token out)."""
    from glmchat.params import GenerationParams
    from glmchat.protocol import Finished, Token

    params = GenerationParams(strategy="greedy", max_new_tokens=tokens, min_new_tokens=tokens)
    stamps: list[float] = []
    worker = latency = 0.0
    t0 = time.perf_counter()
    for event in backend.stream(backend.generate(params, prompt=PROMPT)):
        if isinstance(event, Token):
            stamps.append(time.perf_counter())
        elif isinstance(event, Finished):
            timings = event.result.timings
            worker = timings.decode_s / max(1, timings.decode_tokens)
            latency = stamps[0] - t0 - timings.ttft_s
            break
    return (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1), worker, latency


def main(argv: list[str]) -> int:
    parser = Parser(prog="glmchat bench serve", description=__doc__)
    parser.add_argument("--tokens", type=int, default=48, help="streamed tokens per run")
    parser.add_argument("--runs", type=int, default=3, help="streaming runs (median)")
    parser.add_argument("--tcp", action="store_true", help="also over 127.0.0.1")
    args = parser.parse_args(argv)
    from glmchat.client import EngineClient
    from glmchat.protocol import ModelSpec
    from glmchat.remote_native import GlmchatRemote

    rows: list[str] = []
    with contextlib.ExitStack() as stack:
        empty = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gs-none-")))
        cold, cold_backend = oneshot_wall(empty)
        run = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gs-")))
        server = stack.enter_context(started_server(runtime_dir=run))
        oneshot_wall(run)
        warm, warm_backend = oneshot_wall(run)
        rows.append(f"one-shot, cold start ({cold_backend}): {cold:6.2f} s")
        rows.append(f"one-shot, second with a server ({warm_backend}): {warm:6.2f} s "
                    f"({cold / warm:.0f}x faster)")

        local = EngineClient()
        local.start()
        stack.callback(local.close)
        list(local.load(ModelSpec()))
        targets: list[tuple[str, Any]] = [("local pipe", local)]
        remote = GlmchatRemote(server.url)
        remote.start()
        targets.append(("unix socket", remote))
        if args.tcp:
            tcp = stack.enter_context(started_server("--port", "0"))
            over_tcp = GlmchatRemote(tcp.url)
            over_tcp.start()
            targets.append(("127.0.0.1", over_tcp))
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in targets}
        for _ in range(args.runs):  # interleaved, so drift on a busy machine hits all alike
            for name, backend in targets:
                runs[name].append(per_token_s(backend, args.tokens))
        for name, measured in runs.items():
            seen = statistics.median(m[0] for m in measured)
            computed = statistics.median(m[1] for m in measured)
            latency = statistics.median(m[2] for m in measured)
            rows.append(f"streaming via {name:>11}: {1000 * seen:6.2f} ms/token at the client, "
                        f"{1000 * computed:6.2f} in the worker ({1000 * (seen - computed):+.2f}"
                        f"); the hop adds {1000 * latency:5.2f} ms to the first token")
    print(f"glmchat bench serve ({args.tokens} tokens, median of {args.runs}; "
          f"{os.cpu_count()} CPUs, shared with whatever else runs)")
    for row in rows:
        print("  " + row)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
