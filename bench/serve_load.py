"""`glmchat bench serve-load`: many streaming clients on one `glmchat serve`, bounded.

C clients × N requests each, all streaming chat completions at once on loopback (or the
server's Unix socket), with three misbehaving clients mixed in: client 0 hangs up in the middle
of its first reply, client 1 first sends malformed JSON, client 2 first sends a wrong API key.
Every good request must be answered, with the same text as the same request run alone (greedy:
so no reply is dropped or mixed up with another's), and the server must be healthy afterwards.
Reported: p50/p95 time to first token and total tokens/s, against the same requests one at a
time. Without --url it starts its own server (the embedded model) on 127.0.0.1 and stops it.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from glmchat.usage import Parser

# ---- a server to test ------------------------------------------------------------------------


@dataclass
class RunningServer:
    url: str
    api_key: str | None
    process: subprocess.Popen[bytes]
    state_file: Path
    pid: int


@contextlib.contextmanager
def started_server(*flags: str, api_key: str | None = None, runtime_dir: Path | None = None,
                   timeout: float = 300.0, env: dict[str, str] | None = None,
                   ) -> Iterator[RunningServer]:
    """`glmchat serve FLAGS` in a subprocess, its state file in ``runtime_dir``; stopped with
    SIGTERM (then SIGKILL) on exit."""
    with contextlib.ExitStack() as stack:
        if runtime_dir is None:
            runtime_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gs-")))
        args = [sys.executable, "-m", "glmchat", "serve", *flags]
        if api_key is not None:
            key_file = runtime_dir / "key"
            key_file.write_text(api_key + "\n")
            key_file.chmod(0o600)
            args += ["--api-key-file", str(key_file)]
        state_file = runtime_dir / "glmchat" / "serve.json"
        process = subprocess.Popen(args, env={**os.environ, **(env or {}),
                                              "XDG_RUNTIME_DIR": str(runtime_dir)},
                                   stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        errors: list[bytes] = []
        threading.Thread(target=lambda: errors.extend(process.stderr or []),
                         daemon=True).start()
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError("glmchat serve exited with code "
                                       f"{process.returncode}: {b''.join(errors).decode()}")
                with contextlib.suppress(OSError, ValueError):
                    state = json.loads(state_file.read_text())
                    if state.get("pid") == process.pid:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"glmchat serve did not start in {timeout:.0f}s")
                time.sleep(0.1)
            yield RunningServer(state["url"], api_key, process, state_file, process.pid)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)


# ---- a minimal HTTP client (the standard library's) ----------------------------------------


class _Unix(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def connect(url: str, timeout: float = 120.0) -> http.client.HTTPConnection:
    if url.startswith("unix:"):
        return _Unix(url.removeprefix("unix:"), timeout)
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                      timeout=timeout)


def request(url: str, method: str, path: str, body: bytes | None = None,
            key: str | None = None) -> tuple[int, bytes]:
    conn = connect(url)
    try:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@dataclass
class Reply:
    status: int
    text: str = ""
    ttft_s: float = 0.0
    total_s: float = 0.0
    tokens: int = 0
    finish_reason: str | None = None
    done: bool = False  # saw data: [DONE]
    chunks: int = 0


def stream_chat(url: str, key: str | None, prompt: str, max_tokens: int,
                hang_up_after: int | None = None, body: bytes | None = None) -> Reply:
    """One streaming chat completion; ``hang_up_after``: close the connection after that many
    content chunks."""
    payload = body if body is not None else json.dumps({
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
    conn = connect(url)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", body=payload, headers=headers)
        response = conn.getresponse()
        reply = Reply(status=response.status)
        if response.status != 200:
            response.read()
            return reply
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                reply.done = True
                break
            message = json.loads(data)
            if message.get("usage"):
                reply.tokens = message["usage"]["completion_tokens"]
            for choice in message.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    if not reply.text:
                        reply.ttft_s = time.perf_counter() - t0
                    reply.text += content
                    reply.chunks += 1
                    if hang_up_after is not None and reply.chunks >= hang_up_after:
                        return reply
                if choice.get("finish_reason"):
                    reply.finish_reason = choice["finish_reason"]
        reply.total_s = time.perf_counter() - t0
        return reply
    finally:
        conn.close()


# ---- the load test -----------------------------------------------------------------------


@dataclass
class LoadReport:
    good_requests: int = 0
    answered: int = 0
    mismatched: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    ttft_sequential: list[float] = field(default_factory=list)
    ttft_concurrent: list[float] = field(default_factory=list)
    tokens: int = 0
    sequential_s: float = 0.0
    concurrent_s: float = 0.0
    healthy_after: bool = False

    @property
    def ok(self) -> bool:
        return (self.answered == self.good_requests and not self.mismatched
                and not self.problems and self.healthy_after)

    def lines(self) -> list[str]:
        def pct(values: list[float], q: float) -> float:
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

        out = [f"good requests answered: {self.answered}/{self.good_requests}, "
               f"mismatched: {len(self.mismatched)}, problems: {len(self.problems)}, "
               f"healthy after: {self.healthy_after}"]
        for name, values, seconds in (("one at a time", self.ttft_sequential,
                                       self.sequential_s),
                                      ("concurrent", self.ttft_concurrent,
                                       self.concurrent_s)):
            rate = self.tokens / seconds if seconds > 0 else 0.0
            out.append(f"{name:>13}: TTFT p50 {pct(values, 0.5) * 1000:7.0f} ms, "
                       f"p95 {pct(values, 0.95) * 1000:7.0f} ms; {self.tokens} tokens in "
                       f"{seconds:.2f} s = {rate:.1f} tok/s")
        return out + [f"problem: {p}" for p in self.problems + self.mismatched]


def run_load(url: str, key: str | None, clients: int = 8, requests: int = 2,
             max_tokens: int = 12) -> LoadReport:
    report = LoadReport()
    prompts = {(c, r): f"Say the number {c * 100 + r} and one word about it."
               for c in range(clients) for r in range(requests)}
    expected: dict[tuple[int, int], str] = {}
    t0 = time.perf_counter()
    for job, prompt in prompts.items():  # the baseline: one at a time
        reply = stream_chat(url, key, prompt, max_tokens)
        if reply.status != 200 or not reply.done:
            report.problems.append(f"baseline {job}: HTTP {reply.status}, done={reply.done}")
            continue
        expected[job] = reply.text
        report.ttft_sequential.append(reply.ttft_s)
        report.tokens += reply.tokens
    report.sequential_s = time.perf_counter() - t0

    lock = threading.Lock()

    def client(c: int) -> None:
        if c == 0 and requests > 0:  # hangs up mid-reply, then behaves
            stream_chat(url, key, prompts[(0, 0)] + " Take your time.", 64, hang_up_after=2)
        if c == 1:
            bad = stream_chat(url, key, "", 1, body=b'{"messages": [')
            if bad.status != 400:
                with lock:
                    report.problems.append(f"malformed JSON got HTTP {bad.status}, not 400")
        if c == 2 and key:
            bad = stream_chat(url, "wrong-" + secrets.token_hex(4), "hi", 1)
            if bad.status != 401:
                with lock:
                    report.problems.append(f"a wrong key got HTTP {bad.status}, not 401")
        for r in range(requests):
            reply = stream_chat(url, key, prompts[(c, r)], max_tokens)
            with lock:
                if reply.status != 200 or not reply.done or reply.finish_reason is None:
                    report.problems.append(f"client {c} request {r}: HTTP {reply.status}, "
                                           f"done={reply.done}")
                    continue
                report.answered += 1
                report.ttft_concurrent.append(reply.ttft_s)
                if (c, r) in expected and reply.text != expected[(c, r)]:
                    report.mismatched.append(f"client {c} request {r}: {reply.text!r} != "
                                             f"{expected[(c, r)]!r}")

    report.good_requests = clients * requests
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    report.concurrent_s = time.perf_counter() - t0
    status, body = request(url, "GET", "/health")
    report.healthy_after = status == 200 and json.loads(body).get("waiting") == 0
    return report


def main(argv: list[str]) -> int:
    parser = Parser(prog="glmchat bench serve-load", description=__doc__)
    parser.add_argument("--url", help="a running glmchat serve (default: start one)")
    parser.add_argument("--api-key", help="its key (default: a random one for our server)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url, key = args.url, args.api_key
        if url is None:
            key = key or secrets.token_hex(16)
            print("starting glmchat serve on 127.0.0.1 …", file=sys.stderr)
            url = stack.enter_context(started_server("--port", "0", api_key=key)).url
        report = run_load(url, key, args.clients, args.requests, args.max_tokens)
    print(f"glmchat bench serve-load: {args.clients} clients × {args.requests} requests, "
          f"max_tokens {args.max_tokens}, {url}")
    for line in report.lines():
        print("  " + line)
    print(f"  machine: {os.cpu_count()} CPUs; numbers taken under whatever else runs here")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
