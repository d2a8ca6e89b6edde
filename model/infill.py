"""Infill: fill a prompt's blanks one at a time, left to right, with the loaded model.

How one blank is filled depends on the model, behind one seam (``InfillStrategy``), picked by
``choose_strategy``:

  native  the model fills blanks itself. GLM-130B will plug in here: its mask tokens, <sop> and
          2D positions as in its generate.py. A model class offers it by defining
          ``glmchat_infill_strategy() -> InfillStrategy``.
  fim     the tokenizer has fill-in-the-middle tokens (StarCoder, SantaCoder, CodeLlama,
          DeepSeek-Coder, Qwen2.5-Coder): the model's own format, found in the vocabulary.
  rerank  any other causal LM: candidates from the prefix, re-ranked by the likelihood of
          prefix + candidate + suffix (rerank.py).

``run_infill`` is GLM-130B's fill_blanks loop: each fill sees the earlier blanks filled and the
later ones still masked; with beam search later blanks continue from the best beam and the
result lists the n best fills of the last blank. Token events carry the result text in order
(the text between blanks as it is reached, each fill as it is made), so what streamed is what
``result.text`` says.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import DynamicCache

from glmchat.errors import UsageError
from glmchat.infill import (
    GMASK,
    MASK,
    SMASK,
    SMASK_NOTE,
    MaskedText,
    has_masks,
    parse_masks,
    splice,
)
from glmchat.params import GenerationParams
from glmchat.protocol import Beam, Generate, GenerationResult, Span, Token

from . import generate as gen
from . import rerank
from .textstream import TextStream

if TYPE_CHECKING:
    from .engine import Engine, _Clock

# The most new tokens one blank may take: a short span, a sentence; [gMASK] takes what is left.
BLANK_TOKENS = {MASK: 16, SMASK: 48}
PROPOSALS = 4  # at least this many proposals per blank for the re-ranker
_noted: set[str] = set()  # notes said once per worker (= per front-end session)


def masked_prompt(request: Generate) -> MaskedText | None:
    """The request's blanks if its text has any mask; None: not an infill request. The text is
    the prompt, or else the last user message (a chat turn with a mask is infilled alone)."""
    text = request.prompt
    if not text:
        users = [m.content for m in request.messages if m.role == "user"]
        text = users[-1] if users else ""
    return parse_masks(text) if has_masks(text) else None


# ---------------------------------------------------------------------------------------------
# the seam


@dataclass
class Blank:
    index: int
    kind: str  # MASK | SMASK | GMASK
    prefix: str  # all text before the blank, earlier blanks filled
    suffix: str  # all text after it, later blanks still masks
    max_new_tokens: int


@dataclass
class Candidate:
    text: str  # the fill as spliced into the text
    token_ids: list[int]
    score: float | None  # log-likelihood in nats (rerank), beam score (beam), None (unscored)
    finish: str  # "stop" | "eos" | "length" | "cancelled"


@dataclass
class Filled:
    candidates: list[Candidate]  # best first; never empty
    streamed: bool  # the best candidate's text already went out as Token events


@dataclass
class FillContext:
    """What a strategy may use while filling the blanks of one request."""

    model: Any
    tokenizer: Any
    params: GenerationParams
    eos_token_ids: tuple[int, ...]
    generator: torch.Generator | None
    should_stop: Callable[[], bool]
    timing: gen.StepTiming
    on_text: Callable[[str, int], None]  # stream fill text as it is generated
    on_step: Callable[[int], None]  # a decode step made; the argument: tokens of this fill
    _word_starts: torch.Tensor | None = None

    def encode(self, text: str, special: bool = True) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=special)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def document_start(self) -> list[int]:
        """Something to generate from when there is no prefix at all."""
        auto = self.encode("")
        if auto:
            return auto
        vocab = self.tokenizer.get_vocab()
        if "<|endoftext|>" in vocab:
            return [vocab["<|endoftext|>"]]
        for token_id in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token_id is not None:
                return [int(token_id)]
        raise UsageError("this model's tokenizer has no start-of-text token, so a blank with "
                         "no text before it cannot be filled; put some text before the mask")

    def word_starts(self) -> torch.Tensor:
        """(V,) True for tokens that begin with whitespace (byte-level BPE 'Ġ'/'Ċ', SentencePiece
        '▁'): what may follow a prompt whose trailing space was held back."""
        if self._word_starts is None:
            tokens = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            starts = ("Ġ", "Ċ", "ĉ", "▁", " ", "\n", "\t", "<0x0A>", "<0x20>", "<0x09>")
            mask = torch.tensor([isinstance(t, str) and t.startswith(starts) for t in tokens])
            size = self.model.config.vocab_size
            self._word_starts = torch.zeros(max(size, len(mask)), dtype=torch.bool)
            self._word_starts[:len(mask)] = mask
        return self._word_starts

    def first_token(self, prompt_ids: list[int], settings: gen.DecodeSettings) -> int:
        """The first token of a fill that must start a new word: greedy or sampled among the
        word-start tokens."""
        cache = DynamicCache(config=self.model.config)
        logits = gen.prefill(self.model, torch.tensor([prompt_ids], dtype=torch.long), cache)
        allowed = self.word_starts()[:logits.shape[-1]]
        scores = gen.process_scores(logits, torch.tensor([prompt_ids]), 0, settings)
        scores = scores.masked_fill(~allowed, gen.NEG_INF)  # (1, V)
        return int(gen.sample(scores, settings, self.generator)[0])

    def decode_from(self, prompt_ids: list[int], settings: gen.DecodeSettings,
                    word_start: bool) -> Generator[int, None, None]:
        """Greedy or sampled token ids of one fill (``decode_n``), the first one a word start
        if ``word_start``."""
        if word_start:
            first = self.first_token(prompt_ids, settings)
            yield first
            if first in settings.eos_token_ids or settings.max_new_tokens == 1:
                return
            prompt_ids = [*prompt_ids, first]
            settings = dataclasses.replace(settings, max_new_tokens=settings.max_new_tokens - 1,
                                           min_new_tokens=max(0, settings.min_new_tokens - 1))
        yield from gen.decode_n(self.model, torch.tensor([prompt_ids], dtype=torch.long),
                                settings, generator=self.generator,
                                should_stop=self.should_stop, timing=self.timing)

    def settings(self, max_new_tokens: int, extra_eos: Sequence[int] = ()) -> gen.DecodeSettings:
        p = self.params
        return gen.DecodeSettings(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min(p.min_new_tokens, max_new_tokens),
            eos_token_ids=tuple(dict.fromkeys([*self.eos_token_ids, *extra_eos])),
            no_repeat_ngram_size=p.no_repeat_ngram_size, temperature=p.temperature,
            top_k=p.top_k, top_p=p.top_p, do_sample=p.strategy == "sample",
            num_beams=p.num_beams, length_penalty=p.length_penalty,
            early_stopping=p.early_stopping)


class InfillStrategy(Protocol):
    name: str

    def fill(self, ctx: FillContext, blank: Blank) -> Filled: ...


def choose_strategy(model: Any, tokenizer: Any) -> InfillStrategy:
    native = getattr(model, "glmchat_infill_strategy", None)
    if callable(native):
        strategy: InfillStrategy = native()
        return strategy
    fim = detect_fim(tokenizer)
    return FimStrategy(fim) if fim is not None else RerankStrategy()


# ---------------------------------------------------------------------------------------------
# decoding helpers shared by the strategies


def stream_fill(ctx: FillContext, prompt_ids: list[int], settings: gen.DecodeSettings,
                strip_leading: bool = False) -> Candidate:
    """Greedy or sampled decoding of one fill, streamed through ``ctx.on_text``.
    ``strip_leading``: drop the fill's leading spaces (the prompt already has them)."""
    stream = TextStream(ctx.decode, ctx.params.stop)
    finish = "length"
    leading = strip_leading
    shown: list[str] = []

    def show(delta: str, token_id: int) -> None:
        nonlocal leading
        if leading:
            delta = delta.lstrip(" ")
            leading = not delta
        if delta:
            shown.append(delta)
            ctx.on_text(delta, token_id)

    steps = ctx.decode_from(prompt_ids, settings, strip_leading)
    try:
        for token_id in steps:
            if token_id in settings.eos_token_ids:
                finish = "eos"
                break
            show(stream.push(token_id), token_id)
            ctx.on_step(len(stream.token_ids))
            if stream.stopped:
                finish = "stop"
                break
    except gen.Cancelled:
        finish = "cancelled"
    finally:
        steps.close()
    show(stream.flush(), -1)
    return Candidate("".join(shown), list(stream.token_ids), None, finish)


def beam_fills(ctx: FillContext, prompt_ids: list[int], settings: gen.DecodeSettings,
               cut: rerank.Cut | None = None, word_start: bool = False) -> list[rerank.Proposal]:
    """Beam search from ``prompt_ids``; each hypothesis ends at EOS, the budget or ``cut``.
    ``word_start``: all beams grow from the best word-start first token."""
    first: list[int] = []
    if word_start:
        first = [ctx.first_token(prompt_ids, settings)]
        if first[0] in settings.eos_token_ids or settings.max_new_tokens == 1:
            return [rerank.Proposal(ctx.decode(first), first, "length", None)]
        settings = dataclasses.replace(settings, max_new_tokens=settings.max_new_tokens - 1)

    def hits_stop(ids: list[int]) -> bool:
        return cut is not None and cut(ctx.decode(first + ids)) is not None

    found = gen.beam_search(ctx.model, torch.tensor([prompt_ids + first], dtype=torch.long),
                            settings, hits_stop=hits_stop, should_stop=ctx.should_stop,
                            on_step=lambda best: ctx.on_step(len(best)), timing=ctx.timing)
    out = []
    for beam in found:
        beam.token_ids = first + beam.token_ids
        text = ctx.decode(beam.token_ids)
        at = cut(text) if cut is not None else None
        if at is not None:
            finish = "stop"
        elif beam.token_ids and beam.token_ids[-1] in settings.eos_token_ids:
            finish = "eos"
        else:
            finish = "length"
        out.append(rerank.Proposal(text if at is None else text[:at], beam.token_ids, finish,
                                   beam.score))
    return out


def sampled_fills(ctx: FillContext, prompt_ids: list[int], settings: gen.DecodeSettings,
                  cut: rerank.Cut, count: int, word_start: bool) -> list[rerank.Proposal]:
    """``count`` sampled proposals, each ending at EOS, the budget or ``cut``."""
    out = []
    for _ in range(count):
        ids: list[int] = []
        finish, text = "length", ""
        steps = ctx.decode_from(prompt_ids, settings, word_start)
        try:
            for token_id in steps:
                ids.append(token_id)
                ctx.on_step(len(ids))
                if token_id in settings.eos_token_ids:
                    finish = "eos"
                    break
                text = ctx.decode(ids)
                at = cut(text)
                if at is not None:
                    finish, text = "stop", text[:at]
                    break
        finally:
            steps.close()
        out.append(rerank.Proposal(text if finish != "eos" else ctx.decode(ids), ids, finish))
    return out


# ---------------------------------------------------------------------------------------------
# fill-in-the-middle formats


@dataclass(frozen=True)
class FimFormat:
    name: str
    prefix: str
    suffix: str
    middle: str
    ends: tuple[str, ...] = ()  # tokens that end the middle, besides the model's EOS
    suffix_first: bool = False  # [SUFFIX]…[PREFIX]… (Codestral)


FIM_FORMATS: tuple[FimFormat, ...] = (
    FimFormat("qwen2.5-coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
              ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>")),
    FimFormat("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>",
              ("<|endoftext|>", "<file_sep>", "<fim_pad>")),
    FimFormat("santacoder", "<fim-prefix>", "<fim-suffix>", "<fim-middle>",
              ("<|endoftext|>", "<fim-pad>")),
    FimFormat("deepseek-coder", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>",
              ("<｜end▁of▁sentence｜>", "<|EOT|>")),
    FimFormat("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", ("▁<EOT>",)),
    FimFormat("codellama", "<PRE>", "<SUF>", "<MID>", ("<EOT>",)),
    FimFormat("codestral", "[PREFIX]", "[SUFFIX]", "[MIDDLE]", (), suffix_first=True),
)


def detect_fim(tokenizer: Any) -> FimFormat | None:
    """The FIM format whose three tokens are all in the tokenizer's vocabulary (by token, not by
    the model's name: a fine-tune keeps its base model's tokens)."""
    vocab = tokenizer.get_vocab()
    for fim in FIM_FORMATS:
        if all(token in vocab for token in (fim.prefix, fim.suffix, fim.middle)):
            return fim
    return None


def fim_prompt(ctx: FillContext, fim: FimFormat, prefix: str, suffix: str) -> list[int]:
    vocab = ctx.tokenizer.get_vocab()
    pre = [vocab[fim.prefix], *ctx.encode(prefix, special=False)]
    suf = [vocab[fim.suffix], *ctx.encode(suffix, special=False)]
    start = ctx.encode("")  # the tokenizer's own BOS, if it adds one
    body = suf + pre if fim.suffix_first else pre + suf
    return [*start, *body, vocab[fim.middle]]


@dataclass
class FimStrategy:
    fim: FimFormat
    name: str = "fim"

    def fill(self, ctx: FillContext, blank: Blank) -> Filled:
        vocab = ctx.tokenizer.get_vocab()
        ends = [vocab[t] for t in self.fim.ends if t in vocab]
        settings = ctx.settings(blank.max_new_tokens, ends)
        prompt_ids = fim_prompt(ctx, self.fim, blank.prefix, blank.suffix)
        if ctx.params.strategy == "beam":
            found = beam_fills(ctx, prompt_ids, settings, rerank.boundary(
                GMASK, ctx.params.stop, False))
            return Filled([Candidate(p.text, p.token_ids, p.score, p.finish)
                           for p in found] or [Candidate("", [], None, "length")], False)
        return Filled([stream_fill(ctx, prompt_ids, settings)], True)


# ---------------------------------------------------------------------------------------------
# any causal LM


@dataclass
class RerankStrategy:
    name: str = "rerank"

    def fill(self, ctx: FillContext, blank: Blank) -> Filled:
        # BPE vocabularies attach a space to the word after it: generate from the prefix without
        # its trailing spaces, and splice the fill in without its leading ones.
        context = blank.prefix.rstrip(" ")
        strip_leading = context != blank.prefix
        context_ids = ctx.encode(context) if context else []
        prompt_ids = context_ids or ctx.document_start()
        suffix = rerank.scoring_suffix(blank.suffix, blank.kind)[:rerank.SCORE_SUFFIX_CHARS]
        has_suffix = bool(suffix.strip())
        settings = ctx.settings(blank.max_new_tokens)
        beam = ctx.params.strategy == "beam"
        if blank.kind == GMASK and not blank.suffix.strip():  # nothing after it: continue
            if not beam:
                return Filled([stream_fill(ctx, prompt_ids, settings, strip_leading)], True)
            found = beam_fills(ctx, prompt_ids, settings,
                               rerank.boundary(GMASK, ctx.params.stop, False), strip_leading)
            return Filled([Candidate(_spliced(p.text, strip_leading), p.token_ids, p.score,
                                     p.finish) for p in found]
                          or [Candidate("", [], None, "length")], False)

        cut = rerank.boundary(blank.kind, ctx.params.stop, has_suffix)
        prefix = rerank.prefill_prefix(ctx.model, prompt_ids)
        count = max(ctx.params.num_beams, PROPOSALS)
        if ctx.params.strategy == "sample":
            proposals = sampled_fills(ctx, prompt_ids, settings, cut, count, strip_leading)
        else:
            # Beam search's beams mostly share a first word; growing one proposal from each of
            # several first tokens (chosen with the suffix in view) gives the re-ranker choices.
            lookahead = (rerank.continuation_ids(ctx.encode, context, context_ids, suffix)
                         if has_suffix else [])
            allowed = ctx.word_starts() if strip_leading else None
            first = rerank.first_tokens(ctx.model, prefix, lookahead, count,
                                        ctx.eos_token_ids, allowed, _pad(ctx))
            proposals = rerank.grow(ctx.model, prefix, first, settings, ctx.decode, cut,
                                    ctx.should_stop, ctx.on_step)
            if beam:
                proposals = beam_fills(ctx, prompt_ids, settings, cut, strip_leading) + proposals
        texts = rerank.candidate_texts(blank.kind, proposals, has_suffix)
        if not texts:
            finish = proposals[0].finish if proposals else "length"
            return Filled([Candidate("", [], None, finish)], False)
        if ctx.should_stop():
            raise gen.Cancelled
        encode = ctx.encode
        rests = [rerank.continuation_ids(encode, context, context_ids, text + suffix)
                 for text in texts]
        scores = rerank.score_continuations(ctx.model, prefix, rests, _pad(ctx))
        finishes = {p.text.rstrip(): p.finish for p in reversed(proposals)}
        ranked = sorted(zip(texts, scores, strict=True), key=lambda pair: -pair[1])
        return Filled([Candidate(_spliced(text, strip_leading),
                                 rerank.continuation_ids(encode, context, context_ids, text),
                                 score, finishes.get(text, "stop"))
                       for text, score in ranked], False)


def _pad(ctx: FillContext) -> int:
    return ctx.eos_token_ids[0] if ctx.eos_token_ids else 0


def _spliced(text: str, strip_leading: bool) -> str:
    return text.lstrip(" ") if strip_leading else text


# ---------------------------------------------------------------------------------------------
# the loop over blanks


def run_infill(engine: Engine, request: Generate, masked: MaskedText,
               should_stop: Callable[[], bool], clock: _Clock) -> GenerationResult:
    assert engine.loaded is not None and masked.kind is not None
    params = request.params.validate()
    model, tokenizer, info = engine.loaded.model, engine.loaded.tokenizer, engine.loaded.info
    kind = masked.kind
    notes = masked.warnings()
    if kind == SMASK and SMASK not in _noted:
        _noted.add(SMASK)
        notes.append(SMASK_NOTE)
    if params.max_new_tokens < masked.blanks:
        raise UsageError(f"the prompt has {masked.blanks} {kind} blanks but max_new_tokens is "
                         f"{params.max_new_tokens}; allow at least one token per blank "
                         "(--max-new-tokens)")
    seed = None
    if params.strategy == "sample":
        seed = params.seed if params.seed >= 0 else secrets.randbits(63)
    strategy = choose_strategy(model, tokenizer)
    timing = gen.StepTiming()
    made = 0  # tokens of the blanks filled so far

    def on_text(text: str, token_id: int) -> None:
        engine.emit(Token(id=request.id, text=text, token_id=token_id))

    def on_step(fill_tokens: int) -> None:
        clock.token()
        engine._step_stats(request.id, timing, clock, made + fill_tokens)

    ctx = FillContext(
        model=model, tokenizer=tokenizer, params=params, eos_token_ids=tuple(info.eos_token_ids),
        generator=torch.Generator().manual_seed(seed) if seed is not None else None,
        should_stop=should_stop, timing=timing, on_text=on_text, on_step=on_step)
    prompt_ids = ctx.encode(masked.text())
    if len(prompt_ids) + masked.blanks > info.context_length:
        raise UsageError(f"the prompt is {len(prompt_ids)} tokens and has {masked.blanks} blanks "
                         f"to fill, but {info.name} reads at most {info.context_length} tokens; "
                         "shorten the text around the masks")

    fills: list[str] = []
    scores: list[float | None] = []
    token_ids: list[int] = []
    finishes: list[str] = []
    last: list[Candidate] = []
    if masked.segments[0]:
        on_text(masked.segments[0], -1)
    with torch.inference_mode():
        for index in range(masked.blanks):
            prefix = "".join(s + f for s, f in zip(masked.segments, fills, strict=False))
            prefix += masked.segments[index]
            suffix = kind.join(masked.segments[index + 1:])
            room = info.context_length - len(ctx.encode(prefix)) - len(ctx.encode(suffix, False))
            allowance = params.max_new_tokens - made - (masked.blanks - index - 1)
            budget = min(room, allowance, BLANK_TOKENS.get(kind, allowance))
            if budget < 1:
                raise UsageError(f"blank {index + 1} has no room: the text around it fills "
                                 f"{info.name}'s {info.context_length}-token context")
            if should_stop():
                finishes.append("cancelled")
                break
            try:
                filled = strategy.fill(ctx, Blank(index, kind, prefix, suffix, budget))
            except gen.Cancelled:
                finishes.append("cancelled")
                break
            best = filled.candidates[0]
            if not filled.streamed:
                on_text(best.text, best.token_ids[-1] if best.token_ids else -1)
            fills.append(best.text)
            scores.append(best.score)
            token_ids.extend(best.token_ids)
            made += len(best.token_ids)
            finishes.append(best.finish)
            last = filled.candidates
            if best.finish == "cancelled":
                break
            if masked.segments[index + 1]:
                on_text(masked.segments[index + 1], -1)

    text, spans = _spliced_text(masked, fills, scores)
    beams: list[Beam] = []
    if params.strategy == "beam" and last:
        earlier = token_ids[:len(token_ids) - len(last[0].token_ids)]
        for candidate in last[:params.num_return_sequences]:
            beam_text, _ = _spliced_text(masked, [*fills[:-1], candidate.text], scores)
            beams.append(Beam(text=beam_text, token_ids=earlier + candidate.token_ids,
                              score=_finite(candidate.score)))
    if "cancelled" in finishes:
        finish = "cancelled"
    elif "length" in finishes:
        finish = "length"
    else:
        finish = finishes[-1] if finishes and finishes[-1] == "eos" else "stop"
    engine.emit(engine.memory())
    return GenerationResult(
        text=text, token_ids=token_ids, prompt_token_ids=prompt_ids, finish_reason=finish,
        strategy=params.strategy, seed=seed, params=params,
        timings=clock.timings(timing, len(token_ids)), beams=beams, spans=spans, notes=notes)


def _spliced_text(masked: MaskedText, fills: Sequence[str],
                  scores: Sequence[float | None]) -> tuple[str, list[Span]]:
    text, spans = splice(masked, fills)
    return text, [dataclasses.replace(span, score=score)
                  for span, score in zip(spans, scores, strict=False)]


def _finite(score: float | None) -> float:
    return float("nan") if score is None or not math.isfinite(score) else score
