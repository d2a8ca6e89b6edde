"""One-shot and pipe mode: prompts in, completions on stdout, nothing else there.

Exit codes: 0 ok, 1 runtime failure, 2 usage/input error, 130 interrupted (what was already
printed stays printed).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from typing import Any, TextIO

from glmchat.backend import describe, make_backend
from glmchat.config import Config
from glmchat.errors import GlmchatError, UsageError
from glmchat.infill import ansi, has_masks
from glmchat.protocol import Finished, GenerationResult, Loaded, LoadProgress, StepStats, Token
from glmchat.sessions.recorder import open_recorder
from glmchat.tui.format import streaming_summary, token_count


def _read_stdin(stdin: TextIO) -> str:
    """All of stdin as text; bytes that are not UTF-8 are a usage error that says where."""
    try:
        text = stdin.read()
    except UnicodeDecodeError as exc:
        raise UsageError(f"stdin is not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                         f"offset {exc.start}); pipe UTF-8 text") from None
    try:
        text.encode("utf-8")  # undecodable bytes arrive as surrogates (surrogateescape)
    except UnicodeEncodeError as exc:
        line = text.count("\n", 0, exc.start) + 1
        raise UsageError(f"stdin is not UTF-8 text (line {line}, character "
                         f"{exc.start - text.rfind(chr(10), 0, exc.start)}); pipe UTF-8 "
                         "text") from None
    return text


def read_prompts(args: argparse.Namespace, prompt: str, stdin: TextIO) -> list[str]:
    if args.each_line:
        if prompt:
            raise UsageError("--each-line reads prompts from stdin; drop the prompt argument")
        prompts = [line.rstrip("\r") for line in _read_stdin(stdin).split("\n")]
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise UsageError("--each-line got no non-blank lines on stdin")
        return prompts
    if not prompt:
        prompt = _read_stdin(stdin)
        # `echo q | glmchat` must answer like `glmchat q`: the newline is the shell's, not
        # the user's. Raw continuation keeps inner whitespace, chat trims both ends.
        prompt = prompt.removesuffix("\n") if args.raw else prompt.strip()
    if not prompt.strip():
        raise UsageError("the prompt is empty; pass it as an argument or on stdin")
    return [prompt]


def result_json(prompt: str, result: GenerationResult, model: str) -> dict[str, Any]:
    return {
        "prompt": prompt,
        "text": result.text,
        "tokens": token_count(result),
        "token_ids": result.token_ids if result.token_ids or not result.text else None,
        "finish_reason": result.finish_reason,
        "strategy": result.strategy,
        "seed": result.seed,
        "model": model,
        "beams": [{"text": b.text, "score": b.score, "tokens": len(b.token_ids)}
                  for b in result.beams],
        "spans": [dataclasses.asdict(s) for s in result.spans],
        "notes": result.notes,
        "timings": dataclasses.asdict(result.timings),
    }


def stats_line(result: GenerationResult) -> str:
    t = result.timings
    prefill = f"{t.prefill_tokens_per_s:.0f} tok/s" if t.prefill_tokens_per_s > 0 else "–"
    return (f"[{token_count(result)} tokens, {t.decode_tokens_per_s:.1f} tok/s decode, "
            f"{prefill} prefill, TTFT {t.ttft_s:.2f}s, "
            f"{result.strategy}, {result.finish_reason}]")


def run_oneshot(config: Config, args: argparse.Namespace, prompt: str) -> int:
    prompts = read_prompts(args, prompt, sys.stdin)
    params = config.generation.validate()
    out = sys.stdout
    verbose = args.verbose
    # --session FILE / --resume ID|FILE: checked before the worker starts, so a bad file fails fast
    recorder = open_recorder(config, args, oneshot=True)
    for note in recorder.notes if recorder is not None else []:
        print(f"glmchat: warning: {note}", file=sys.stderr)
    if recorder is not None:
        # A write that fails later (disk full, size limit): said at once, the replies still
        # come, and the exit code is 1.
        recorder.on_save_error = lambda why: print(
            f"glmchat: error: {why}; this exchange was not saved", file=sys.stderr, flush=True)
    client = make_backend(config, discover=True)
    gen_id: str | None = None
    recorded: str | None = None  # the generation whose reply the session holds
    try:
        client.start()
        if verbose:
            print(f"glmchat: backend: {describe(client)}", file=sys.stderr)
        model_name = config.model.path
        for event in client.load(config.model.spec()):
            if verbose and isinstance(event, LoadProgress):
                print(f"glmchat: [{event.done}/{event.total}] {event.what}", file=sys.stderr)
            elif isinstance(event, Loaded):
                model_name = event.info.name
                for note in event.placement.notes:
                    print(f"glmchat: note: {note}", file=sys.stderr)
                if recorder is not None:
                    recorder.start(event.info, event.placement)
                if verbose and (event.placement.runtime == "remote" or event.info.backend):
                    print(f"glmchat: {event.info.name} served by {event.info.backend}",
                          file=sys.stderr)
                elif verbose:
                    tiers = ", ".join(f"{n} on {t}" for t, n in
                                      sorted(event.placement.layers_per_tier.items()))
                    weights = (f"; {event.info.quantize} weights"
                               if event.info.quantize != "none" else "")
                    print(f"glmchat: loaded {event.info.name} in {event.load_s:.1f}s "
                          f"(layers: {tiers}{weights})", file=sys.stderr)
        for text in prompts:
            if recorder is None:
                gen_id = client.generate(params, prompt=text, raw=args.raw)
            else:  # continue the session's conversation: send its turns as context
                asked, request = recorder.ask(text, raw=args.raw)
                gen_id = client.generate(params, prompt=request.prompt,
                                         messages=request.messages, raw=args.raw)
            streamed = False
            # --color on an infill prompt: the spans come with the result, so print it then.
            infill = has_masks(text)  # the result is the whole text, blanks filled
            highlight = args.color and infill and not args.json
            step_extra: dict[str, object] = {}  # the offload runtime's streaming stats
            for event in client.stream(gen_id):
                if isinstance(event, StepStats) and event.new_tokens > 1:
                    step_extra = event.extra
                if (isinstance(event, Token) and not event.provisional and not args.json
                        and not highlight):
                    out.write(event.text)
                    out.flush()
                    streamed = True
                elif isinstance(event, Finished):
                    result = event.result
                    if recorder is not None:
                        recorded = gen_id
                        recorder.assistant(result, parent=asked.id, messages=request.messages,
                                           prompt=request.prompt, raw=args.raw)
                    for note in result.notes:
                        print(f"glmchat: note: {note}", file=sys.stderr)
                    if args.json:
                        out.write(json.dumps(result_json(text, result, model_name)) + "\n")
                    else:
                        if highlight:
                            out.write(ansi(result.text, result.spans))
                        elif not streamed:
                            out.write(result.text)
                        if not (infill and result.text.endswith("\n")):
                            out.write("\n")
                    out.flush()
                    if verbose:
                        streaming = streaming_summary(step_extra)
                        print(f"glmchat: {stats_line(result)}"
                              + (f" {streaming}" if streaming else ""), file=sys.stderr)
            gen_id = None
        if verbose and recorder is not None and recorder.path is not None \
                and not recorder.save_error:
            print(f"glmchat: saved to {recorder.path}", file=sys.stderr)
        return 1 if recorder is not None and recorder.save_error else 0
    except KeyboardInterrupt:
        if gen_id is not None and gen_id != recorded:
            with contextlib.suppress(GlmchatError, KeyboardInterrupt):
                done = client.finished_for(gen_id)  # it may have come just before the signal
                if done is None and client.alive:
                    client.cancel(gen_id)
                    if recorder is not None:
                        # Keep what was generated: the worker stops at the next step and
                        # sends the partial reply (a second Ctrl+C gives up on it).
                        for event in client.stream(gen_id):
                            if isinstance(event, Finished) and event.id == gen_id:
                                done = event
                                break
                if done is not None and recorder is not None:
                    recorder.assistant(done.result, parent=asked.id,
                                       messages=request.messages,
                                       prompt=request.prompt, raw=args.raw)
        out.write("\n")
        out.flush()
        print("glmchat: interrupted", file=sys.stderr)
        return 130
    finally:
        client.close()
