"""Infill: fill a prompt's blanks one at a time, left to right, with the loaded model.

How one blank is filled depends on the model, behind one seam (``InfillStrategy``), picked by
``choose_strategy``:

  native  the model fills blanks itself. A model class offers it by defining
          ``glmchat_infill_strategy() -> InfillStrategy``. (GLM-130B's own blank loop, with its
          mask tokens, sop and positions, is its family's ``fill_blanks``: glm_generate.py.)
  fim     the tokenizer has fill-in-the-middle tokens (StarCoder, SantaCoder, CodeLlama,
          DeepSeek-Coder, Qwen2.5-Coder): the model's own format, found in the vocabulary
          (fim.py).
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

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
from glmchat.protocol import Beam, Generate, GenerationResult, Span, Token

from . import generate as gen
from . import rerank
from .clock import RunContext
from .fill import Blank, Candidate, FillContext, Filled, beam_fills, sampled_fills, stream_fill
from .fim import FimStrategy, detect_fim

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


def run_infill(run: RunContext, request: Generate, masked: MaskedText,
               should_stop: Callable[[], bool]) -> GenerationResult:
    assert masked.kind is not None
    params = request.params.validate()
    model, tokenizer, info, clock = run.model, run.tokenizer, run.info, run.clock
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
        run.emit(Token(id=request.id, text=text, token_id=token_id))

    def on_step(fill_tokens: int) -> None:
        clock.token()
        run.step_stats(request.id, timing, made + fill_tokens)

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
    run.emit(run.memory())
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
