"""The engine: owns one loaded model and turns Generate requests into events.

Runs inside the worker process. ``emit`` sends an event to the front end; ``should_stop`` is
polled between decode steps so that Cancel takes effect within one token.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from glmchat import paths
from glmchat.errors import GlmchatError, UsageError
from glmchat.params import GenerationParams
from glmchat.protocol import (
    Beam,
    Event,
    Generate,
    GenerationResult,
    LoadProgress,
    Memory,
    ModelInfo,
    ModelSpec,
    Placement,
    StepStats,
    Timings,
    Token,
)

from . import generate as gen
from . import offload, sources
from . import placement as place
from .prompt_cache import ConversationCache
from .textstream import TextStream, drain, stop_index

Emit = Callable[[Event], None]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MEMORY_EVERY_S = 0.5
MAX_CHARS_PER_TOKEN = 64  # more characters than this per token of context cannot fit


def _pick_dtype(spec_dtype: str, config: Any) -> torch.dtype:
    if spec_dtype != "auto":
        return DTYPES[spec_dtype]
    configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(configured, str):
        configured = DTYPES.get(configured)
    if isinstance(configured, torch.dtype) and configured in DTYPES.values():
        if configured != torch.float32 and place.gpu_count() == 0:
            # Half precision matmuls are slow on most CPUs; float32 is the CPU's native speed.
            return torch.float32
        return configured
    return torch.float32


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.append(configured)
    elif isinstance(configured, list):
        ids.extend(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _check_offload_dir(offload_dir: Path) -> None:
    """accelerate writes offloaded weights there: fail now, in words, if it cannot."""
    try:
        offload_dir.mkdir(parents=True, exist_ok=True)
        probe = offload_dir / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"offload dir {offload_dir} is not writable ({exc.strerror}); "
                         "pass --offload-dir DIR") from None


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    placement: Placement
    offload: offload.OffloadRuntime | None = None  # our runtime, when it streams layers


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
        progress(0, 4, f"checking {spec.path}")
        resolved = sources.resolve(spec.path)
        if resolved.needs_conversion:
            sources.convert_gguf(resolved, progress)
        weights_dir = resolved.weights_dir
        progress(1, 4, f"reading {resolved.name} config")
        try:
            config = AutoConfig.from_pretrained(weights_dir)
        except (ValueError, OSError, KeyError) as exc:
            raise UsageError(f"{weights_dir}/config.json cannot be used: {exc}") from None
        dtype = _pick_dtype(spec.dtype, config)
        with init_empty_weights():
            meta_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        n_params = sum(p.numel() for p in meta_model.parameters())

        progress(2, 4, "placing layers")
        device_map = place.compute_device_map(meta_model, spec, dtype)
        offload_dir = Path(spec.offload_dir or paths.default_offload_dir()).expanduser()
        runtime = "resident"
        streamed = spec.offload_runtime == "glmchat" and offload.streams_layers(device_map)
        if streamed:
            runtime = "glmchat"
        elif device_map is not None and "disk" in device_map.values():
            runtime = "accelerate"
            _check_offload_dir(offload_dir)
        if device_map is not None and len(set(device_map.values())) == 1:
            only = next(iter(device_map.values()))
            device_map = None if only == "cpu" else device_map

        progress(3, 4, f"loading {resolved.name} weights ({_human(n_params)} parameters)")
        kwargs: dict[str, Any] = {"dtype": dtype}
        if device_map is not None:
            kwargs.update(device_map=device_map, offload_folder=str(offload_dir))
        streamer: offload.OffloadRuntime | None = None
        notes: list[str] = []
        try:
            if streamed:
                assert device_map is not None
                try:
                    streamer = offload.load_offloaded(meta_model, weights_dir, device_map, dtype,
                                                      offload.compute_device(device_map),
                                                      reader=spec.offload_reader)
                except offload.NotStreamable as exc:
                    # Not an error for the user: accelerate's runtime loads through
                    # transformers, whatever its checkpoint conversions do.
                    streamed, runtime = False, "accelerate"
                    notes.append(f"the glmchat offload runtime cannot stream this checkpoint "
                                 f"({exc}); using accelerate's runtime instead")
                    _check_offload_dir(offload_dir)
            if streamed:
                assert streamer is not None
                model, device_map = meta_model, streamer.device_map
                with contextlib.suppress(OSError):
                    model.generation_config = GenerationConfig.from_pretrained(weights_dir)
            else:
                model = AutoModelForCausalLM.from_pretrained(weights_dir, **kwargs)
            del meta_model
            tokenizer = AutoTokenizer.from_pretrained(weights_dir)
        except (OSError, ValueError, RuntimeError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"{weights_dir} cannot be loaded: {first_line}") from None
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        placement = place.summarize(model, device_map, runtime)
        placement.notes.extend(notes)
        context = int(getattr(config, "max_position_embeddings", 0)
                      or getattr(tokenizer, "model_max_length", 2048))
        info = ModelInfo(
            name=resolved.name, source=spec.path, weights_dir=str(weights_dir),
            digest=resolved.digest, architecture=(config.architectures or ["?"])[0],
            n_params=n_params, dtype=str(dtype).removeprefix("torch."),
            n_layers=int(getattr(config, "num_hidden_layers", placement.n_layers)),
            context_length=context, has_chat_template=bool(tokenizer.chat_template),
            eos_token_ids=_eos_ids(model, tokenizer))
        self.loaded = LoadedModel(model, tokenizer, info, placement, streamer)
        progress(4, 4, f"{resolved.name} ready")
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
        tokenizer = self.loaded.tokenizer
        params = request.params
        use_template = not request.raw and self.loaded.info.has_chat_template
        if use_template:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            if not messages:
                messages = [{"role": "user", "content": request.prompt}]
            if not any(m["content"].strip() for m in messages if m["role"] == "user"):
                raise UsageError("the prompt is empty; type a question or pipe some text")
            if params.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": params.system_prompt})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        text = request.prompt or "\n".join(m.content for m in request.messages)
        if not text.strip():
            raise UsageError("the prompt is empty; type a question or pipe some text")
        return [int(i) for i in tokenizer(text)["input_ids"]]

    # ---- generation -----------------------------------------------------------------------------

    def generate(self, request: Generate, should_stop: Callable[[], bool]) -> GenerationResult:
        if self.loaded is None:
            raise GlmchatError("no model is loaded; wait for the model to load")
        started = time.perf_counter()
        # ---- infill hook: a prompt with [MASK]/[sMASK]/[gMASK] blanks, in any mode, goes raw
        # (no chat template) to model/infill.py, which fills the blanks left to right.
        from . import infill

        masked = infill.masked_prompt(request)
        if masked is not None:
            return infill.run_infill(self, request, masked, should_stop, _Clock(started))
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

        try:
            found = gen.beam_search(model, prompt_ids, settings, hits_stop=hits_stop,
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


class _Clock:
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


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
