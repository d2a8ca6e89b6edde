"""OpenAI-compatible requests and responses for `glmchat serve`, without any HTTP.

``parse_request`` turns a /v1/chat/completions or /v1/completions body into GenerationParams
(OpenAI's names, plus vLLM's for what OpenAI lacks: top_k, min_tokens, use_beam_search,
length_penalty, return_token_ids); ``ApiError`` is an OpenAI-style error body with its status;
the ``*_response`` and ``*_chunk`` functions shape results the way the OpenAI API does.

Status codes: 400 the body is not a JSON object, or a value is out of range (a cap, the context
length); 404 an unknown model or path; 413 the body is too large; 422 a field has the wrong type
or asks for something this server does not do (logprobs, tools); 401 a missing or wrong key;
503 the model is not loaded, its worker stopped, or the queue is full.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from glmchat.params import GenerationParams, param_problems
from glmchat.protocol import ChatMessage, GenerationResult

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_N = 16
MAX_STOPS = 16
# Fields whose meaning we cannot honour: refusing is better than an answer that ignores them.
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "tools", "tool_choice", "functions",
               "function_call", "logit_bias", "suffix", "response_format", "prompt_logprobs")


class ApiError(Exception):
    """An OpenAI-style error: ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error",
             404: "not_found_error", 405: "invalid_request_error",
             413: "invalid_request_error", 422: "invalid_request_error",
             503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    params: GenerationParams
    chat: bool
    model: str
    n: int = 1
    prompt: str = ""
    messages: list[ChatMessage] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    return_token_ids: bool = False

    @property
    def beam(self) -> bool:
        return self.params.strategy == "beam"


@dataclass
class Limits:
    """What a request may ask for on this server."""

    max_tokens: int = 2048  # a request asking for more is refused


def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise ApiError(422, f"{name} must be {what}, not {value!r}", param=name)
    return value


def parse_request(body: Any, *, chat: bool, model_ids: tuple[str, ...],
                  limits: Limits) -> ParsedRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _get(body, "model", (str,), "a string") or model_ids[0]
    if model not in model_ids:
        raise ApiError(404, f"The model `{model}` does not exist; this server serves "
                            f"`{model_ids[0]}` (GET /v1/models)", param="model",
                       code="model_not_found")
    for name in UNSUPPORTED:
        value = body.get(name)
        if value not in (None, False, 0, [], {}) and not (
                name == "response_format" and isinstance(value, dict)
                and value.get("type") == "text"):
            raise ApiError(422, f"{name} is not supported by glmchat serve", param=name)
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), "a number") not in (None, 0):
            raise ApiError(422, f"{name} is not supported by glmchat serve; use "
                                "no_repeat_ngram_size", param=name)

    parsed = ParsedRequest(params=GenerationParams(), chat=chat, model=model)
    if chat:
        parsed.messages = _messages(body.get("messages"))
    else:
        parsed.prompt = _prompt(body.get("prompt"))
    parsed.stream = bool(_get(body, "stream", (bool,), "true or false"))
    options = _get(body, "stream_options", (dict,), "an object") or {}
    parsed.include_usage = bool(_get(options, "include_usage", (bool,), "true or false"))
    parsed.return_token_ids = bool(_get(body, "return_token_ids", (bool,), "true or false"))
    parsed.n = _get(body, "n", (int,), "an integer") or 1
    if not 1 <= parsed.n <= MAX_N:
        raise ApiError(400, f"n = {parsed.n} is out of range: 1 to {MAX_N}", param="n")
    parsed.params = _params(body, parsed.n, limits)
    return parsed


def _params(body: dict[str, Any], n: int, limits: Limits) -> GenerationParams:
    max_tokens = _get(body, "max_completion_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = _get(body, "max_tokens", (int,), "an integer")
    if max_tokens is None:
        max_tokens = limits.max_tokens
    elif max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens = {max_tokens} is more than this server allows "
                            f"({limits.max_tokens}; glmchat serve --max-tokens)",
                       param="max_tokens")
    temperature = _get(body, "temperature", (int, float), "a number")
    temperature = 1.0 if temperature is None else float(temperature)
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature = {temperature} is out of range: 0 to 2",
                       param="temperature")
    top_p = _get(body, "top_p", (int, float), "a number")
    top_k = _get(body, "top_k", (int,), "an integer")
    seed = _get(body, "seed", (int,), "an integer")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (not isinstance(stops, list) or len(stops) > MAX_STOPS
                              or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(422, f"stop must be a string or a list of up to {MAX_STOPS} non-empty "
                            "strings", param="stop")
    beam = bool(_get(body, "use_beam_search", (bool,), "true or false"))
    best_of = _get(body, "best_of", (int,), "an integer")
    values: dict[str, Any] = {
        "strategy": "beam" if beam else ("greedy" if temperature == 0 else "sample"),
        "max_new_tokens": max_tokens,
        "min_new_tokens": _get(body, "min_tokens", (int,), "an integer") or 0,
        "temperature": temperature if temperature > 0 else 1.0,
        "top_p": 1.0 if top_p is None else float(top_p),
        "top_k": 0 if top_k is None or top_k < 0 else top_k,
        "seed": -1 if seed is None else seed,
        "stop": list(stops or []),
        "length_penalty": float(_get(body, "length_penalty", (int, float), "a number") or 1.0),
        "early_stopping": bool(_get(body, "early_stopping", (bool,), "true or false")),
        "no_repeat_ngram_size":
            _get(body, "no_repeat_ngram_size", (int,), "an integer") or 0,
    }
    if beam:
        values["num_beams"] = max(n, best_of or n)
        values["num_return_sequences"] = n
    problems = param_problems(values)
    if problems:
        raise ApiError(422, problems[0].replace("max_new_tokens", "max_tokens")
                       .replace("min_new_tokens", "min_tokens"))
    return GenerationParams.from_dict(values)


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise ApiError(422, f"{where}: only text content parts are supported",
                               param="messages")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise ApiError(422, f"{where}: content must be a string or a list of text parts",
                   param="messages")


def _messages(value: Any) -> list[ChatMessage]:
    if not isinstance(value, list) or not value:
        raise ApiError(422, "messages must be a non-empty list of {role, content} objects",
                       param="messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(422, f"{where} needs a role: system, developer, user or assistant",
                           param="messages")
        if message.get("tool_calls"):
            raise ApiError(422, f"{where}: tool calls are not supported", param="messages")
        out.append(ChatMessage(ROLES[message["role"]], _text_of(message.get("content"), where)))
    return out


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise ApiError(422, "prompt must be a string (one prompt per request)", param="prompt")
    return value


# ---- responses ---------------------------------------------------------------------------------


def completion_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


@dataclass
class Choice:
    text: str
    token_ids: list[int]
    finish_reason: str


def choices_of(parsed: ParsedRequest, results: list[GenerationResult]) -> list[Choice]:
    """One choice per result; beam search: one per returned beam of the single result."""
    if parsed.beam:
        result = results[0]
        finish = FINISH_REASONS.get(result.finish_reason, result.finish_reason)
        beams = result.beams or []
        return [Choice(b.text, b.token_ids, finish) for b in beams] or [
            Choice(result.text, result.token_ids, finish)]
    return [Choice(r.text, r.token_ids, FINISH_REASONS.get(r.finish_reason, r.finish_reason))
            for r in results]


def usage(results: list[GenerationResult], choices: list[Choice]) -> dict[str, int]:
    prompt = len(results[0].prompt_token_ids) if results else 0
    completion = sum(len(c.token_ids) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def full_response(parsed: ParsedRequest, request_id: str, results: list[GenerationResult],
                  created: int | None = None) -> dict[str, Any]:
    choices = choices_of(parsed, results)
    out: dict[str, Any] = {
        "id": request_id, "object": "chat.completion" if parsed.chat else "text_completion",
        "created": created or int(time.time()), "model": parsed.model, "choices": []}
    for i, choice in enumerate(choices):
        entry: dict[str, Any] = {"index": i, "finish_reason": choice.finish_reason,
                                 "logprobs": None}
        if parsed.chat:
            entry["message"] = {"role": "assistant", "content": choice.text}
        else:
            entry["text"] = choice.text
        if parsed.return_token_ids:
            entry["token_ids"] = choice.token_ids
        out["choices"].append(entry)
    if parsed.return_token_ids and results:
        out["prompt_token_ids"] = results[0].prompt_token_ids
    out["usage"] = usage(results, choices)
    return out


def chunk(parsed: ParsedRequest, request_id: str, created: int, index: int, *,
          text: str | None = None, role: bool = False, finish_reason: str | None = None,
          token_ids: list[int] | None = None) -> dict[str, Any]:
    """One streamed chunk for one choice."""
    entry: dict[str, Any] = {"index": index, "logprobs": None, "finish_reason": finish_reason}
    if parsed.chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        entry["delta"] = delta
    else:
        entry["text"] = text or ""
    if token_ids is not None:
        entry["token_ids"] = token_ids
    out: dict[str, Any] = {
        "id": request_id, "object": "chat.completion.chunk" if parsed.chat
        else "text_completion", "created": created, "model": parsed.model, "choices": [entry]}
    if parsed.include_usage:
        out["usage"] = None
    return out


def usage_chunk(parsed: ParsedRequest, request_id: str, created: int,
                results: list[GenerationResult]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk" if parsed.chat
            else "text_completion", "created": created, "model": parsed.model, "choices": [],
            "usage": usage(results, choices_of(parsed, results))}
