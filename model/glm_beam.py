"""GLM-130B's beam search scorer for any transformers model (``beam_scorer = "glm130b"``).

The same search as GLM-130B's BeamSearchStrategy (model/glm_generate.py ``BeamSearch``:
OpenNMT length penalty over the full sequence, n-gram bans on generated tokens only,
min_gen_length, 3*beams candidates, finished and unfinished beams ranked as ``finalize`` does),
driven over a transformers model with its DynamicCache. Deterministic (top-k candidates).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import torch
from transformers import DynamicCache

from . import generate as gen
from . import glm_generate as glm


def _reorder(cache: Any, index: torch.Tensor) -> Any:
    cache.reorder_cache(cast(torch.LongTensor, index))
    return cache


def beam_search(model: Any, prompt_ids: torch.Tensor, settings: gen.DecodeSettings, *,
                hits_stop: Callable[[list[int]], bool] = lambda ids: False,
                should_stop: Callable[[], bool] = lambda: False,
                on_step: Callable[[list[int]], None] = lambda ids: None,
                timing: gen.StepTiming | None = None) -> list[gen.Beam]:
    """Like ``generate.beam_search`` (same arguments, best first), scored as GLM-130B does.
    Stop strings end nothing early here; the engine cuts the text at them."""
    timing = timing if timing is not None else gen.StepTiming()
    strategy = glm.BeamSearch(settings.num_beams, length_penalty=settings.length_penalty,
                              end_tokens=tuple(settings.eos_token_ids),
                              no_repeat_ngram_size=settings.no_repeat_ngram_size,
                              min_gen_length=settings.min_new_tokens, reorder=_reorder)
    prompt_len = prompt_ids.shape[1]
    cache = DynamicCache(config=model.config)
    started = time.perf_counter()
    logits = gen.prefill(model, prompt_ids, cache)  # (1, V)
    timing.prefill_s, timing.prefill_tokens = time.perf_counter() - started, prompt_len
    tokens = prompt_ids.cpu()
    past = prompt_len
    for step in range(settings.max_new_tokens):
        tokens, cache = strategy.forward(logits, tokens, cache)
        on_step(tokens[0, prompt_len:].tolist())
        if strategy.is_done or step == settings.max_new_tokens - 1:
            break
        if should_stop():
            raise gen.Cancelled
        started = time.perf_counter()
        logits = gen.decode_one(model, tokens[:, -1], cache, past)
        timing.step_s.append(time.perf_counter() - started)
        past += 1
    beams, scores = strategy.finalize(tokens)
    eos = set(settings.eos_token_ids)
    return [gen.Beam(b[prompt_len:], float(s), bool(b) and b[-1] in eos)
            for b, s in zip(beams, scores, strict=True)]
