"""Wall-clock marks of one generation, and the narrow context a strategy runs in.

``RunContext`` is what generation code outside the engine (infill strategies, a family's own
blank loop) may use: the model and tokenizer, a way to emit events, the clock, live step stats
and a memory snapshot. It keeps those modules from importing the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from glmchat.protocol import Event, Memory, ModelInfo, Timings

from . import generate as gen

Emit = Callable[[Event], None]


class Clock:
    """Wall-clock marks of one generation: start, first token, last token."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.first: float | None = None
        self.last: float | None = None

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now

    def timings(self, timing: gen.StepTiming, new_tokens: int) -> Timings:
        now = time.perf_counter()
        first = self.first if self.first is not None else now
        last = self.last if self.last is not None else first
        decode_tokens = max(0, new_tokens - 1)
        decode_s = last - first
        return Timings(
            prefill_tokens=timing.prefill_tokens, prefill_s=timing.prefill_s,
            prefill_tokens_per_s=(timing.prefill_tokens / timing.prefill_s
                                  if timing.prefill_s > 0 else 0.0),
            ttft_s=first - self.started, decode_tokens=decode_tokens, decode_s=decode_s,
            decode_tokens_per_s=decode_tokens / decode_s if decode_s > 0 else 0.0,
            total_s=now - self.started)


@dataclass
class RunContext:
    """What a generation strategy may use: the loaded model, never the engine's insides."""

    model: Any
    tokenizer: Any
    info: ModelInfo
    emit: Emit
    clock: Clock
    step_stats: Callable[[str, gen.StepTiming, int], None]  # (request id, timing, new tokens)
    memory: Callable[[], Memory]
