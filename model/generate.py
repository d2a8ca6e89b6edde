"""The decode path, top to bottom: logits → probs → sample, prefill, decode_one, decode_n,
beam_search.

Our own loop over the model's forward with its KV cache, so the caller can stream every token,
cancel between steps and time each step. Greedy and beam search are token-identical to
transformers' ``generate`` with the same settings (tests/test_equivalence.py checks it): the
forward is called the way ``generate`` calls it (all-ones attention mask, explicit positions,
logits for the last position only) and beam search follows its vectorised algorithm.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

NEG_INF = float("-inf")


class Cancelled(Exception):
    """Raised inside a decode loop when the caller's cancel check returns True."""


@dataclass
class DecodeSettings:
    """What the loops need, already resolved against the model (eos ids) and validated."""

    max_new_tokens: int
    min_new_tokens: int = 0
    eos_token_ids: tuple[int, ...] = ()
    no_repeat_ngram_size: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    do_sample: bool = False
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False


@dataclass
class StepTiming:
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    step_s: list[float] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# logits processing: the same processors, in the same order, as transformers' generate


def banned_ngram_tokens(sequence: list[int], ngram_size: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``sequence``."""
    if ngram_size <= 0 or len(sequence) + 1 < ngram_size:
        return []
    prefix = tuple(sequence[len(sequence) + 1 - ngram_size:])
    banned = []
    for start in range(len(sequence) - ngram_size + 1):
        if tuple(sequence[start:start + ngram_size - 1]) == prefix:
            banned.append(sequence[start + ngram_size - 1])
    return banned


def process_scores(scores: torch.Tensor, sequences: torch.Tensor, new_tokens: int,
                   settings: DecodeSettings) -> torch.Tensor:
    """no_repeat_ngram, then min_new_tokens; ``scores`` (B, V), ``sequences`` (B, T)."""
    if settings.no_repeat_ngram_size > 0:
        for row, seq in enumerate(sequences.tolist()):
            banned = banned_ngram_tokens(seq, settings.no_repeat_ngram_size)
            if banned:
                scores[row, banned] = NEG_INF
    if new_tokens < settings.min_new_tokens and settings.eos_token_ids:
        scores[:, list(settings.eos_token_ids)] = NEG_INF
    return scores


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int,
                    top_p: float) -> torch.Tensor:
    """Temperature, top-k, top-p (transformers' warper order); (B, V) → (B, V) probabilities."""
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1, None]  # (B, 1)
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # always keep the most likely token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, NEG_INF)
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, settings: DecodeSettings,
           generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits → (B,) next token ids."""
    if not settings.do_sample:
        return torch.argmax(logits, dim=-1)
    probs = logits_to_probs(logits, settings.temperature, settings.top_k, settings.top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------------
# forward passes


def execution_device(model: PreTrainedModel) -> torch.device:
    """Where inputs go: the first GPU in the device map, else the CPU."""
    device_map = getattr(model, "hf_device_map", None) or {}
    for device in device_map.values():
        if str(device) not in ("cpu", "disk", "meta"):
            return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cuda":
        return param.device
    return torch.device("cpu")


def model_forward(model: PreTrainedModel, input_ids: torch.Tensor, cache: DynamicCache,
                  past_length: int) -> torch.Tensor:
    """Run ``input_ids`` (B, T) after ``past_length`` cached tokens; logits of the last position
    (B, V) in float32, called as transformers' generate calls it."""
    batch, length = input_ids.shape
    device = execution_device(model)
    input_ids = input_ids.to(device)
    attention_mask = torch.ones((batch, past_length + length), dtype=torch.long, device=device)
    position_ids = torch.arange(past_length, past_length + length, device=device)
    position_ids = position_ids.unsqueeze(0).expand(batch, -1)  # (B, T)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True)
    # Scores live on the CPU: sampling is then reproducible whatever device computed them.
    return out.logits[:, -1, :].to(device="cpu", dtype=torch.float32, copy=True)  # (B, V)


def prefill(model: PreTrainedModel, prompt_ids: torch.Tensor, cache: DynamicCache,
            past_length: int = 0) -> torch.Tensor:
    """Feed the whole prompt (B, T); returns next-token logits (B, V)."""
    return model_forward(model, prompt_ids, cache, past_length)


def decode_one(model: PreTrainedModel, token_ids: torch.Tensor, cache: DynamicCache,
               past_length: int) -> torch.Tensor:
    """Feed one token per row (B,) → next-token logits (B, V)."""
    return model_forward(model, token_ids[:, None], cache, past_length)


def decode_n(model: PreTrainedModel, prompt_ids: torch.Tensor, settings: DecodeSettings, *,
             cache: DynamicCache | None = None, past_length: int = 0,
             generator: torch.Generator | None = None,
             should_stop: Callable[[], bool] = lambda: False,
             timing: StepTiming | None = None) -> Generator[int, None, None]:
    """Greedy or sampled decoding of one sequence; yields token ids as they are chosen.

    ``prompt_ids`` (1, T) are the tokens not yet in ``cache``; ``past_length`` tokens already are.
    Stops after an EOS token (which is yielded) or ``max_new_tokens``. The caller stops early by
    closing the generator; ``should_stop`` raises Cancelled between steps.
    """
    cache = cache if cache is not None else DynamicCache(config=model.config)
    timing = timing if timing is not None else StepTiming()
    sequence = prompt_ids  # (1, T) — for no_repeat_ngram, which counts the prompt too
    t0 = time.perf_counter()
    logits = prefill(model, prompt_ids, cache, past_length)
    timing.prefill_s = time.perf_counter() - t0
    timing.prefill_tokens = prompt_ids.shape[1]
    past_length += prompt_ids.shape[1]
    for step in range(settings.max_new_tokens):
        scores = process_scores(logits, sequence, step, settings)
        next_token = sample(scores, settings, generator)  # (1,)
        sequence = torch.cat([sequence, next_token[:, None]], dim=1)
        token_id = int(next_token[0])
        yield token_id
        if token_id in settings.eos_token_ids or step + 1 == settings.max_new_tokens:
            return
        if should_stop():
            raise Cancelled
        t0 = time.perf_counter()
        logits = decode_one(model, next_token, cache, past_length)
        past_length += 1
        timing.step_s.append(time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# beam search (batch of one prompt; transformers' vectorised algorithm)


@dataclass
class Beam:
    token_ids: list[int]  # generated tokens only
    score: float  # length-penalised sum of log-probs
    finished: bool


def _gather(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """tensor (B, K, ...) gathered along dim 1 by indices (B, J) → (B, J, ...)."""
    while indices.dim() < tensor.dim():
        indices = indices.unsqueeze(-1)
    return torch.take_along_dim(tensor, indices, dim=1)


def beam_search(model: PreTrainedModel, prompt_ids: torch.Tensor, settings: DecodeSettings, *,
                hits_stop: Callable[[list[int]], bool] = lambda ids: False,
                should_stop: Callable[[], bool] = lambda: False,
                on_step: Callable[[list[int]], None] = lambda ids: None,
                timing: StepTiming | None = None) -> list[Beam]:
    """Beam search over ``prompt_ids`` (1, T). Returns the ``num_beams`` best hypotheses, best
    first. ``on_step`` receives the current best running beam's tokens after every step (to
    stream it, provisionally); ``hits_stop`` marks a candidate finished (stop strings)."""
    num_beams = settings.num_beams
    timing = timing if timing is not None else StepTiming()
    prompt_len = prompt_ids.shape[1]
    max_length = prompt_len + settings.max_new_tokens
    device = prompt_ids.device
    beams_to_keep = max(2, 1 + len(settings.eos_token_ids)) * num_beams
    top_num_beam_mask = torch.zeros(beams_to_keep, dtype=torch.bool, device=device)
    top_num_beam_mask[:num_beams] = True
    eos = torch.tensor(settings.eos_token_ids or (-1,), device=device)

    fill = settings.eos_token_ids[0] if settings.eos_token_ids else 0
    running = torch.full((1, num_beams, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :prompt_len] = prompt_ids
    finished = running.clone()
    running_scores = torch.zeros((1, num_beams), device=device)  # (1, K)
    running_scores[:, 1:] = -1e9  # only beam 0 is live at first: no duplicate continuations
    finished_scores = torch.full((1, num_beams), -1e9, device=device)
    is_finished = torch.zeros((1, num_beams), dtype=torch.bool, device=device)
    finished_lengths = torch.zeros((1, num_beams), dtype=torch.long, device=device)
    improvable = torch.ones((1, 1), dtype=torch.bool, device=device)

    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    logits = prefill(model, prompt_ids.expand(num_beams, -1).contiguous(), cache)  # (K, V)
    timing.prefill_s = time.perf_counter() - t0
    timing.prefill_tokens = prompt_len
    cur_len = prompt_len
    while True:
        if cur_len > prompt_len:
            if should_stop():
                raise Cancelled
            t0 = time.perf_counter()
            logits = decode_one(model, running[0, :, cur_len - 1], cache, cur_len - 1)
            timing.step_s.append(time.perf_counter() - t0)
        flat_running = running[0, :, :cur_len]  # (K, cur_len)
        log_probs = nn.functional.log_softmax(logits, dim=-1)
        log_probs = process_scores(log_probs, flat_running, cur_len - prompt_len, settings)
        vocab = log_probs.shape[-1]
        accumulated = (log_probs[None] + running_scores[:, :, None]).reshape(1, -1)  # (1, K*V)

        # the 2K best continuations over all beams
        topk_scores, topk_indices = torch.topk(accumulated, k=beams_to_keep)  # (1, 2K)
        topk_beam = topk_indices // vocab
        topk_sequences = _gather(running, topk_beam)  # (1, 2K, L)
        topk_sequences[:, :, cur_len] = topk_indices % vocab

        new_tokens = topk_sequences[0, :, prompt_len:cur_len + 1]  # (2K, n)
        hits = torch.isin(topk_sequences[0, :, cur_len], eos)
        if cur_len + 1 >= max_length:
            hits[:] = True
        else:
            extra = [hits_stop(row) for row in new_tokens.tolist()]
            hits |= torch.tensor(extra, dtype=torch.bool, device=device)
        hits = hits[None]  # (1, 2K)

        # the K best unfinished continuations carry on
        running_candidates = topk_scores + hits.float() * -1e9
        next_indices = torch.topk(running_candidates, k=num_beams)[1]
        running = _gather(topk_sequences, next_indices)
        running_scores = _gather(running_candidates, next_indices)
        beam_idx = _gather(topk_beam, next_indices)[0]

        # finished candidates among the top K join the finished set if they beat it
        just_finished = hits & top_num_beam_mask[None]
        penalised = topk_scores / ((cur_len + 1 - prompt_len) ** settings.length_penalty)
        full = torch.all(is_finished, dim=-1, keepdim=True) & settings.early_stopping
        penalised = penalised + full.float() * -1e9 + (~improvable).float() * -1e9
        penalised = penalised + (~just_finished).float() * -1e9
        merged_seqs = torch.cat([finished, topk_sequences], dim=1)
        merged_scores = torch.cat([finished_scores, penalised], dim=1)
        merged_done = torch.cat([is_finished, just_finished], dim=1)
        merged_lengths = torch.cat(
            [finished_lengths, torch.full_like(penalised, cur_len + 1, dtype=torch.long)], dim=1)
        keep = torch.topk(merged_scores, k=num_beams)[1]
        finished = _gather(merged_seqs, keep)
        finished_scores = _gather(merged_scores, keep)
        is_finished = _gather(merged_done, keep)
        finished_lengths = _gather(merged_lengths, keep)

        cache.reorder_cache(cast(torch.LongTensor, beam_idx))
        cur_len += 1
        on_step(running[0, 0, prompt_len:cur_len].tolist())

        best_possible = running_scores[:, :1] / ((cur_len - prompt_len) ** settings.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0],
                                     torch.tensor(-1e9, device=device))
        improvable = improvable & torch.any(best_possible > worst_finished, dim=-1, keepdim=True)
        all_full = bool(torch.all(is_finished)) and settings.early_stopping
        if not bool(improvable.any()) or all_full or bool(torch.all(hits)):
            break

    beams = []
    for k in range(num_beams):
        if not bool(is_finished[0, k]):
            continue
        end = int(finished_lengths[0, k])
        beams.append(Beam(finished[0, k, prompt_len:end].tolist(),
                          float(finished_scores[0, k]), True))
    return beams
