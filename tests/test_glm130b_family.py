"""GLM-130B through the engine: the official layout converted once, icetk ids from a
sentencepiece model trained here, its blank loop and beam search behind the family seam; and
bad checkpoints, each one line (exit 2) with nothing half-written left in the cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from glmchat.model import glm_checkpoint as ckpt
from glmchat.model import glm_generate as glm
from glmchat.model.icetk_tokenizer import (
    EOS,
    GMASK,
    MASK,
    NUM_IMAGE_TOKENS,
    IceTextTokenizer,
    find_file,
)

from glmchat.errors import UsageError
from glmchat.params import GenerationParams
from glmchat.protocol import Event, Generate, ModelSpec, Token
from tests import glm_tiny

TEXT = ("the quick brown fox jumps over the lazy dog . a model fills the blank in the middle "
        "of a sentence . glm reads text both ways before the blank and writes after it .\n") * 20


def train_tokenizer(directory: Path) -> Path:
    import sentencepiece as spm

    corpus = directory / "corpus.txt"
    corpus.write_text(TEXT)
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory / "ice_text"),
                                   vocab_size=40, model_type="unigram",
                                   minloglevel=2)  # pieces 0..2: <unk> <s> </s> as in icetk
    return directory / "ice_text.model"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("glm-family")
    directory = glm_tiny.write_checkpoint(root / "glm-tiny", tp=2)
    train_tokenizer(root)
    (root / "ice_text.model").rename(directory / "ice_text.model")
    return directory


@pytest.fixture(scope="module")
def engine(tiny_dir: Path) -> tuple[object, list[Event]]:
    from glmchat.model.engine import Engine

    events: list[Event] = []
    eng = Engine(events.append)
    eng.load(ModelSpec(path=str(tiny_dir), dtype="float16"))
    return eng, events


def test_tokenizer_is_icetk_ids_with_the_offset(tiny_dir: Path) -> None:
    import sentencepiece as spm

    path = find_file("", tiny_dir)
    tok = IceTextTokenizer(path, 150528)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert tok.encode("the lazy fox") == [i + NUM_IMAGE_TOKENS for i in sp.encode("the lazy fox")]
    assert tok.decode(tok.encode("the lazy fox")) == "the lazy fox"
    assert tok.detokenize([*tok.encode("a"), MASK, EOS]) == "a[[MASK]][</s>]"
    try:
        from icetk.text_tokenizer import TextTokenizer  # the `glm` extra, where it installs
    except ImportError:
        return
    assert [i + NUM_IMAGE_TOKENS for i in TextTokenizer(str(path)).encode("the lazy fox")] == \
        tok.encode("the lazy fox")


def test_tokenizer_that_does_not_fit_is_one_line(tiny_dir: Path) -> None:
    with pytest.raises(UsageError, match="do not fit"):
        IceTextTokenizer(tiny_dir / "ice_text.model", 150004)
    with pytest.raises(UsageError, match="never downloads"):
        find_file("", tiny_dir / "49300")


def test_engine_loads_the_official_layout_and_fills_blanks(engine: tuple[object, list[Event]],
                                                           tiny_dir: Path) -> None:
    from glmchat.model.engine import Engine

    eng, events = engine
    assert isinstance(eng, Engine) and eng.loaded is not None
    info = eng.loaded.info
    assert (info.architecture, info.n_layers, info.dtype) == ("GLM130B", 3, "float16")
    assert ckpt.is_converted(Path(info.weights_dir))
    tok: IceTextTokenizer = eng.loaded.tokenizer

    events.clear()
    result = eng.generate(Generate(id="g", params=GenerationParams(max_new_tokens=12),
                                   prompt="the quick brown"), lambda: False)
    seq = [*tok.encode("the quick brown"), GMASK]
    answers, _ = glm.fill_blanks(eng.loaded.model, seq, GMASK, True, len(seq) + 1 + 12,
                                 lambda: glm.Sampling(greedy=True))
    assert result.token_ids == answers[0][len(seq) - 1:]  # the blank, as glm_generate made it
    assert result.text.startswith("the quick brown")
    streamed = "".join(e.text for e in events if isinstance(e, Token))
    assert result.text == streamed
    assert result.spans and result.spans[0].mask == "[gMASK]"

    events.clear()
    masked = eng.generate(Generate(id="m", params=GenerationParams(max_new_tokens=8),
                                   prompt="the [MASK] fox jumps over the [MASK] dog"),
                          lambda: False)
    assert len(masked.spans) == 2 and "[MASK]" not in masked.text
    assert "".join(e.text for e in events if isinstance(e, Token)) == masked.text
    assert masked.text.startswith("the ") and masked.text.endswith(" dog")


def test_beam_search_ranks_with_glm_scores(engine: tuple[object, list[Event]]) -> None:
    eng, _ = engine
    params = GenerationParams(strategy="beam", num_beams=3, num_return_sequences=3,
                              max_new_tokens=6, no_repeat_ngram_size=2)
    result = eng.generate(Generate(id="b", params=params, prompt="a model fills [MASK] ."),
                          lambda: False)
    scores = [b.score for b in result.beams]
    assert len(result.beams) == 3 and scores == sorted(scores, reverse=True)
    assert result.beams[0].text == result.text


def test_a_second_load_uses_the_converted_copy(tiny_dir: Path,
                                                engine: tuple[object, list[Event]]) -> None:
    from glmchat.model.engine import Engine

    eng, _ = engine
    assert isinstance(eng, Engine) and eng.loaded is not None
    marker = Path(eng.loaded.info.weights_dir) / ckpt.MARKER
    before = marker.stat().st_mtime_ns
    again = Engine(lambda e: None).load(ModelSpec(path=str(tiny_dir), dtype="bfloat16"))
    assert marker.stat().st_mtime_ns == before and again.info.dtype == "bfloat16"


# ---- bad input ---------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def good_tp2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return glm_tiny.write_checkpoint(tmp_path_factory.mktemp("good") / "ckpt", tp=2)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _broken(kind: str, good: Path, tmp: Path) -> Path:
    d = _copy(good, tmp / kind)
    shard1 = d / "49300" / "mp_rank_01_model_states.pt"
    if kind == "missing_shard":
        shard1.unlink()
        (d / "49300" / "mp_rank_02_model_states.pt").write_bytes(b"")
    elif kind == "mixed_tp":
        one = glm_tiny.split(glm_tiny.make_state_dict(), 4)[1]
        torch.save({"module": one}, shard1)
    elif kind == "truncated":
        data = shard1.read_bytes()
        shard1.write_bytes(data[:len(data) // 2])
    elif kind == "latest_missing_iteration":
        (d / "latest").write_text("1000\n")
    elif kind == "not_a_checkpoint":
        torch.save({"optimizer": {"lr": 1.0}}, shard1)
    elif kind == "runs_code":
        torch.save({"module": {"x": Path("/")}}, shard1)  # an object: not weights_only-safe
    elif kind == "quantized":
        sd = torch.load(shard1, weights_only=True)["module"]
        sd["transformer.layers.0.attention.dense.weight_scale"] = torch.ones(64)
        torch.save({"module": sd}, shard1)
    return d


BAD = {"missing_shard": "lacks shard mp_rank_01", "mixed_tp": "mix tensor-parallel",
       "truncated": "truncated or corrupt", "latest_missing_iteration": "names iteration 1000",
       "not_a_checkpoint": "not a GLM-130B checkpoint shard",
       "runs_code": "refusing to load", "quantized": "quantized"}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_checkpoint_is_one_line_and_leaves_no_half_conversion(
        kind: str, good_tp2: Path, tmp_path: Path, cache: Path) -> None:
    from glmchat import paths

    d = _broken(kind, good_tp2, tmp_path)
    with pytest.raises(UsageError, match=BAD[kind]) as caught:
        ckpt.convert(ckpt.find(d), paths.models_cache_dir() / "glm130b-x")
    assert "\n" not in str(caught.value)
    leftovers = list(paths.models_cache_dir().glob("*")) if paths.models_cache_dir().exists() \
        else []
    assert leftovers == []


def test_cli_convert_reports_progress_and_bad_input_exits_2(good_tp2: Path,
                                                            tmp_path: Path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "converted"
    ok = subprocess.run([sys.executable, "-m", "glmchat", "convert", str(good_tp2), "--out",
                         str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "layer 3/3" in ok.stderr and "GB/s" in ok.stderr and "ETA" in ok.stderr
    assert ok.stdout.strip() == str(out) and ckpt.is_converted(out)
    bad = _broken("latest_missing_iteration", good_tp2, tmp_path)
    failed = subprocess.run([sys.executable, "-m", "glmchat", "convert", str(bad)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.count("\n") == 1 and failed.stderr.startswith("glmchat: error: ")
    assert not (tmp_path / "cache" / "glmchat" / "models").exists() or not any(
        (tmp_path / "cache" / "glmchat" / "models").iterdir())


def test_glm_model_can_use_the_transformers_scorer(engine: tuple[object, list[Event]]) -> None:
    from glmchat.model.engine import Engine

    eng, _ = engine
    assert isinstance(eng, Engine)
    base = GenerationParams(strategy="beam", num_beams=2, num_return_sequences=2,
                            max_new_tokens=4)
    ours = eng.generate(Generate(id="t", params=base.replace(beam_scorer="transformers"),
                                 prompt="the lazy"), lambda: False)
    glm_scored = eng.generate(Generate(id="u", params=base, prompt="the lazy"), lambda: False)
    assert len(ours.beams) == 2 and len(glm_scored.beams) == 2
    # the same log-probabilities, penalised by new tokens (transformers) or the full length
    assert [b.score for b in ours.beams] != [b.score for b in glm_scored.beams]


def test_pipe_json_through_the_worker(tiny_dir: Path, tmp_path: Path) -> None:
    import json

    from tests.conftest import run_cli

    tokenizer = tmp_path / "elsewhere.model"
    tokenizer.write_bytes((tiny_dir / "ice_text.model").read_bytes())
    done = run_cli("--model", str(tiny_dir), "--tokenizer", str(tokenizer), "--dtype",
                   "bfloat16", "--json", "--no-save", "--max-new-tokens", "4",
                   "the [MASK] fox")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.splitlines()[0])
    assert record["text"].startswith("the ") and record["text"].endswith(" fox")
    assert [s["mask"] for s in record["spans"]] == ["[MASK]"]
    missing = run_cli("--model", str(tiny_dir), "--tokenizer", str(tmp_path / "nope.model"),
                      "--no-save", "x")
    assert missing.returncode == 2 and "nope.model does not exist" in missing.stderr
