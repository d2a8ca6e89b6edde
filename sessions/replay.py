"""Replay: generate every recorded reply again, with the recorded model, request, params and
seed, and (with check) compare the token ids and the texts.

Greedy and beam search are deterministic; sampling draws from a generator seeded with the
recorded seed, so it repeats on the same machine and dtype. A reply stopped by the user is
replayed up to the length it had; a beam search stopped midway cannot be, and is skipped.

A session made with an OpenAI-compatible server replays against that server (its recorded
URL) unless --backend names another; such a server cannot promise the same tokens (batching,
kernels, its version) and may send no token ids: --check says so, and compares the text where
it must. A session made with glmchat serve names its weights (source and digest), so it
replays where those are: a running local glmchat serve of that model, else the local worker.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from glmchat.backend import Backend, describe, exact_replay, is_local, make_backend
from glmchat.config import Config
from glmchat.errors import UsageError
from glmchat.params import GenerationParams
from glmchat.protocol import Finished, GenerationResult, Loaded, LoadProgress, ModelSpec, Token

from .domain import AssistantTurn, ModelRecord, Session


@dataclass
class ReplayReport:
    replies: int = 0
    matched: int = 0
    diverged: int = 0
    skipped: list[str] = field(default_factory=list)
    first_divergence: str = ""

    @property
    def ok(self) -> bool:
        return self.diverged == 0


def replay_params(turn: AssistantTurn) -> GenerationParams | str:
    """The params that make ``turn`` again, or why it cannot be made again."""
    params = turn.params
    if turn.strategy == "sample":
        if turn.seed is None:
            return "a sampled reply without a recorded seed"
        params = params.replace(seed=turn.seed)
    if turn.finish_reason == "cancelled":
        if turn.strategy == "beam":
            return "a beam search stopped midway cannot be repeated"
        if not turn.token_ids:
            return "stopped before its first token"
        length = len(turn.token_ids)
        params = params.replace(max_new_tokens=length,
                                min_new_tokens=min(params.min_new_tokens, length))
    return params


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _ids_around(ids: list[int], at: int) -> str:
    before = ", ".join(map(str, ids[max(0, at - 3):at]))
    after = ", ".join(map(str, ids[at:at + 5]))
    lead = "…, " if at > 3 else ""
    tail = ", …" if len(ids) > at + 5 else ""
    return f"{lead}{before}{', ' if before and after else ''}[{after}{tail}]" if after else \
        f"{lead}{before} [end]"


def _text_around(text: str, at: int) -> str:
    start = max(0, at - 30)
    return ("…" if start else "") + repr(text[start:at + 50])[1:-1] + \
        ("…" if len(text) > at + 50 else "")


def describe_divergence(label: str, what: str, recorded: list[int], replayed: list[int],
                        recorded_text: str, replayed_text: str) -> str:
    """A readable diff of the first place two token sequences part."""
    at = first_difference(recorded, replayed)
    assert at is not None
    char = next((i for i, (x, y) in enumerate(zip(recorded_text, replayed_text, strict=False))
                 if x != y), min(len(recorded_text), len(replayed_text)))
    return "\n".join([
        f"{label}: {what} diverge at token {at} "
        f"(recorded {len(recorded)} tokens, replayed {len(replayed)})",
        f"  recorded ids   {_ids_around(recorded, at)}",
        f"  replayed ids   {_ids_around(replayed, at)}",
        f"  recorded text  {_text_around(recorded_text, char)}",
        f"  replayed text  {_text_around(replayed_text, char)}",
    ])


def compare_text(label: str, recorded: str, replayed: str) -> str:
    """Empty when the texts are the same; else where they part."""
    if recorded == replayed:
        return ""
    at = next((i for i, (x, y) in enumerate(zip(recorded, replayed, strict=False)) if x != y),
              min(len(recorded), len(replayed)))
    return "\n".join([
        f"{label}: the reply's text diverges at character {at} (the server sends no token ids)",
        f"  recorded text  {_text_around(recorded, at)}",
        f"  replayed text  {_text_around(replayed, at)}",
    ])


def compare(label: str, turn: AssistantTurn, result: GenerationResult) -> str:
    """Empty when the replayed reply has the recorded token ids; else the first divergence.
    A server that sends no token ids is compared by text."""
    if not result.token_ids and (result.text or turn.text):
        return compare_text(label, turn.text, result.text)
    if (turn.prompt_token_ids and result.prompt_token_ids
            and turn.prompt_token_ids != result.prompt_token_ids):
        return describe_divergence(label, "the prompt tokens (chat template or tokenizer "
                                   "changed?)", turn.prompt_token_ids,
                                   result.prompt_token_ids, "", "")
    if turn.token_ids != result.token_ids:
        return describe_divergence(label, "the reply's tokens", turn.token_ids,
                                   result.token_ids, turn.text, result.text)
    for i, (old, new) in enumerate(zip(turn.beams, result.beams, strict=False)):
        if old.token_ids != new.token_ids:
            return describe_divergence(label, f"beam {i + 1}'s tokens", old.token_ids,
                                       new.token_ids, old.text, new.text)
    if len(turn.beams) != len(result.beams):
        return f"{label}: recorded {len(turn.beams)} beams, replayed {len(result.beams)}"
    # The same tokens: the worker's text is what they decode to (stop strings cut), so a
    # recorded text that differs was changed after it was recorded.
    if turn.text != result.text:
        return describe_text_divergence(label, "the reply's text", turn.text, result.text)
    for i, (old, new) in enumerate(zip(turn.beams, result.beams, strict=False)):
        if old.text != new.text:
            return describe_text_divergence(label, f"beam {i + 1}'s text", old.text, new.text)
    return ""


def describe_text_divergence(label: str, what: str, recorded: str, replayed: str) -> str:
    """Tokens that match but a text that does not: where the texts part."""
    at = next((i for i, (x, y) in enumerate(zip(recorded, replayed, strict=False)) if x != y),
              min(len(recorded), len(replayed)))
    return "\n".join([
        f"{label}: {what} diverges at character {at}: the recorded text is not what the "
        f"recorded tokens decode to (edited after it was saved?) "
        f"(recorded {len(recorded)} characters, replayed {len(replayed)})",
        f"  recorded text  {_text_around(recorded, at)}",
        f"  replayed text  {_text_around(replayed, at)}",
    ])


def model_spec(config: Config, recorded: ModelRecord, path_typed: bool,
               dtype_typed: bool, quantize_typed: bool = False) -> ModelSpec:
    """The recorded model, dtype and weight scheme, placed the way this machine's config says;
    a --model, --dtype or --quantize typed on the command line wins."""
    spec = config.model.spec()
    path = spec.path if path_typed else recorded.source
    dtype = spec.dtype if dtype_typed else recorded.dtype
    scheme, group = spec.quantize, spec.quant_group
    if not quantize_typed:  # "int4-g32" → ("int4", 32)
        scheme, _, rest = recorded.quantize.partition("-g")
        group = int(rest) if rest.isdigit() else spec.quant_group
    if path != "default" and not Path(path).expanduser().exists():
        raise UsageError(f"the session's model {path} is not there; pass --model PATH to "
                         "replay with a copy of it")
    return ModelSpec(path=path, dtype=dtype, gpu_memory=spec.gpu_memory,
                     cpu_memory=spec.cpu_memory, offload_dir=spec.offload_dir,
                     offload_runtime=spec.offload_runtime,
                     offload_reader=spec.offload_reader, threads=spec.threads,
                     tokenizer=spec.tokenizer, num_heads=spec.num_heads,
                     quantize=scheme, quant_group=group)


class Replayer:
    def __init__(self, session: Session, config: Config, *, check: bool, path_typed: bool = False,
                 dtype_typed: bool = False, verbose: bool = False, out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr, quantize_typed: bool = False) -> None:
        self.session, self.config, self.check, self.verbose = session, config, check, verbose
        self.path_typed, self.dtype_typed = path_typed, dtype_typed
        self.quantize_typed = quantize_typed
        self.out, self.err = out, err
        self.client: Backend | None = None
        self._loaded_spec: ModelSpec | None = None

    def say(self, line: str) -> None:
        print(f"glmchat: {line}", file=self.err, flush=True)

    def run(self) -> ReplayReport:
        replies = [t for t in self.session.assistant_turns() if t.generated]
        report = ReplayReport(replies=len(replies))
        self.say(f"replaying {len(replies)} replies from {self.session.path}")
        if not replies:
            return report
        self.client = self._backend(self.session.model_for(replies[0].id)[0])
        self.client.start()
        if self.verbose or not exact_replay(self.client):
            self.say(f"backend: {describe(self.client)}")
        if self.check and not exact_replay(self.client):
            self.say("note: this server cannot guarantee identical tokens (its batching, "
                     "kernels and version decide them); --check compares token ids where it "
                     "sends them, else the text")
        try:
            for number, turn in enumerate(replies, start=1):
                self._replay_one(number, turn, report)
        finally:
            self.client.close()
        return report

    def _backend(self, recorded: ModelRecord) -> Backend:
        """The configured server (--backend, [backend] url), else the recorded one, else the
        local worker."""
        config = self.config
        if config.backend.url == "" and recorded.backend and not recorded.digest:
            config = copy.deepcopy(config)
            config.backend.url = recorded.backend
            config.backend.model = config.backend.model or recorded.source
        elif config.backend.url == "" and recorded.backend:
            config = copy.deepcopy(config)
            config.model.path = self.config.model.path if self.path_typed else recorded.source
            return make_backend(config, discover=True)
        return make_backend(config)

    @property
    def remote(self) -> bool:
        return self.client is not None and not is_local(self.client)

    def _ensure_model(self, turn: AssistantTurn) -> None:
        assert self.client is not None
        recorded, _ = self.session.model_for(turn.id)
        if self._loaded_spec is not None and self.remote:
            return  # one server, one model
        if self.remote:  # the server has its model: ask for the recorded one by name
            spec = self.config.model.spec()
            spec = dataclasses.replace(spec, path=spec.path if self.path_typed
                                       else recorded.source)
        else:
            spec = model_spec(self.config, recorded, self.path_typed, self.dtype_typed,
                              self.quantize_typed)
        if spec == self._loaded_spec:
            return
        self.say(f"loading {recorded.name or spec.path} ({spec.path}, {spec.dtype})")
        for event in self.client.load(spec):
            if self.verbose and isinstance(event, LoadProgress):
                self.say(f"[{event.done}/{event.total}] {event.what}")
            elif isinstance(event, Loaded) and event.info.digest != recorded.digest:
                self.say(f"warning: {event.info.name}'s weights differ from the session's "
                         f"(digest {event.info.digest[:12]}, recorded "
                         f"{recorded.digest[:12] or 'none'}); replies may not match")
        self._loaded_spec = spec

    def _replay_one(self, number: int, turn: AssistantTurn, report: ReplayReport) -> None:
        label = f"reply {number}/{report.replies} ({turn.id}, {turn.strategy}" + (
            f", seed {turn.seed})" if turn.strategy == "sample" else ")")
        params = replay_params(turn)
        if isinstance(params, str):
            report.skipped.append(f"{label}: skipped, {params}")
            print(f"── {label}: skipped, {params}", file=self.out, flush=True)
            return
        self._ensure_model(turn)
        assert self.client is not None
        print(f"── {label}", file=self.out, flush=True)
        request = turn.request
        gen_id = self.client.generate(params, prompt=request.prompt,
                                      messages=list(request.messages), raw=request.raw)
        result: GenerationResult | None = None
        try:
            for event in self.client.stream(gen_id):
                if isinstance(event, Token) and not event.provisional:
                    self.out.write(event.text)
                    self.out.flush()
                elif isinstance(event, Finished):
                    result = event.result
        except UsageError as exc:
            if exact_replay(self.client):
                raise
            report.skipped.append(f"{label}: skipped, {exc}")  # e.g. beam search
            print(f"\n── {label}: skipped, {exc}", file=self.out, flush=True)
            return
        assert result is not None
        if turn.strategy == "beam":
            self.out.write(result.text)
        self.out.write("\n")
        if not self.check:
            return
        divergence = compare(label, turn, result)
        if divergence:
            report.diverged += 1
            report.first_divergence = report.first_divergence or divergence
            print(f"✗ {label}: differs from the recording", file=self.out, flush=True)
        else:
            report.matched += 1
            print(f"✓ {len(result.token_ids)} tokens match" if result.token_ids else
                  "✓ the text matches (the server sends no token ids)", file=self.out,
                  flush=True)
