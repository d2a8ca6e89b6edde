"""What an infill strategy works with: one blank, its candidates, and the decoding helpers the
strategies share (streamed greedy/sampled fills, beam search, samples), each able to make the
fill start a new word when the prompt's trailing space was held back."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from glmchat.errors import UsageError
from glmchat.params import GenerationParams

from . import generate as gen
from . import rerank
from .textstream import TextStream, drain


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


def stream_fill(ctx: FillContext, prompt_ids: list[int], settings: gen.DecodeSettings,
                strip_leading: bool = False) -> Candidate:
    """Greedy or sampled decoding of one fill, streamed through ``ctx.on_text``.
    ``strip_leading``: drop the fill's leading spaces (the prompt already has them)."""
    stream = TextStream(ctx.decode, ctx.params.stop)
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
        finish = drain(steps, stream, settings.eos_token_ids, show,
                       lambda: ctx.on_step(len(stream.token_ids)))
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
