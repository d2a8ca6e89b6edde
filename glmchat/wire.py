"""The worker protocol on the wire: glmchat.protocol's dataclasses ↔ JSON.

``glmchat serve`` carries the worker's own events to a glmchat client over HTTP, so a remote
worker looks exactly like a local one (beams, infill spans, token ids, step stats, memory,
placement). Every message is a JSON object with a ``"type"`` tag naming its dataclass; nested
records (ModelInfo, Timings, GenerationParams, …) are rebuilt from the field type hints, so a
new field on a dataclass travels without touching this module.

Only the classes in ``WIRE_TYPES`` can be decoded: the other side of the wire cannot make us
build anything else. Floats that JSON cannot hold (NaN, ±inf — a cancelled beam's score) are
written as the strings "NaN", "Infinity", "-Infinity" and read back as floats.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from functools import cache
from typing import Any, Union

from glmchat import protocol
from glmchat.errors import UsageError
from glmchat.params import GenerationParams

EVENT_TYPES: tuple[type, ...] = (
    protocol.Ready, protocol.LoadProgress, protocol.Loaded, protocol.Token, protocol.StepStats,
    protocol.Memory, protocol.Finished, protocol.Failed,
)
REQUEST_TYPES: tuple[type, ...] = (
    protocol.Load, protocol.Generate, protocol.Cancel, protocol.GetStats, protocol.Shutdown,
)
RECORD_TYPES: tuple[type, ...] = (
    protocol.ModelSpec, protocol.ChatMessage, protocol.ModelInfo, protocol.Placement,
    protocol.DeviceMemory, protocol.Beam, protocol.Timings, protocol.Span,
    protocol.GenerationResult, GenerationParams,
)
WIRE_TYPES: dict[str, type] = {cls.__name__: cls for cls in
                               (*EVENT_TYPES, *REQUEST_TYPES, *RECORD_TYPES)}
_SPECIAL_FLOATS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class WireError(UsageError):
    """A message that is not a well-formed glmchat protocol object."""


# ---- encoding ---------------------------------------------------------------------------------


def to_wire(obj: Any) -> Any:
    """A JSON-ready value: dataclasses become tagged dicts, recursively."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out: dict[str, Any] = {"type": type(obj).__name__}
        for f in dataclasses.fields(obj):
            out[f.name] = to_wire(getattr(obj, f.name))
        return out
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, list | tuple):
        return [to_wire(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_wire(v) for k, v in obj.items()}
    return obj


def dumps(obj: Any) -> str:
    """One line of JSON (no newlines inside), for JSON Lines and SSE ``data:`` fields."""
    return json.dumps(to_wire(obj), separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


# ---- decoding ---------------------------------------------------------------------------------


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(protocol) | {"GenerationParams": GenerationParams})


def from_wire(value: Any, expected: Any = None) -> Any:
    """Rebuild a protocol object from ``to_wire``'s output. ``expected``: a type (or a union of
    types) the value must be; None accepts any WIRE_TYPES object. Raises WireError."""
    if expected is None:
        if not isinstance(value, dict) or value.get("type") not in WIRE_TYPES:
            raise WireError(f"expected a glmchat protocol object, got {_brief(value)}")
        return _decode_dataclass(value, WIRE_TYPES[value["type"]])
    return _decode(value, expected, "message")


def loads(line: str | bytes, expected: Any = None) -> Any:
    try:
        value = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError(f"not JSON: {exc}") from None
    return from_wire(value, expected)


def _decode(value: Any, hint: Any, where: str) -> Any:
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        if isinstance(value, dict) and "type" in value:
            for option in options:
                if isinstance(option, type) and option.__name__ == value["type"]:
                    return _decode_dataclass(value, option)
        for option in options:
            if option is type(None):
                continue
            try:
                return _decode(value, option, where)
            except WireError:
                continue
        raise WireError(f"{where}: {_brief(value)} is not a {hint}")
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise WireError(f"{where}: expected a list, got {_brief(value)}")
        return [_decode(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _key, item = typing.get_args(hint) or (Any, Any)
        if not isinstance(value, dict):
            raise WireError(f"{where}: expected an object, got {_brief(value)}")
        return {str(k): _decode(v, item, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_dataclass(value, hint)
    if hint is float:
        if isinstance(value, str) and value in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise WireError(f"{where}: expected a number, got {_brief(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise WireError(f"{where}: expected an integer, got {_brief(value)}")
    if hint is bool or hint is str:
        if type(value) is hint:
            return value
        raise WireError(f"{where}: expected a {hint.__name__}, got {_brief(value)}")
    if hint is type(None):
        if value is None:
            return None
        raise WireError(f"{where}: expected null, got {_brief(value)}")
    raise WireError(f"{where}: cannot decode a {hint}")


def _decode_dataclass(value: Any, cls: type) -> Any:
    name = cls.__name__
    if not isinstance(value, dict):
        raise WireError(f"expected a {name} object, got {_brief(value)}")
    if value.get("type", name) != name:
        raise WireError(f"expected a {name}, got a {value.get('type')!r}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in value:
            kwargs[f.name] = _decode(value[f.name], hints[f.name], f"{name}.{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise WireError(f"{name} is missing its field {f.name!r}")
    return cls(**kwargs)


def _brief(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
