"""Numbers as the user reads them: bytes, rates, durations, the per-reply stats line."""

from __future__ import annotations

from glmchat.protocol import GenerationResult


def human_bytes(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def streaming(extra: dict[str, object]) -> list[tuple[str, str]]:
    """What the glmchat offload runtime reported with a decode step (``StepStats.extra``), as
    (label, value) rows; none when nothing streams."""
    layers = extra.get("streamed_layers")
    if not isinstance(layers, int) or layers <= 0:
        return []
    per_token = extra.get("bytes_streamed_per_token", 0)
    rate = extra.get("stream_gb_per_s", 0.0)
    reader = extra.get("reader", "")
    resident = extra.get("resident_layers", 0)
    total = layers + resident if isinstance(resident, int) else layers
    rows = [("streamed", f"{layers}/{total} layers"),
            ("per token", human_bytes(per_token) if isinstance(per_token, int | float) else "?")]
    if isinstance(rate, int | float) and rate > 0:
        rows.append(("stream rate", f"{rate:.2f} GB/s"))
    if reader:
        rows.append(("reader", str(reader)))
    scheme = extra.get("quantize", "none")
    if scheme and scheme != "none":
        rows.append(("weights", str(scheme)))
    return rows


def streaming_summary(extra: dict[str, object]) -> str:
    """One clause for the REPL's stats line: 'streamed 1.9 GiB/token at 3.01 GB/s (direct)'."""
    rows = dict(streaming(extra))
    if not rows:
        return ""
    text = f"streamed {rows['per token']}/token"
    if "stream rate" in rows:
        text += f" at {rows['stream rate']}"
    if "reader" in rows:
        text += f" ({rows['reader']} reader)"
    if "weights" in rows:
        text += f", {rows['weights']} weights"
    return text


def eta(elapsed_s: float, done: int, total: int) -> str:
    """Time left at the rate so far; '' until there is a rate to go on."""
    if done <= 0 or total <= 0 or done >= total or elapsed_s <= 0:
        return ""
    return duration(elapsed_s / done * (total - done))


def token_count(result: GenerationResult) -> int:
    """Tokens generated: the ids, or the server's count when it sends no ids."""
    return len(result.token_ids) or result.timings.decode_tokens


def stats_line(result: GenerationResult) -> str:
    """One line under each reply: tokens, speeds, TTFT, strategy, how it ended."""
    t = result.timings
    strategy = result.strategy
    if strategy == "beam":
        strategy = f"beam × {result.params.num_beams}"
    elif strategy == "sample":
        strategy = f"sample T={result.params.temperature:g} seed {result.seed}"
    parts = [f"{token_count(result)} tokens", f"{t.decode_tokens_per_s:.1f} tok/s",
             f"prefill {t.prefill_tokens_per_s:.0f} tok/s" if t.prefill_tokens_per_s > 0
             else "prefill –", f"TTFT {duration(t.ttft_s)}", strategy]
    if result.finish_reason != "eos":
        parts.append({"length": "hit max_new_tokens", "cancelled": "stopped",
                      "stop": "stop string"}.get(result.finish_reason, result.finish_reason))
    return " · ".join(parts)
