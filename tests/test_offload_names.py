"""The offload runtime names checkpoint tensors the way transformers does (GPT-NeoX's
``embed_out`` is its ``lm_head``), and where a checkpoint needs more than a rename it falls back
to accelerate's runtime with a note. Tiny random-weight models written with save_pretrained."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from glmchat.params import GenerationParams
from glmchat.protocol import ChatMessage, Generate, ModelSpec

ALL_ON_DISK = 0.0001  # GiB: every layer offloaded


def _save(model: Any, out: Path) -> Path:
    from glmchat.bench.make_model import TOKENIZER_FILES, default_tokenizer_dir

    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (default_tokenizer_dir() / name).is_file():
            shutil.copy(default_tokenizer_dir() / name, out / name)
    return out


@pytest.fixture(scope="module")
def tiny_gptneox(isolated_xdg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=3,
                           num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=256, tie_word_embeddings=False)
    return _save(GPTNeoXForCausalLM(config), tmp_path_factory.mktemp("tiny-random-gptneox"))


@pytest.fixture(scope="module")
def tiny_mixtral(isolated_xdg: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=49152, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                           num_local_experts=2, num_experts_per_tok=1,
                           max_position_embeddings=256)
    return _save(MixtralForCausalLM(config), tmp_path_factory.mktemp("tiny-random-mixtral"))


def _engine(path: Path, **spec: Any) -> Any:
    from glmchat.model.engine import Engine

    engine = Engine(lambda event: None)
    engine.load(ModelSpec(path=str(path), **spec))
    return engine


def _greedy(engine: Any) -> list[int]:
    request = Generate(id="g", params=GenerationParams(max_new_tokens=8), raw=True,
                       prompt="The lighthouse keeper",
                       messages=[ChatMessage("user", "The lighthouse keeper")])
    return list(engine.generate(request, lambda: False).token_ids)


def test_checkpoint_names_are_transformers_renames_tiny_random(tiny_gptneox: Path) -> None:
    from accelerate import init_empty_weights
    from glmchat.model.checkpoint_names import checkpoint_names
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    with safe_open(tiny_gptneox / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "embed_out.weight" in keys and "lm_head.weight" not in keys  # as Pythia ships
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_gptneox))
    names = checkpoint_names(meta, keys)
    assert names["lm_head.weight"] == "embed_out.weight"
    assert set(names) == set(meta.state_dict())  # every parameter found, nothing invented
    # … and it is what transformers itself loads there.
    loaded = AutoModelForCausalLM.from_pretrained(tiny_gptneox)
    with safe_open(tiny_gptneox / "model.safetensors", "pt") as f:
        for name, key in names.items():
            assert loaded.state_dict()[name].equal(f.get_tensor(key)), name


def test_gptneox_streams_with_renamed_head_tiny_random(tiny_gptneox: Path) -> None:
    resident = _engine(tiny_gptneox)
    streamed = _engine(tiny_gptneox, cpu_memory=ALL_ON_DISK)
    placement = streamed.loaded.placement
    assert placement.runtime == "glmchat" and placement.notes == []
    assert placement.layers_per_tier == {"disk": 3}
    assert _greedy(streamed) == _greedy(resident)
    streamed.loaded.offload.close()


def test_converted_checkpoint_falls_back_to_accelerate_tiny_random(tiny_mixtral: Path) -> None:
    resident = _engine(tiny_mixtral)
    fallen_back = _engine(tiny_mixtral, cpu_memory=ALL_ON_DISK)
    placement = fallen_back.loaded.placement
    assert placement.runtime == "accelerate"
    assert len(placement.notes) == 1
    assert "using accelerate's runtime instead" in placement.notes[0]
    assert "experts" in placement.notes[0]  # says which tensor needed converting
    assert _greedy(fallen_back) == _greedy(resident)
