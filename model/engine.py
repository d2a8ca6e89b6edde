"""The engine: owns one loaded model and turns Generate requests into events.

Runs inside the worker process. ``emit`` sends an event to the front end; ``should_stop`` is
polled between decode steps so that Cancel takes effect within one token.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from glmchat.errors import GlmchatError, UsageError
from glmchat.params import GenerationParams
from glmchat.protocol import (
    Beam,
    Event,
    Generate,
    GenerationResult,
    LoadProgress,
    Memory,
    ModelSpec,
    StepStats,
    Token,
)

from . import family, glm_beam
from . import generate as gen
from . import placement as place
from .clock import Clock as _Clock
from .clock import RunContext
from .family import LoadedModel
from .family_transformers import DTYPES
from .prompt_cache import ConversationCache
from .textstream import TextStream, drain, stop_index

__all__ = ["DTYPES", "Engine", "LoadedModel"]  # DTYPES, LoadedModel: their old home

Emit = Callable[[Event], None]
MEMORY_EVERY_S = 0.5
MAX_CHARS_PER_TOKEN = 64  # more characters than this per token of context cannot fit


class Engine:
    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.loaded: LoadedModel | None = None
        self.conversation = ConversationCache()
        self._last_memory = 0.0

    # ---- loading --------------------------------------------------------------------------------

    def load(self, spec: ModelSpec) -> LoadedModel:
        def progress(done: int, total: int, what: str) -> None:
            self.emit(LoadProgress(done=done, total=total, what=what))

        if self.loaded is not None and self.loaded.offload is not None:
            self.loaded.offload.close()
        self.loaded = None
        self.conversation.clear()
        if spec.threads > 0:
            torch.set_num_threads(spec.threads)
        self.loaded = family.for_source(spec.path).load(spec, progress)
        return self.loaded

    # ---- memory ---------------------------------------------------------------------------------

    def memory(self) -> Memory:
        disk = self.loaded.placement.bytes_per_tier.get("disk", 0) if self.loaded else 0
        return place.memory_snapshot(disk)

    def _maybe_emit_memory(self) -> None:
        now = time.monotonic()
        if now - self._last_memory >= MEMORY_EVERY_S:
            self._last_memory = now
            self.emit(self.memory())

    # ---- prompts --------------------------------------------------------------------------------

    def prompt_ids(self, request: Generate) -> list[int]:
        assert self.loaded is not None
        return self._family().prompt_ids(self.loaded, request)

    def _family(self) -> family.ModelFamily:
        assert self.loaded is not None
        return self.loaded.family or family.for_source(self.loaded.info.source)

    def _run_context(self, clock: _Clock) -> RunContext:
        assert self.loaded is not None
        return RunContext(model=self.loaded.model, tokenizer=self.loaded.tokenizer,
                          info=self.loaded.info, emit=self.emit, clock=clock,
                          step_stats=lambda gen_id, timing, new_tokens: self._step_stats(
                              gen_id, timing, clock, new_tokens),
                          memory=self.memory)

    # ---- generation -----------------------------------------------------------------------------

    def generate(self, request: Generate, should_stop: Callable[[], bool]) -> GenerationResult:
        if self.loaded is None:
            raise GlmchatError("no model is loaded; wait for the model to load")
        started = time.perf_counter()
        # ---- infill hook: a prompt with [MASK]/[sMASK]/[gMASK] blanks, in any mode, goes raw
        # (no chat template) to the family's blank filler (model/infill.py for transformers).
        masked = self._family().blanks(self.loaded, request)
        if masked is not None:
            with self._idle_after():
                return self._family().fill_blanks(self._run_context(_Clock(started)), request,
                                                  masked, should_stop)
        # ---- end of infill hook
        params = request.params.validate()
        model, tokenizer, info = self.loaded.model, self.loaded.tokenizer, self.loaded.info
        characters = len(request.prompt) + sum(len(m.content) for m in request.messages)
        if characters > info.context_length * MAX_CHARS_PER_TOKEN:
            # Far too long whatever the tokenizer does: say so now, not after tokenizing it.
            raise UsageError(f"the prompt is {characters} characters, far more than the "
                             f"{info.context_length} tokens {info.name} reads; shorten it")
        prompt = self.prompt_ids(request)
        room = info.context_length - len(prompt)
        if room <= 0:
            raise UsageError(f"the prompt is {len(prompt)} tokens but {info.name} reads at most "
                             f"{info.context_length}; shorten it")
        settings = gen.DecodeSettings(
            max_new_tokens=min(params.max_new_tokens, room),
            min_new_tokens=params.min_new_tokens, eos_token_ids=tuple(info.eos_token_ids),
            no_repeat_ngram_size=params.no_repeat_ngram_size,
            temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
            do_sample=params.strategy == "sample", num_beams=params.num_beams,
            length_penalty=params.length_penalty, early_stopping=params.early_stopping)
        prompt_ids = torch.tensor([prompt], dtype=torch.long)  # (1, T)
        timing = gen.StepTiming()
        clock = _Clock(started)

        def decode(ids: Sequence[int]) -> str:
            return str(tokenizer.decode(list(ids), skip_special_tokens=True))

        seed: int | None = None
        beams: list[Beam] = []
        with torch.inference_mode(), self._idle_after():
            if params.strategy == "beam":
                finish, token_ids, text, beams = self._beam(
                    request.id, model, prompt_ids, settings, params, decode, should_stop,
                    timing, clock)
            else:
                if params.strategy == "sample":
                    seed = params.seed if params.seed >= 0 else secrets.randbits(63)
                generator = torch.Generator().manual_seed(seed) if seed is not None else None
                finish, token_ids, text = self._stream(
                    request.id, model, prompt_ids, settings, params, decode, should_stop,
                    generator, timing, clock)
        timings = clock.timings(timing, len(token_ids))
        self.emit(self.memory())
        return GenerationResult(text=text, token_ids=token_ids, prompt_token_ids=prompt,
                                finish_reason=finish, strategy=params.strategy, seed=seed,
                                params=params, timings=timings, beams=beams)

    @contextlib.contextmanager
    def _idle_after(self) -> Iterator[None]:
        """No reader thread and nothing staged outlives a generation (finished, failed or
        cancelled)."""
        try:
            yield
        finally:
            if self.loaded is not None and self.loaded.offload is not None:
                self.loaded.offload.idle()

    def _stream(self, gen_id: str, model: Any, prompt_ids: torch.Tensor,
                settings: gen.DecodeSettings, params: GenerationParams,
                decode: Callable[[Sequence[int]], str], should_stop: Callable[[], bool],
                generator: torch.Generator | None, timing: gen.StepTiming,
                clock: _Clock) -> tuple[str, list[int], str]:
        stream = TextStream(decode, params.stop)
        prompt = [int(i) for i in prompt_ids[0]]
        cache: Any = None
        reused = 0
        if settings.no_repeat_ngram_size == 0:  # that processor counts the whole prompt
            cache, reused = self.conversation.take(model, prompt)
        steps = gen.decode_n(model, prompt_ids[:, reused:], settings, cache=cache,
                             past_length=reused, generator=generator,
                             should_stop=should_stop, timing=timing)
        def on_delta(delta: str, token_id: int) -> None:
            clock.token()
            if delta:
                self.emit(Token(id=gen_id, text=delta, token_id=token_id))

        def on_step() -> None:
            self._step_stats(gen_id, timing, clock, len(stream.token_ids))

        try:
            finish = drain(steps, stream, settings.eos_token_ids, on_delta, on_step,
                           keep_eos=True)
        except gen.Cancelled:
            finish = "cancelled"
        finally:
            steps.close()
        if cache is not None:
            self.conversation.keep(cache, prompt + stream.token_ids)
        rest = stream.flush()
        if rest:
            self.emit(Token(id=gen_id, text=rest, token_id=-1))
        return finish, list(stream.token_ids), stream.text

    def _beam(self, gen_id: str, model: Any, prompt_ids: torch.Tensor,
              settings: gen.DecodeSettings, params: GenerationParams,
              decode: Callable[[Sequence[int]], str], should_stop: Callable[[], bool],
              timing: gen.StepTiming, clock: _Clock) -> tuple[str, list[int], str, list[Beam]]:
        stops = params.stop

        def hits_stop(ids: list[int]) -> bool:
            return bool(stops) and stop_index(decode(ids), stops) is not None

        best_so_far: list[int] = []

        def on_step(best: list[int]) -> None:
            best_so_far[:] = best
            clock.token()
            self.emit(Token(id=gen_id, text=_cut(decode(best), stops), token_id=best[-1],
                            provisional=True))
            self._step_stats(gen_id, timing, clock, len(best))

        scorer = params.beam_scorer
        if scorer == "auto":
            scorer = self._family().default_beam_scorer
        search = glm_beam.beam_search if scorer == "glm130b" else gen.beam_search
        try:
            found = search(model, prompt_ids, settings, hits_stop=hits_stop,
                           should_stop=should_stop, on_step=on_step, timing=timing)
        except gen.Cancelled:
            text = _cut(decode(best_so_far), stops)
            return "cancelled", list(best_so_far), text, [
                Beam(text=text, token_ids=list(best_so_far), score=float("nan"))]
        beams = [Beam(text=_cut(decode(b.token_ids), stops), token_ids=b.token_ids,
                      score=b.score) for b in found]
        beams = beams[:params.num_return_sequences] if params.num_return_sequences else beams
        if not beams:
            return "length", [], "", []
        best = beams[0]
        last = best.token_ids[-1] if best.token_ids else -1
        if last in settings.eos_token_ids:
            finish = "eos"
        elif stops and stop_index(decode(best.token_ids), stops) is not None:
            finish = "stop"
        else:
            finish = "length"
        return finish, best.token_ids, best.text, beams

    def _step_stats(self, gen_id: str, timing: gen.StepTiming, clock: _Clock,
                    new_tokens: int) -> None:
        t = clock.timings(timing, new_tokens)
        step = timing.step_s[-1] if timing.step_s else timing.prefill_s
        streamer = self.loaded.offload if self.loaded is not None else None
        self.emit(StepStats(id=gen_id, new_tokens=new_tokens,
                            decode_tokens_per_s=t.decode_tokens_per_s,
                            prefill_tokens_per_s=t.prefill_tokens_per_s, ttft_s=t.ttft_s,
                            step_s=step,
                            extra=streamer.live_stats(step) if streamer is not None else {}))
        self._maybe_emit_memory()


def _cut(text: str, stops: Sequence[str]) -> str:
    cut = stop_index(text, stops) if stops else None
    return text if cut is None else text[:cut]
