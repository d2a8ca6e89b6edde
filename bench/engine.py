"""`glmchat bench engine`: our engine beside its peers, in one run, on the embedded model.

1. decode tokens/s: our decode loop vs transformers' ``generate`` (same process, same model
   object, same threads, greedy, N new tokens forced with min_new_tokens), best of R runs each.
2. warm start to first token: `glmchat PROMPT` as a fresh process until its first stdout byte,
   vs the bare `python -c "import torch, transformers"`.
3. `glmchat --help` wall time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from glmchat.usage import Parser

PROMPT = "Write a short story about a lighthouse keeper."


def _best_of(runs: int, fn: Callable[[], float]) -> float:
    return min(fn() for _ in range(runs))


def decode_speed(new_tokens: int, runs: int, threads: int) -> tuple[float, float]:
    import torch
    from glmchat.model import generate as gen
    from glmchat.model.sources import convert_gguf, resolve
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    resolved = resolve("default")
    if resolved.needs_conversion:
        convert_gguf(resolved, lambda done, total, what: None)
    model: Any = AutoModelForCausalLM.from_pretrained(resolved.weights_dir, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(resolved.weights_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                        add_generation_prompt=True, return_dict=False)
    prompt = torch.tensor([list(ids)])
    eos = model.generation_config.eos_token_id
    settings = gen.DecodeSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  eos_token_ids=(eos,) if isinstance(eos, int) else tuple(eos))

    def ours() -> float:
        with torch.inference_mode():
            timing = gen.StepTiming()
            tokens = list(gen.decode_n(model, prompt, settings, timing=timing))
        assert len(tokens) == new_tokens
        return sum(timing.step_s) / (new_tokens - 1)

    def theirs() -> float:
        # decode time per token = (generate(N) - generate(1)) / (N - 1): prefill cancels out
        def run(n: int) -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                               do_sample=False, max_new_tokens=n, min_new_tokens=n)
            return time.perf_counter() - t0
        one = min(run(1) for _ in range(3))
        return (run(new_tokens) - one) / (new_tokens - 1)

    ours()  # warm-up
    ours_s = _best_of(runs, ours)
    theirs_s = _best_of(runs, theirs)
    return 1 / ours_s, 1 / theirs_s


def _wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def start_to_first_token(runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "glmchat", "--max-new-tokens", "8",
                                 PROMPT], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None
        proc.stdout.read(1)
        times.append(time.perf_counter() - t0)
        proc.communicate()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="glmchat bench engine", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0 = torch's default")
    args = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    ours, theirs = decode_speed(args.new_tokens, args.runs, args.threads)
    print(f"decode tok/s (greedy, {args.new_tokens} new tokens, best of {args.runs}): "
          f"glmchat {ours:.1f}  transformers.generate {theirs:.1f}  ratio {ours / theirs:.2f}x"
          "  (target >= 1.0x)")
    bare = _wall([sys.executable, "-c", "import torch, transformers"], args.runs)
    first = start_to_first_token(args.runs)
    print(f"warm start to first token: glmchat {first:.2f}s  bare import torch+transformers "
          f"{bare:.2f}s  ratio {first / bare:.2f}x  (target <= 1.5x)")
    help_s = _wall([os.path.join(os.path.dirname(sys.executable), "glmchat"), "--help"],
                   args.runs)
    print(f"glmchat --help: {help_s * 1000:.0f} ms  (target < 300 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
