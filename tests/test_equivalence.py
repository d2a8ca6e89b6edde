"""The correctness anchor: our decode loop is token-identical to transformers' generate on the
embedded model, for greedy and beam search with the same settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from glmchat.model import generate as gen

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three uses of a paperclip.",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(default_weights_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(default_weights_dir, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(default_weights_dir)


def _prompt(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, return_dict=False)
    return torch.tensor([list(ids)])


def _settings(model: Any, **kw: Any) -> gen.DecodeSettings:
    eos = model.generation_config.eos_token_id
    return gen.DecodeSettings(eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]), **kw)


def _hf(model: Any, prompt: torch.Tensor, **kw: Any) -> Any:
    return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                          do_sample=False, return_dict_in_generate=True, output_scores=True,
                          **kw)


@pytest.mark.parametrize("text", PROMPTS)
@pytest.mark.parametrize("extra", [{}, {"no_repeat_ngram_size": 3, "min_new_tokens": 12}])
def test_greedy_matches_transformers(model_and_tokenizer: tuple[Any, Any], text: str,
                                     extra: dict[str, Any]) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = _prompt(tokenizer, text)
    with torch.inference_mode():
        ours = list(gen.decode_n(model, prompt, _settings(model, max_new_tokens=40, **extra)))
        theirs = _hf(model, prompt, max_new_tokens=40, num_beams=1, **extra)
    assert ours == theirs.sequences[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize(("text", "beam_kw"), [
    (PROMPTS[0], {"num_beams": 4, "length_penalty": 1.0}),
    (PROMPTS[1], {"num_beams": 3, "length_penalty": 0.6, "no_repeat_ngram_size": 2}),
    (PROMPTS[2], {"num_beams": 4, "length_penalty": 2.0, "early_stopping": True,
                  "min_new_tokens": 5}),
])
def test_beam_search_matches_transformers(model_and_tokenizer: tuple[Any, Any], text: str,
                                          beam_kw: dict[str, Any]) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = _prompt(tokenizer, text)
    n_return = 2
    with torch.inference_mode():
        ours = gen.beam_search(model, prompt, _settings(model, max_new_tokens=30, **beam_kw))
        theirs = _hf(model, prompt, max_new_tokens=30, num_return_sequences=n_return,
                     **beam_kw)
    pad = model.generation_config.pad_token_id
    width = theirs.sequences.shape[1] - prompt.shape[1]
    for rank in range(n_return):
        expected = theirs.sequences[rank, prompt.shape[1]:].tolist()
        got = ours[rank].token_ids + [pad] * (width - len(ours[rank].token_ids))
        assert got == expected, f"beam {rank} differs"
        assert ours[rank].score == pytest.approx(float(theirs.sequences_scores[rank]), abs=1e-4)


def test_sampling_is_reproducible_with_a_seed(model_and_tokenizer: tuple[Any, Any]) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = _prompt(tokenizer, "Tell me a story about a fox.")
    settings = _settings(model, max_new_tokens=24, do_sample=True, temperature=1.0, top_k=50,
                         top_p=0.95)

    def run(seed: int) -> list[int]:
        with torch.inference_mode():
            return list(gen.decode_n(model, prompt, settings,
                                     generator=torch.Generator().manual_seed(seed)))

    first = run(1234)
    assert run(1234) == first
    assert any(run(seed) != first for seed in (1, 2, 3))


def test_banned_ngrams_match_transformers_rule() -> None:
    # After "a b c a b", a 3-gram ban forbids "c" (it would repeat "a b c").
    assert gen.banned_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert gen.banned_ngram_tokens([1, 2, 3, 1, 2], 2) == [3]  # "2 3" seen; last token is 2
    assert gen.banned_ngram_tokens([1, 2], 3) == []
