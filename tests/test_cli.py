"""The real command line: pipe/one-shot mode, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import run_cli

QUESTION = "What is the capital of France?"


def _no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


def test_help_does_not_import_the_heavy_stack() -> None:
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "glmchat", "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--cpu-memory" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert not imported & {"torch", "transformers", "accelerate"}


def test_pipe_prints_only_the_completion_and_matches_the_prompt_argument() -> None:
    piped = run_cli(input=QUESTION + "\n")
    as_json = run_cli("--json", QUESTION)
    assert piped.returncode == 0 and as_json.returncode == 0, piped.stderr + as_json.stderr
    record = json.loads(as_json.stdout)
    assert piped.stdout == record["text"] + "\n"
    assert "Paris" in record["text"]
    assert piped.stderr == ""  # progress and stats only with -v
    assert record["finish_reason"] == "eos" and record["tokens"] == len(record["token_ids"])
    assert record["timings"]["decode_tokens_per_s"] > 0


def test_each_line_gives_one_json_record_per_non_blank_line() -> None:
    proc = run_cli("--each-line", "--json", "--max-new-tokens", "4", "-v",
                   input="Say hi.\n\n   \nSay bye.\n")
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["Say hi.", "Say bye."]
    assert all(r["tokens"] <= 4 for r in records)
    assert "loaded SmolLM2-135M-Instruct" in proc.stderr and "tok/s" in proc.stderr


def test_beam_json_returns_ranked_beams() -> None:
    proc = run_cli("--json", "--strategy", "beam", "--num-beams", "3", "-n", "3",
                   "--max-new-tokens", "12", "Name a fruit.")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    scores = [b["score"] for b in record["beams"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert record["text"] == record["beams"][0]["text"]


def test_cpu_memory_limit_offloads_to_disk_and_keeps_greedy_output(tmp_path: Path) -> None:
    plain = run_cli("--json", "--max-new-tokens", "16", QUESTION)
    offloaded = run_cli("--json", "-v", "--max-new-tokens", "16", "--cpu-memory", "0.1",
                        "--offload-dir", str(tmp_path / "offload"), QUESTION)
    assert plain.returncode == 0 and offloaded.returncode == 0, offloaded.stderr
    assert "on disk" in offloaded.stderr
    assert json.loads(offloaded.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]


def _bad_safetensors_dir(tmp_path: Path, default_weights_dir: Path) -> Path:
    bad = tmp_path / "truncated"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (bad / name).write_bytes((default_weights_dir / name).read_bytes())
    with (default_weights_dir / "model.safetensors").open("rb") as src:
        (bad / "model.safetensors").write_bytes(src.read(1 << 20))
    return bad


@pytest.mark.parametrize("case", ["missing", "no-weights", "truncated", "corrupt-gguf",
                                  "not-a-model"])
def test_bad_model_paths_are_one_line_usage_errors(case: str, tmp_path: Path,
                                                   default_weights_dir: Path) -> None:
    if case == "missing":
        path = tmp_path / "nowhere"
    elif case == "no-weights":
        path = tmp_path / "empty"
        path.mkdir()
        (path / "config.json").write_text("{}")
    elif case == "truncated":
        path = _bad_safetensors_dir(tmp_path, default_weights_dir)
    elif case == "corrupt-gguf":
        path = tmp_path / "broken.gguf"
        path.write_bytes(b"GGUF" + os.urandom(4096))
    else:
        path = tmp_path / "notes.txt"
        path.write_text("hello")
    proc = run_cli("--model", str(path), "hi")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmchat: error:")
    assert str(path) in lines[0]
    _no_traceback(proc)


@pytest.mark.parametrize(("args", "stdin", "needle"), [
    (["--num-beams", "0", "hi"], None, "num_beams"),
    (["--top-p", "1.5", "hi"], None, "top_p"),
    (["--temperature", "-1", "hi"], None, "temperature"),
    (["--strategy", "beam", "--num-beams", "2", "-n", "3", "hi"], None, "num_return_sequences"),
    ([], "   \n", "empty"),
    (["--each-line"], "\n\n", "no non-blank lines"),
])
def test_bad_input_is_a_one_line_usage_error(args: list[str], stdin: str | None,
                                             needle: str) -> None:
    proc = run_cli(*args, input=stdin if stdin is not None else "")
    assert proc.returncode == 2
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    _no_traceback(proc)


def test_bad_config_file_names_file_and_line(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[generation]\ntop_k = = 3\n")
    proc = run_cli("--config", str(config), "hi")
    assert proc.returncode == 2
    assert str(config) in proc.stderr and "line 2" in proc.stderr
    _no_traceback(proc)


def test_prompt_longer_than_the_context_is_refused() -> None:
    proc = run_cli("--raw", input="word " * 9000)
    assert proc.returncode == 2
    assert "tokens" in proc.stderr and "8192" in proc.stderr and "shorten" in proc.stderr
    _no_traceback(proc)


def test_unwritable_offload_dir_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    # Our runtime streams the model's own safetensors and needs no offload dir;
    # accelerate's hooks write their copy there.
    proc = run_cli("--cpu-memory", "0.1", "--offload-runtime", "accelerate",
                   "--offload-dir", str(blocker / "sub"), "hi")
    assert proc.returncode == 2
    assert "offload dir" in proc.stderr and "--offload-dir" in proc.stderr
    _no_traceback(proc)


def _start_long_reply(*flags: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "glmchat", "--max-new-tokens", "300", "--min-new-tokens", "300",
         *flags, "Write a long story about a lighthouse keeper."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.read(8)  # blocks until the reply is streaming
    return proc, first


def test_worker_dying_mid_reply_exits_1_with_the_cause() -> None:
    proc, first = _start_long_reply()
    try:
        # spawn also starts a resource tracker; the worker is the one running spawn_main
        worker = next(c for c in psutil.Process(proc.pid).children()
                      if "spawn_main" in " ".join(c.cmdline()))
        worker.kill()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert "killed" in err and len(err.strip().splitlines()) == 1
        assert first and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_interrupt_exits_130_and_keeps_partial_output() -> None:
    proc, first = _start_long_reply()
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130
        assert len(first + out.strip()) > 8 and "interrupted" in err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_interrupt_with_session_saves_the_partial_reply(tmp_path: Path) -> None:
    session = tmp_path / "story.jsonl"
    proc, _first = _start_long_reply("--session", str(session))
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in session.read_text().splitlines()]
    replies = [r for r in records if r.get("type") == "assistant"]
    assert len(replies) == 1
    assert replies[0]["finish_reason"] == "cancelled"
    assert 0 < len(replies[0]["token_ids"]) < 300
    # and the stopped reply replays exactly: same tokens up to where it stopped
    check = run_cli("replay", str(session), "--check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_hf_directory_and_gguf_file_sources_give_the_default_models_output(
        default_weights_dir: Path) -> None:
    from glmchat.model.sources import default_gguf

    runs = [run_cli("--json", "--max-new-tokens", "10", *extra, QUESTION)
            for extra in ([], ["--model", str(default_weights_dir)],
                          ["--model", str(default_gguf())])]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr
    token_ids = [json.loads(proc.stdout)["token_ids"] for proc in runs]
    assert token_ids[0] == token_ids[1] == token_ids[2]
