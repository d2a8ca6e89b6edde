"""Infill strategies without the real model: FIM format detection and prompts, proposal
boundaries and candidates, and the FIM path end to end on a tiny random-weight Llama whose
tokenizer has StarCoder's FIM tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from glmchat.model import fill, fim, infill, rerank

from glmchat.infill import GMASK, MASK, SMASK
from glmchat.params import GenerationParams
from glmchat.protocol import Event, Generate, ModelSpec, Token


class VocabOnly:
    def __init__(self, tokens: list[str]) -> None:
        self.vocab = {t: i for i, t in enumerate(["a", "b", *tokens])}

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


@pytest.mark.parametrize(("tokens", "name"), [
    (["<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>"], "starcoder"),
    (["<fim-prefix>", "<fim-suffix>", "<fim-middle>"], "santacoder"),
    (["▁<PRE>", "▁<SUF>", "▁<MID>", "▁<EOT>"], "codellama"),
    (["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"], "deepseek-coder"),
    (["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>"], "qwen2.5-coder"),
])
def test_fim_format_is_found_in_the_vocabulary(tokens: list[str], name: str) -> None:
    found = fim.detect_fim(VocabOnly(tokens))
    assert found is not None and found.name == name


def test_no_fim_without_all_three_tokens() -> None:
    assert fim.detect_fim(VocabOnly(["<fim_prefix>", "<fim_middle>"])) is None
    assert fim.detect_fim(VocabOnly(["<|im_start|>", "<file_sep>", "<repo_name>"])) is None


def test_mask_proposals_end_at_a_span_boundary() -> None:
    cut = rerank.boundary(MASK, [], has_suffix=True)
    assert cut(" Paris") is None
    assert cut(" Paris.") == 6
    assert cut(" Paris, France") == 6
    assert cut(", and") is None  # no word yet: punctuation does not end it
    assert cut("\nParis\n") == 6


def test_smask_proposals_end_after_a_sentence() -> None:
    cut = rerank.boundary(SMASK, [], has_suffix=True)
    assert cut(" It was 3.5 m") is None
    assert cut(" It was 3.5 m tall. Then") == len(" It was 3.5 m tall.")
    assert cut(" Done!\n") == len(" Done!")


def test_gmask_with_text_after_it_ends_at_a_paragraph_or_stop() -> None:
    cut = rerank.boundary(GMASK, ["END"], has_suffix=True)
    assert cut(" one. two.") is None
    assert cut(" one.\n\ntwo") == len(" one.")
    assert cut(" one END") == 5


def test_candidates_include_word_prefixes_only_for_mask_with_a_suffix() -> None:
    proposals = [rerank.Proposal(" Paris is a city", [], "stop"),
                 rerank.Proposal(" Rome", [], "stop"), rerank.Proposal("  ", [], "stop")]
    assert rerank.candidate_texts(MASK, proposals, has_suffix=True) == [
        " Paris is a city", " Rome", " Paris", " Paris is", " Paris is a"]
    assert rerank.candidate_texts(MASK, proposals, has_suffix=False) == [
        " Paris is a city", " Rome"]
    assert rerank.candidate_texts(SMASK, proposals, has_suffix=True) == [
        " Paris is a city", " Rome"]


def test_scoring_suffix_stops_at_the_next_blank() -> None:
    assert rerank.scoring_suffix(" and [MASK] too", MASK) == " and "
    assert rerank.scoring_suffix(" and [gMASK] too", MASK) == " and [gMASK] too"


# ---- FIM end to end on a tiny random Llama ----------------------------------------------------

FIM_TOKENS = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]


@pytest.fixture(scope="module")
def tiny_fim_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from glmchat.model import sources
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    default = sources.resolve("default")  # only its tokenizer: SmolLM2's, with no FIM tokens
    if default.needs_conversion:
        sources.convert_gguf(default, lambda done, total, what: None)
    tokenizer = AutoTokenizer.from_pretrained(default.weights_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": FIM_TOKENS})
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    target = tmp_path_factory.mktemp("tiny-fim")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def test_fim_tiny_random_model_uses_its_fim_format(tiny_fim_model: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from glmchat.model.engine import Engine

    events: list[Event] = []
    engine = Engine(events.append)
    loaded = engine.load(ModelSpec(path=str(tiny_fim_model)))
    strategy = infill.choose_strategy(loaded.model, loaded.tokenizer)
    assert isinstance(strategy, fim.FimStrategy) and strategy.fim.name == "starcoder"

    prompts: list[list[int]] = []
    real = fill.FillContext.decode_from

    def spy(self: fill.FillContext, prompt_ids: list[int], *args: Any) -> Any:
        prompts.append(list(prompt_ids))
        return real(self, prompt_ids, *args)

    monkeypatch.setattr(fill.FillContext, "decode_from", spy)
    prompt = "def add(a, b):\n    return [MASK]\n\nprint(add(1, 2))\n"
    result = engine.generate(Generate(id="t", params=GenerationParams(max_new_tokens=5),
                                      prompt=prompt), lambda: False)
    vocab = loaded.tokenizer.get_vocab()
    tokenizer = loaded.tokenizer

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert prompts == [[vocab["<fim_prefix>"], *encode("def add(a, b):\n    return "),
                        vocab["<fim_suffix>"], *encode("\n\nprint(add(1, 2))\n"),
                        vocab["<fim_middle>"]]]
    (span,) = result.spans
    assert result.text.startswith("def add(a, b):\n    return ")
    assert result.text.endswith("\n\nprint(add(1, 2))\n")
    assert result.text[span.start:span.end] == result.text[27:len(result.text) - 19]
    assert 1 <= len(result.token_ids) <= 5
    assert "".join(e.text for e in events if isinstance(e, Token)) == result.text


def test_fim_tiny_random_model_beam_returns_ranked_fills(tiny_fim_model: Path) -> None:
    from glmchat.model.engine import Engine

    engine = Engine(lambda event: None)
    engine.load(ModelSpec(path=str(tiny_fim_model)))
    params = GenerationParams(strategy="beam", num_beams=3, num_return_sequences=3,
                              max_new_tokens=4)
    result = engine.generate(Generate(id="b", params=params, prompt="x = [gMASK] + 1"),
                             lambda: False)
    assert len(result.beams) == 3
    scores = [b.score for b in result.beams]
    assert scores == sorted(scores, reverse=True)
    assert result.beams[0].text == result.text
    assert all(b.text.startswith("x = ") and b.text.endswith(" + 1") for b in result.beams)
