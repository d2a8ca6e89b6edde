"""GLM-130B's own generation, at the level of token ids (SPEC §4-5).

Ports of THUDM/GLM-130B's generate.py (``get_masks_and_position_ids``, ``fill_blanks``),
evaluation/model.py (``batch_filling_sequence``) and generation/strategies.py
(``BaseStrategy``, ``BeamSearchStrategy``), over model/glm130b.py with its KV cache. Greedy is
argmax (the reference draws top_k=1 with multinomial, which only differs on exact fp16 ties).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import generate as gen
from .glm130b import GLM130B, KVCache
from .icetk_tokenizer import END_TOKENS, EOS, GMASK, MASK, SMASK, SOP

FILTER = -65504.0


def build_sequence(tokens: Sequence[int], ends_with_mask: bool | None = None
                   ) -> tuple[list[int], int, bool]:
    """fill_blanks L52-76: (sequence, mask id to fill, use_gmask). ``ends_with_mask``: whether
    the raw text ends with ``MASK]`` (default: whether the last token is a mask)."""
    seq = list(tokens)
    mask_id = MASK if MASK in seq else SMASK if SMASK in seq else GMASK
    use_gmask = MASK not in seq and SMASK not in seq
    if ends_with_mask is None:
        ends_with_mask = bool(seq) and seq[-1] in (MASK, SMASK, GMASK)
    if not any(t in (MASK, SMASK, GMASK) for t in seq):
        seq.append(GMASK)
        ends_with_mask = True
    if not ends_with_mask:
        seq.append(EOS)
    return seq, mask_id, use_gmask


def masks_and_positions(context_length: int, total: int, mask_position: int,
                        gmask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, total, total) bool mask, True = masked, and (1, total) position ids."""
    visible = torch.ones((1, total, total)).tril_()
    visible[..., :context_length - 1] = 1  # everything before sop sees everything before sop
    mask = (visible.unsqueeze(1) < 0.5)
    positions = torch.arange(total, dtype=torch.long)
    if not gmask:
        positions[context_length - 1:] = mask_position  # sop and every generated token
    return mask, positions.unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# strategies


@dataclass
class Sampling:
    """BaseStrategy: temperature, top-k, top-p (fp16 cumulative sums), multinomial; greedy when
    ``greedy``."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    end_tokens: tuple[int, ...] = END_TOKENS
    generator: torch.Generator | None = None
    is_done: bool = False

    def forward(self, logits: torch.Tensor, tokens: torch.Tensor,
                cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        logits = logits.reshape(-1, logits.size(-1))  # (1, V) in the model's dtype
        if self.greedy:
            pred = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / self.temperature
            if self.top_k > 0:
                kth = torch.topk(logits, self.top_k)[0][..., -1, None]
                logits = logits.masked_fill(logits < kth, FILTER)
            if self.top_p > 0.0:
                row = logits.view(-1)
                sorted_logits, sorted_indices = torch.sort(row, descending=True)
                cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
                remove = cumulative > self.top_p
                remove[1:] = remove[:-1].clone()
                remove[0] = False
                row = row.clone()
                row[sorted_indices[remove]] = FILTER
                logits = row.view(1, -1)
            probs = F.softmax(logits.float(), dim=-1)
            pred = torch.multinomial(probs, num_samples=1, generator=self.generator)
        if int(pred[0, 0]) in self.end_tokens:
            self.is_done = True
        return torch.cat((tokens, pred.view((*tokens.shape[:-1], 1))), dim=-1), cache

    def finalize(self, tokens: torch.Tensor) -> tuple[list[list[int]], list[float]]:
        return [tokens.view(-1).tolist()], []


@dataclass
class BeamSearch:
    """BeamSearchStrategy (batch 1): OpenNMT length penalty over the full sequence, n-gram bans
    recorded during generation only, min_gen_length, 3*beams candidates, finalize ranking.

    ``style="transformers"`` scores the same search the way transformers does instead: length
    penalty = new tokens ** length_penalty, n-grams banned over the whole sequence. ``reorder``
    picks cache rows for the kept beams (default: model/glm130b.py's list of (k, v))."""

    num_beams: int
    length_penalty: float = 1.0
    end_tokens: tuple[int, ...] = END_TOKENS
    no_repeat_ngram_size: int = 0
    min_gen_length: int = 0
    deterministic: bool = True
    consider_end: bool = True
    generator: torch.Generator | None = None
    style: str = "glm130b"  # | "transformers"
    reorder: Callable[[Any, torch.Tensor], Any] | None = None
    prompt_length: int = -1
    end_beams: list[list[int]] = field(default_factory=list)
    end_scores: list[float] = field(default_factory=list)
    beam_scores: torch.Tensor | None = None  # (beams,) float32
    bans: list[dict[tuple[int, ...], tuple[int, ...]]] = field(default_factory=lambda: [{}])
    generated: int = 0
    is_done: bool = False

    def _penalty(self, length: int) -> float:
        if self.style == "transformers":
            return float(max(length - self.prompt_length, 1)) ** self.length_penalty
        return ((5.0 + length) / 6) ** self.length_penalty  # OpenNMT, over the full sequence

    def _add_end_beam(self, score: float, beam: list[int]) -> None:
        score = score / self._penalty(len(beam))
        i = len(self.end_beams)
        while i > 0 and not score < self.end_scores[i - 1]:
            i -= 1
        self.end_beams.insert(i, beam)
        self.end_scores.insert(i, score)
        del self.end_beams[self.num_beams:], self.end_scores[self.num_beams:]

    def forward(self, logits: torch.Tensor, tokens: torch.Tensor,
                cache: Any) -> tuple[torch.Tensor, Any]:
        logits = logits.reshape(tokens.size(0), -1).to(torch.float32, copy=True)  # (beams, V)
        tokens = tokens.reshape(tokens.size(0), -1)  # (beams, L)
        n_beams, vocab = logits.shape
        seq_len = tokens.size(-1)
        if self.prompt_length < 0:
            self.prompt_length = seq_len
        if self.min_gen_length > self.generated:
            logits[:, list(self.end_tokens)] = FILTER
        n = self.no_repeat_ngram_size
        if n > 0 and self.style == "transformers":
            for i in range(n_beams):
                logits[i, gen.banned_ngram_tokens(tokens[i].tolist(), n)] = FILTER
        elif n > 0 and seq_len > n:
            for i in range(n_beams):
                prefix = tuple(tokens[i, -(n - 1):].tolist()) if n > 1 else ()
                for banned in self.bans[i].get(prefix, ()):
                    logits[i, banned] = FILTER
        scores = F.log_softmax(logits, dim=-1)
        if self.beam_scores is not None:
            scores = scores + self.beam_scores[:, None].expand_as(scores)
        scores = scores.view(1, n_beams * vocab)
        probs = F.softmax(scores, dim=-1)
        if n_beams < self.num_beams:  # the first step: only beam 0
            probs = probs[..., :vocab]
        k = (max(1, len(self.end_tokens)) + 1) * self.num_beams
        if self.deterministic:
            picked = torch.topk(probs, k=k).indices
        else:
            picked = torch.multinomial(probs, num_samples=k, generator=self.generator)
        picked_scores = scores[torch.arange(1).unsqueeze(1), picked]
        picked_scores, order = torch.sort(picked_scores, descending=True, dim=1)
        picked = picked[torch.arange(1).unsqueeze(1), order]
        parents = torch.div(picked, vocab, rounding_mode="trunc")[0].tolist()
        next_tokens = (picked % vocab)[0].tolist()
        kept: list[list[int]] = []
        kept_parents: list[int] = []
        kept_scores: list[float] = []
        kept_bans: list[dict[tuple[int, ...], tuple[int, ...]]] = []
        for parent, token, score in zip(parents, next_tokens, picked_scores[0].tolist(),
                                        strict=True):
            beam = [*tokens[parent].tolist(), token]
            if not self.is_done and token in self.end_tokens:
                self._add_end_beam(score, beam)
            elif len(kept) < self.num_beams:
                kept.append(beam)
                kept_parents.append(parent)
                kept_scores.append(score)
                if n > 0:
                    bans = dict(self.bans[parent])
                    prefix = tuple(tokens[parent, -(n - 1):].tolist()) if n > 1 else ()
                    bans[prefix] = (*bans.get(prefix, ()), token)
                    kept_bans.append(bans)
            else:
                break
        self.bans = kept_bans if n > 0 else [{} for _ in kept]
        index = torch.tensor(kept_parents, dtype=torch.long)
        if self.reorder is not None:
            cache = self.reorder(cache, index)
        else:
            cache = [(k.index_select(1, index.to(k.device)),
                      v.index_select(1, index.to(v.device))) for k, v in cache]
        self.beam_scores = torch.tensor(kept_scores, dtype=torch.float32)
        self.generated += 1
        if (len(self.end_beams) == self.num_beams and self.end_scores[-1] >=
                float(self.beam_scores.max()) / self._penalty(seq_len + 1)):
            self.is_done = True
        return torch.tensor(kept, dtype=torch.long), cache

    def finalize(self, tokens: torch.Tensor) -> tuple[list[list[int]], list[float]]:
        if self.consider_end and not self.is_done and self.beam_scores is not None:
            for i, beam in enumerate(tokens.reshape(tokens.size(0), -1).tolist()):
                self._add_end_beam(float(self.beam_scores[i]), beam)
        return list(self.end_beams), list(self.end_scores)


Strategy = Sampling | BeamSearch


# ---------------------------------------------------------------------------------------------
# the decode loop and the blank loop


def filling_sequence(model: GLM130B, input_ids: list[int], mask_position: int, gmask: bool,
                     max_gen_length: int, strategy: Strategy, *,
                     should_stop: Callable[[], bool] = lambda: False,
                     on_step: Callable[[list[int]], None] | None = None,
                     timing: gen.StepTiming | None = None
                     ) -> tuple[list[list[int]], list[float]]:
    """batch_filling_sequence for one sequence: prefill the context (ending in sop), then one
    token per step with the KV cache. Returns the strategy's finalized beams (full sequences)."""
    import time

    device = model.transformer.word_embeddings.weight.device
    context = len(input_ids)
    total = context + max(max_gen_length, 0)
    mask, positions = masks_and_positions(context, total, mask_position, gmask)
    mask, positions = mask.to(device), positions.to(device)
    tokens = torch.tensor([input_ids], dtype=torch.long)
    cache: KVCache | None = None
    counter, index = context - 1, 0
    while counter < total - 1:
        if should_stop():
            raise gen.Cancelled
        started = time.perf_counter()
        rows = tokens.size(0)
        logits, cache, _ = model(tokens[:, index:].to(device),
                                 positions[..., index:counter + 1].expand(rows, -1),
                                 mask[..., index:counter + 1, :counter + 1], cache)
        logits = logits[:, -1]  # (rows, V): the sop position, then the newest token
        if timing is not None:
            elapsed = time.perf_counter() - started
            if index == 0:
                timing.prefill_s, timing.prefill_tokens = elapsed, context
            else:
                timing.step_s.append(elapsed)
        counter += 1
        index = counter
        tokens, cache = strategy.forward(logits.cpu(), tokens, cache)
        if on_step is not None:
            on_step(tokens[0].tolist()[context:])
        if strategy.is_done:
            break
    return strategy.finalize(tokens)


@dataclass
class BlankRound:
    input_ids: list[int]  # sequence + sop
    raw_output: list[list[int]]  # the strategy's beams, full sequences
    blanks: list[list[int]]  # per beam
    scores: list[float]


def fill_blanks(model: GLM130B, seq: list[int], mask_id: int, use_gmask: bool,
                out_seq_length: int, make_strategy: Callable[[], Strategy], *,
                should_stop: Callable[[], bool] = lambda: False,
                on_round: Callable[[int, list[int]], Callable[[list[int]], None]] | None = None,
                timing: gen.StepTiming | None = None
                ) -> tuple[list[list[int]], list[BlankRound]]:
    """fill_blanks L94-154: blanks of ``mask_id`` left to right; beam 0 continues. Returns the
    answers (per beam, trailing eos dropped) and the rounds."""
    outputs = [seq]
    rounds: list[BlankRound] = []
    while mask_id in outputs[0]:
        current = outputs[0]
        mask_position = current.index(mask_id)
        input_ids = [*current, SOP]
        strategy = make_strategy()
        on_step = on_round(len(rounds), current) if on_round is not None else None
        beams, scores = filling_sequence(model, input_ids, mask_position, use_gmask,
                                         out_seq_length - len(input_ids), strategy,
                                         should_stop=should_stop, on_step=on_step,
                                         timing=timing)
        outputs, blanks = [], []
        for output in beams:
            unfinished = output.index(-1) if -1 in output else len(output)
            if output[unfinished - 1] in strategy.end_tokens:
                unfinished -= 1
            bog = output.index(SOP)
            blanks.append(output[bog + 1:unfinished])
            outputs.append(output[:mask_position] + output[bog + 1:unfinished]
                           + output[mask_position + 1:bog])
        rounds.append(BlankRound(input_ids, beams, blanks, scores))
    answers = [o[:-1] if o and o[-1] == EOS else o for o in outputs]
    return answers, rounds
