"""GLM-130B's beam scorer on a transformers model (the embedded SmolLM2): the cached search
equals the same strategy run without a cache (every step recomputes the full sequences), and
the engine uses it when ``beam_scorer = "glm130b"``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from glmchat.model import generate as gen
from glmchat.model import glm_beam
from glmchat.model import glm_generate as glm

from glmchat.params import GenerationParams
from glmchat.protocol import Generate, ModelSpec


@pytest.fixture(scope="module")
def engine() -> Any:
    from glmchat.model.engine import Engine

    loaded = Engine(lambda event: None)
    loaded.load(ModelSpec())
    return loaded


def _settings(model: Any, **kw: Any) -> gen.DecodeSettings:
    eos = model.generation_config.eos_token_id
    return gen.DecodeSettings(eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]), **kw)


def _uncached(model: Any, prompt: torch.Tensor, settings: gen.DecodeSettings) -> list[list[int]]:
    strategy = glm.BeamSearch(settings.num_beams, length_penalty=settings.length_penalty,
                              end_tokens=settings.eos_token_ids,
                              no_repeat_ngram_size=settings.no_repeat_ngram_size,
                              reorder=lambda cache, index: cache)
    tokens = prompt
    with torch.inference_mode():
        for _ in range(settings.max_new_tokens):
            logits = model(input_ids=tokens).logits[:, -1].float()
            tokens, _ = strategy.forward(logits, tokens, None)
            if strategy.is_done:
                break
    beams, _ = strategy.finalize(tokens)
    return [b[prompt.shape[1]:] for b in beams]


def test_cached_glm_scored_beam_search_equals_the_uncached_one(engine: Any) -> None:
    model = engine.loaded.model
    prompt = torch.tensor([[504, 3575, 282, 4649, 314]])  # a few ordinary tokens
    settings = _settings(model, max_new_tokens=4, num_beams=3, length_penalty=1.0,
                         no_repeat_ngram_size=2)
    with torch.inference_mode():
        found = glm_beam.beam_search(model, prompt, settings)
    assert [b.token_ids for b in found] == _uncached(model, prompt, settings)
    scores = [b.score for b in found]
    assert scores == sorted(scores, reverse=True) and len(found) == 3


def test_engine_picks_the_scorer_from_the_setting(engine: Any) -> None:
    params = GenerationParams(strategy="beam", num_beams=3, num_return_sequences=3,
                              max_new_tokens=3, beam_scorer="glm130b")
    result = engine.generate(Generate(id="g", prompt="Paris is", raw=True, params=params),
                             lambda: False)
    prompt = torch.tensor([result.prompt_token_ids])
    settings = _settings(engine.loaded.model, max_new_tokens=3, num_beams=3)
    with torch.inference_mode():
        direct = glm_beam.beam_search(engine.loaded.model, prompt, settings)
    assert [b.token_ids for b in result.beams] == [b.token_ids for b in direct]
    assert [b.score for b in result.beams] == pytest.approx([b.score for b in direct])
    # GLM-130B's scores are penalised by the full length (prompt + new tokens), not new tokens
    assert GenerationParams().beam_scorer == "auto"
