"""Infill for any causal LM: candidates from the prefix, re-ranked by how well they fit the suffix.

A causal model only reads left to right, so it proposes fills from the prefix alone (beam search
or samples, bounded in length, cut at a span or sentence boundary), and then the model judges
each proposal with the suffix in view: ``log p(candidate + suffix | prefix)``, computed for all
candidates in one batched forward after one prefill of the shared prefix.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from glmchat.infill import MASK, SMASK

from . import generate as gen
from .textstream import stop_index

MAX_CANDIDATES = 12  # rows of the scoring batch
FIRST_TOKEN_POOL = 32  # first tokens the suffix look-ahead chooses from
LOOKAHEAD_TOKENS = 12  # suffix tokens the look-ahead reads
SCORE_SUFFIX_CHARS = 256  # about 64 tokens: the suffix beyond this barely depends on the fill
SPAN_END = re.compile(r"[.,;:!?\n]")
SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)|\n")
PARAGRAPH_END = re.compile(r"\n\s*\n")
WORD = re.compile(r"\w")

Cut = Callable[[str], "int | None"]


def boundary(kind: str, stops: Sequence[str], has_suffix: bool) -> Cut:
    """Where a proposal for a ``kind`` blank ends: the index to cut the generated text at, or
    None while it may go on. Leading whitespace never ends a proposal."""

    def cut(text: str) -> int | None:
        word = WORD.search(text)  # punctuation before any word does not end a proposal
        if word is None:
            return None
        start = word.start()
        found: list[int] = []
        if kind == MASK:
            match = SPAN_END.search(text, start)
            if match:
                found.append(match.start())
        elif kind == SMASK:
            match = SENTENCE_END.search(text, start)
            if match:
                found.append(match.end() if match.group() != "\n" else match.start())
        elif has_suffix:  # a [gMASK] with text after it: one paragraph
            match = PARAGRAPH_END.search(text, start)
            if match:
                found.append(match.start())
        stop = stop_index(text, stops) if stops else None
        if stop is not None:
            found.append(stop)
        return min(found) if found else None

    return cut


def continuation_ids(encode: Callable[[str], list[int]], context: str, context_ids: list[int],
                     piece: str) -> list[int]:
    """Token ids of ``piece`` following ``context``, as the tokenizer splits the whole text;
    ``piece`` alone when the join merges across the boundary."""
    full = encode(context + piece)
    if full[:len(context_ids)] == context_ids:
        return full[len(context_ids):]
    return encode(piece)


@dataclass
class Prefix:
    """The text before a blank, run through the model once: every later pass for this blank
    (first-token look-ahead, proposals, scoring) starts from a copy of its KV cache, so an
    offloaded model streams its weights over the prefix once, not once per pass."""

    ids: list[int]
    cache: DynamicCache
    logits: torch.Tensor  # (1, V) float32: the next-token logits after ``ids``

    def cache_for(self, batch: int) -> DynamicCache:
        cache = copy.deepcopy(self.cache)
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache


def prefill_prefix(model: PreTrainedModel, ids: list[int]) -> Prefix:
    cache = DynamicCache(config=model.config)
    logits = gen.prefill(model, torch.tensor([ids], dtype=torch.long), cache)  # (1, V)
    return Prefix(list(ids), cache, logits)


def score_continuations(model: PreTrainedModel, prefix: Prefix, rests: Sequence[list[int]],
                        pad_id: int) -> list[float]:
    """``log p(rest | prefix)`` in nats for each rest: one batched forward over all rests
    (right-padded) after the shared prefix."""
    batch, width = len(rests), max(len(r) for r in rests)
    device = gen.execution_device(model)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)  # (B, R)
    valid = torch.zeros((batch, width), dtype=torch.bool)  # (B, R)
    for row, rest in enumerate(rests):
        ids[row, :len(rest)] = torch.tensor(rest, dtype=torch.long)
        valid[row, :len(rest)] = True
    past = len(prefix.ids)
    attention_mask = torch.cat([torch.ones((batch, past), dtype=torch.long),
                                valid.long()], dim=1).to(device)  # (B, P + R)
    positions = torch.arange(past, past + width, device=device).unsqueeze(0).expand(batch, -1)
    out = model(input_ids=ids.to(device), attention_mask=attention_mask, position_ids=positions,
                past_key_values=prefix.cache_for(batch), use_cache=True, return_dict=True)
    scores = []
    for row in range(batch):  # row by row: (R, V) float32 at a time, not (B, R, V)
        logits = torch.cat([prefix.logits, out.logits[row, :-1].to("cpu", torch.float32)])
        log_probs = torch.log_softmax(logits, dim=-1)  # (R, V)
        picked = log_probs.gather(-1, ids[row, :, None]).squeeze(-1)  # (R,)
        scores.append(float(picked[valid[row]].sum()))
    return scores


def first_tokens(model: PreTrainedModel, prefix: Prefix, suffix_ids: list[int],
                 count: int, banned: Sequence[int], allowed: torch.Tensor | None,
                 pad_id: int) -> list[int]:
    """The ``count`` first tokens to grow proposals from, all different so the proposals are
    (beam search's beams mostly share one first word). With a suffix, the most likely
    ``FIRST_TOKEN_POOL`` first tokens are re-ranked by ``log p(token + suffix start)``: with no
    prefix to go on ('[MASK] is the capital of France.') the suffix is all there is."""
    logits = prefix.logits.clone()  # (1, V)
    if banned:
        logits[:, list(banned)] = gen.NEG_INF
    if allowed is not None:
        logits = logits.masked_fill(~allowed[:logits.shape[-1]], gen.NEG_INF)
    pool = torch.topk(logits[0], FIRST_TOKEN_POOL if suffix_ids else count).indices.tolist()
    if not suffix_ids:
        return [int(t) for t in pool[:count]]
    rests = [[int(t), *suffix_ids[:LOOKAHEAD_TOKENS]] for t in pool]
    scores = score_continuations(model, prefix, rests, pad_id)
    order = sorted(range(len(pool)), key=lambda i: -scores[i])
    return [int(pool[i]) for i in order[:count]]


def grow(model: PreTrainedModel, prefix: Prefix, first: list[int],
         settings: gen.DecodeSettings, decode: Callable[[Sequence[int]], str], cut: Cut,
         should_stop: Callable[[], bool], on_step: Callable[[int], None]) -> list[Proposal]:
    """Greedy continuations of each first token, batched, each to its boundary, EOS or the
    budget: one proposal per first token."""
    count = len(first)
    ids = [[t] for t in first]
    finish = ["" for _ in first]
    cache = prefix.cache_for(count)
    history = torch.tensor([[*prefix.ids, t] for t in first], dtype=torch.long)  # (K, P + 1)
    for step in range(settings.max_new_tokens):
        for k in range(count):
            if finish[k]:
                continue
            if ids[k][-1] in settings.eos_token_ids:
                finish[k] = "eos"
            elif cut(decode(ids[k])) is not None:
                finish[k] = "stop"
            elif step + 1 == settings.max_new_tokens:
                finish[k] = "length"
        on_step(step + 1)
        if all(finish):
            break
        if should_stop():
            raise gen.Cancelled
        logits = gen.decode_one(model, history[:, -1], cache, history.shape[1] - 1)  # (K, V)
        chosen = gen.process_scores(logits, history, step + 1, settings).argmax(dim=-1)  # (K,)
        history = torch.cat([history, chosen[:, None]], dim=1)
        for k in range(count):
            if not finish[k]:
                ids[k].append(int(chosen[k]))
    out = []
    for row, how in zip(ids, finish, strict=True):
        text = decode(row)
        at = cut(text)
        out.append(Proposal(text if at is None else text[:at], row, how))
    return out


@dataclass
class Proposal:
    text: str  # generated text, cut at the boundary (leading space kept)
    token_ids: list[int]
    finish: str  # "stop" (boundary), "eos" or "length"
    score: float | None = None  # beam search's score, where it made the proposal


def word_prefixes(text: str) -> list[str]:
    """' the city of Paris' → [' the', ' the city', ' the city of'] (the whole text left out)."""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return [text[:end] for end in ends[:-1]]


def candidate_texts(kind: str, proposals: Sequence[Proposal], has_suffix: bool) -> list[str]:
    """Distinct non-empty fills to score, best proposal first. For a [MASK] with text after it,
    every word-prefix of a proposal is a candidate too: the suffix decides where a span ends
    ('[MASK] is the capital of France' wants 'Paris', not 'Paris is a city')."""
    seen: dict[str, None] = {}
    for proposal in proposals:
        text = proposal.text.rstrip()
        if text.strip():
            seen.setdefault(text)
    if kind == MASK and has_suffix:
        shorter = [word_prefixes(p.text.rstrip()) for p in proposals]
        for depth in range(max((len(s) for s in shorter), default=0)):
            for prefixes in shorter:
                if depth < len(prefixes):
                    seen.setdefault(prefixes[depth])
    return list(seen)[:MAX_CANDIDATES]


def scoring_suffix(suffix: str, kind: str) -> str:
    """The part of the suffix a fill is judged against: up to the next blank (a causal model
    cannot read a mask), so later blanks stay unknown to it."""
    cut = suffix.find(kind)
    return suffix if cut < 0 else suffix[:cut]

