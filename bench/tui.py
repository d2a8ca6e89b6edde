"""TUI benchmark (not a timed test): first paint, and key press → screen update while a reply
streams at full speed. Runs the real `glmchat` in a pseudo-terminal, as a user would.

    python -m glmchat.bench.tui [--runs 3] [--keys 20]

First paint: process start → the first frame that holds the footer (the model loads after).
Key latency: with a reply streaming, type a character; time until the terminal output shows the
editor holding it (the k-th keypress is seen when k of them appear in a row).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pty
import select
import statistics
import subprocess
import sys
import time

from glmchat.usage import Parser

COLUMNS, LINES = 140, 40
MARK = "Q"


class Terminal:
    """`glmchat` on a pty; ``output`` accumulates everything it printed."""

    def __init__(self, argv: list[str]) -> None:
        self.master, slave = pty.openpty()
        os.set_blocking(self.master, False)
        import fcntl
        import struct
        import termios

        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(COLUMNS),
               "LINES": str(LINES)}
        self.started = time.perf_counter()
        self.process = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave,
                                        env=env, start_new_session=True)
        os.close(slave)
        self.output = ""

    def read(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            with contextlib.suppress(OSError):
                self.output += os.read(self.master, 1 << 16).decode("utf-8", "replace")

    def wait_for(self, text: str, timeout: float, since: int = 0) -> float:
        """Seconds until ``text`` appears in the output after position ``since``."""
        deadline = time.perf_counter() + timeout
        while text not in self.output[since:]:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"no {text!r} within {timeout} s")
            self.read(0.005)
        return time.perf_counter()

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def quit(self) -> int:
        self.send("\x11")  # Ctrl+Q
        try:
            return self.process.wait(30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            os.close(self.master)


def glmchat_argv(*flags: str) -> list[str]:
    return [sys.executable, "-m", "glmchat", *flags]


# The floor on this machine: Python + Textual + a Footer, nothing of ours.
BARE_TEXTUAL = """
from textual.app import App
from textual.binding import Binding
from textual.widgets import Footer, Static
class Bare(App):
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]
    def compose(self):
        yield Static("bare")
        yield Footer()
Bare().run()
"""


def first_paint(runs: int, argv: list[str] | None = None) -> list[float]:
    times = []
    for _ in range(runs):
        term = Terminal(argv or glmchat_argv())
        painted = term.wait_for("Quit", 30)
        times.append(painted - term.started)
        term.quit()
    return times


def _type_marks(term: Terminal, keys: int, mark: str) -> list[float]:
    latencies = []
    for k in range(1, keys + 1):
        since = len(term.output)
        sent = time.perf_counter()
        term.send(mark)
        seen = term.wait_for(mark * k, 10, since=max(0, since - 4 * COLUMNS))
        latencies.append(seen - sent)
        time.sleep(0.1)
        term.read(0)
    return latencies


def key_latency(keys: int, flags: list[str]) -> tuple[list[float], list[float], float]:
    """(latencies while idle, latencies while streaming, seconds the streaming part took)."""
    term = Terminal(glmchat_argv("--max-new-tokens", "400", *flags))
    term.wait_for("loaded in", 600)
    idle = _type_marks(term, max(5, keys // 2), "Z")
    term.send("\x15")  # Ctrl+U: clear the editor again
    term.send("Write a very long story about a lighthouse keeper and the sea.\r")
    term.wait_for("generating", 300)
    streaming_since = time.perf_counter()
    streaming = _type_marks(term, keys, MARK)
    took = time.perf_counter() - streaming_since
    term.quit()
    return idle, streaming, took


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (f"median {statistics.median(latencies) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
            f"max {max(latencies) * 1000:.1f} ms over {len(latencies)} keys")


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="glmchat bench tui", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="first-paint runs")
    parser.add_argument("--keys", type=int, default=20, help="key presses while streaming")
    parser.add_argument("--threads", type=int, default=0,
                        help="the worker's torch threads (0 = its default: every core)")
    args = parser.parse_args(argv)
    bare = first_paint(args.runs, [sys.executable, "-c", BARE_TEXTUAL])
    paints = first_paint(args.runs)
    print(f"first paint: median {statistics.median(paints) * 1000:.0f} ms, "
          f"max {max(paints) * 1000:.0f} ms over {len(paints)} runs (target < 500 ms); "
          f"a bare Textual app with a footer: median {statistics.median(bare) * 1000:.0f} ms")
    idle, streaming, window = key_latency(
        args.keys, ["--threads", str(args.threads)] if args.threads else [])
    print(f"key press → screen, idle: {summary(idle)}")
    print(f"key press → screen while streaming: {summary(streaming)} in {window:.1f} s of "
          "streaming (target < 50 ms)")
    print("  each key while streaming, ms: "
          + " ".join(f"{latency * 1000:.0f}" for latency in streaming))
    return 0


if __name__ == "__main__":
    sys.exit(main())
