"""The on-disk format: one JSON object per line, converted to and from domain.py's dataclasses.

    {"format": "glmchat-session", "version": 1, "type": "header", "id": …, "model": {…}, …}
    {"type": "user", "id": "u…", "parent": null, "time": …, "content": "…"}
    {"type": "assistant", "id": "a…", "parent": "u…", "request": {…}, "params": {…},
     "strategy": "sample", "seed": 42, "token_ids": […], "prompt_token_ids": […], …}
    {"type": "setting", "name": "temperature", "value": 0.5, …}
    {"type": "model" | "beam" | "head", …}

Readers skip keys they do not know, so adding a key is not a format change; changing what a
key means is, and bumps FORMAT_VERSION (older glmchats then refuse the file with a message).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from glmchat.errors import GlmchatError, UsageError
from glmchat.params import GenerationParams
from glmchat.protocol import Beam, ChatMessage, ModelInfo, Placement, Span, Timings

from .domain import (
    AssistantTurn,
    BeamChosen,
    HeadMoved,
    ModelChanged,
    ModelRecord,
    PlacementSummary,
    Request,
    SessionEvent,
    SessionHeader,
    SettingChanged,
    UserTurn,
)

FORMAT_NAME = "glmchat-session"
FORMAT_VERSION = 1

Record = dict[str, Any]


class SessionFileError(UsageError):
    """A file that cannot be read as a session: not one, damaged, or from a newer glmchat."""


class SessionWriteError(GlmchatError):
    """A session file that could not be written (disk full, I/O error, file size limit, made
    read-only or replaced): a runtime failure, exit code 1. What was not written is kept in
    memory by the recorder."""


class BadRecord(ValueError):
    """One line that is JSON but not a valid event; the loader skips it with a warning."""


# ---- from the worker's types -------------------------------------------------------------------


def model_record(info: ModelInfo) -> ModelRecord:
    return ModelRecord(name=info.name, source=info.source, digest=info.digest, dtype=info.dtype,
                       architecture=info.architecture, n_params=info.n_params,
                       context_length=info.context_length, quantize=info.quantize,
                       backend=info.backend)


def placement_summary(placement: Placement) -> PlacementSummary:
    return PlacementSummary(runtime=placement.runtime,
                            layers_per_tier=dict(placement.layers_per_tier),
                            bytes_per_tier=dict(placement.bytes_per_tier),
                            n_layers=placement.n_layers, gpu_available=placement.gpu_available)


# ---- domain → record ---------------------------------------------------------------------------


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN (a cancelled beam's score)


def _model_to_record(model: ModelRecord) -> Record:
    return dict(vars(model))


def _placement_to_record(placement: PlacementSummary | None) -> Record | None:
    return None if placement is None else dict(vars(placement))


def header_to_record(header: SessionHeader) -> Record:
    return {"format": FORMAT_NAME, "version": header.format_version, "type": "header",
            "id": header.id, "created": header.created, "glmchat": header.glmchat_version,
            "model": _model_to_record(header.model), "dtype": header.model.dtype,
            "placement": _placement_to_record(header.placement)}


def event_to_record(event: SessionEvent) -> Record:
    if isinstance(event, UserTurn):
        record: Record = {"type": "user", "id": event.id, "parent": event.parent,
                          "time": event.time, "content": event.content}
        if event.edit_of:
            record["edit_of"] = event.edit_of
        return record
    if isinstance(event, AssistantTurn):
        return _assistant_to_record(event)
    if isinstance(event, SettingChanged):
        return {"type": "setting", "id": event.id, "time": event.time, "name": event.name,
                "value": event.value}
    if isinstance(event, ModelChanged):
        return {"type": "model", "id": event.id, "time": event.time,
                "model": _model_to_record(event.model),
                "placement": _placement_to_record(event.placement)}
    if isinstance(event, BeamChosen):
        return {"type": "beam", "id": event.id, "time": event.time, "turn": event.turn,
                "beam_index": event.beam_index}
    return {"type": "head", "id": event.id, "time": event.time, "turn": event.turn}


def _assistant_to_record(turn: AssistantTurn) -> Record:
    record: Record = {"type": "assistant", "id": turn.id, "parent": turn.parent,
                      "time": turn.time, "text": turn.text}
    if not turn.generated:
        record["generated"] = False
        record["edit_of"] = turn.edit_of
        return record
    request = turn.request
    record.update({
        "request": {"raw": request.raw, "prompt": request.prompt,
                    "messages": [{"role": m.role, "content": m.content}
                                 for m in request.messages]},
        "params": turn.params.to_dict(),
        "strategy": turn.strategy,
        "seed": turn.seed,
        "finish_reason": turn.finish_reason,
        "token_ids": list(turn.token_ids),
        "prompt_token_ids": list(turn.prompt_token_ids),
        "beams": [{"text": b.text, "token_ids": list(b.token_ids), "score": _finite(b.score)}
                  for b in turn.beams],
        "spans": [{"start": s.start, "end": s.end, "mask": s.mask} for s in turn.spans],
        "timings": dict(vars(turn.timings)),
    })
    if turn.regenerates:
        record["regenerates"] = turn.regenerates
    if turn.beam_index:
        record["beam_index"] = turn.beam_index
    return record


def dump_line(record: Record) -> bytes:
    """One record as one line of UTF-8 JSON (newlines inside strings are escaped)."""
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


# ---- record → domain ---------------------------------------------------------------------------


def _get(record: Record, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in record or record[key] is None:
        if default is ...:
            raise BadRecord(f"{record.get('type', 'a')} record has no {key!r}")
        return default
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRecord(f"{key!r} has the wrong type ({type(value).__name__})")
    return value


def _model_from(record: Any) -> ModelRecord:
    if not isinstance(record, dict):
        raise BadRecord("'model' is not an object")
    return ModelRecord(
        name=_get(record, "name", str, ""), source=_get(record, "source", str),
        digest=_get(record, "digest", str, ""), dtype=_get(record, "dtype", str, "auto"),
        architecture=_get(record, "architecture", str, ""),
        n_params=_get(record, "n_params", int, 0),
        context_length=_get(record, "context_length", int, 0),
        quantize=_get(record, "quantize", str, "none"),
        backend=_get(record, "backend", str, ""))


def _placement_from(record: Any) -> PlacementSummary | None:
    if not isinstance(record, dict):
        return None
    return PlacementSummary(
        runtime=_get(record, "runtime", str, ""),
        layers_per_tier=_get(record, "layers_per_tier", dict, {}),
        bytes_per_tier=_get(record, "bytes_per_tier", dict, {}),
        n_layers=_get(record, "n_layers", int, 0),
        gpu_available=_get(record, "gpu_available", bool, False))


def header_from_record(record: Record) -> SessionHeader:
    return SessionHeader(
        id=_get(record, "id", str), created=_get(record, "created", str, ""),
        format_version=_get(record, "version", int),
        glmchat_version=_get(record, "glmchat", str, ""),
        model=_model_from(record.get("model")),
        placement=_placement_from(record.get("placement")))


def _ids(values: Any, what: str) -> list[int]:
    if not isinstance(values, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise BadRecord(f"{what} is not a list of token ids")
    return list(values)


def _assistant_from(r: Record) -> AssistantTurn:
    base = dict(id=_get(r, "id", str), parent=_get(r, "parent", str, None),
                time=_get(r, "time", str, ""), text=_get(r, "text", str))
    if r.get("generated") is False:
        return AssistantTurn(**base, generated=False, edit_of=_get(r, "edit_of", str, None))
    req = _get(r, "request", dict, {})
    messages = [ChatMessage(role=_get(m, "role", str), content=_get(m, "content", str))
                for m in _get(req, "messages", list, []) if isinstance(m, dict)]
    params_record = _get(r, "params", dict)
    try:
        params = GenerationParams.from_dict(params_record)
    except TypeError as exc:
        raise BadRecord(f"'params' cannot be read: {exc}") from None
    beams = [Beam(text=_get(b, "text", str, ""), token_ids=_ids(b.get("token_ids", []), "beam"),
                  score=float(b["score"]) if isinstance(b.get("score"), int | float)
                  else float("nan"))
             for b in _get(r, "beams", list, []) if isinstance(b, dict)]
    spans = [Span(start=_get(s, "start", int), end=_get(s, "end", int),
                  mask=_get(s, "mask", str, "[MASK]"))
             for s in _get(r, "spans", list, []) if isinstance(s, dict)]
    timings_record = _get(r, "timings", dict, {})
    known = set(vars(Timings()))
    timings = Timings(**{k: v for k, v in timings_record.items() if k in known})
    return AssistantTurn(
        **base, request=Request(messages=messages, prompt=_get(req, "prompt", str, ""),
                                raw=_get(req, "raw", bool, False)),
        params=params, strategy=_get(r, "strategy", str, params.strategy),
        seed=_get(r, "seed", int, None), token_ids=_ids(r.get("token_ids"), "'token_ids'"),
        prompt_token_ids=_ids(r.get("prompt_token_ids", []), "'prompt_token_ids'"),
        finish_reason=_get(r, "finish_reason", str, ""), beams=beams, spans=spans,
        timings=timings, regenerates=_get(r, "regenerates", str, None),
        beam_index=_get(r, "beam_index", int, 0))


def _user_from(r: Record) -> UserTurn:
    return UserTurn(id=_get(r, "id", str), parent=_get(r, "parent", str, None),
                    time=_get(r, "time", str, ""), content=_get(r, "content", str),
                    edit_of=_get(r, "edit_of", str, None))


def _setting_from(r: Record) -> SettingChanged:
    return SettingChanged(id=_get(r, "id", str), time=_get(r, "time", str, ""),
                          name=_get(r, "name", str), value=r.get("value"))


def _model_changed_from(r: Record) -> ModelChanged:
    return ModelChanged(id=_get(r, "id", str), time=_get(r, "time", str, ""),
                        model=_model_from(r.get("model")),
                        placement=_placement_from(r.get("placement")))


def _beam_from(r: Record) -> BeamChosen:
    return BeamChosen(id=_get(r, "id", str), time=_get(r, "time", str, ""),
                      turn=_get(r, "turn", str), beam_index=_get(r, "beam_index", int))


def _head_from(r: Record) -> HeadMoved:
    return HeadMoved(id=_get(r, "id", str), time=_get(r, "time", str, ""),
                     turn=_get(r, "turn", str, None))


EVENT_READERS: dict[str, Callable[[Record], SessionEvent]] = {
    "user": _user_from, "assistant": _assistant_from, "setting": _setting_from,
    "model": _model_changed_from, "beam": _beam_from, "head": _head_from,
}


def event_from_record(record: Any) -> SessionEvent:
    if not isinstance(record, dict):
        raise BadRecord("the line is not a JSON object")
    kind = record.get("type")
    reader = EVENT_READERS.get(kind) if isinstance(kind, str) else None
    if reader is None:
        raise BadRecord(f"unknown event type {kind!r}")
    return reader(record)
