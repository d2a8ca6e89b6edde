"""The HTTP face of `glmchat serve`: a Starlette app over one ServedWorker.

    GET  /health                   200 when the model is loaded and its worker alive, else 503
    GET  /metrics                  Prometheus text (glmchat/serve_metrics.py)
    GET  /v1/models                the served model, with its context length
    POST /v1/chat/completions      OpenAI-compatible (glmchat/serve_openai.py), SSE when stream
    POST /v1/completions           the same for raw text (no chat template)
    POST /glmchat/v1/generate      the worker protocol's own events as JSON lines (or SSE)
    POST /glmchat/v1/cancel        {"id": …} stops one native generation, keeping its result
    GET  /glmchat/v1/model         the served model's Loaded event (info and placement)
    GET  /glmchat/v1/memory        the latest Memory event

Every path but /health needs the API key when the server has one (a Bearer token, compared
in constant time). A client that goes away cancels its own generation: a watcher task sees the
disconnect while the stream waits, and the worker stops before its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from glmchat import serve_metrics, wire
from glmchat.errors import GlmchatError
from glmchat.params import param_problems
from glmchat.protocol import Event, Failed, Finished, Generate, GenerationResult, Token
from glmchat.serve_openai import (
    ApiError,
    Limits,
    ParsedRequest,
    completion_id,
    full_response,
    parse_request,
    usage_chunk,
)
from glmchat.serve_openai import chunk as openai_chunk
from glmchat.serve_worker import Job, ServedWorker

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class ServeSettings:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    limits: Limits = dataclasses.field(default_factory=Limits)


def error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


class Server:
    def __init__(self, worker: ServedWorker, settings: ServeSettings) -> None:
        self.worker = worker
        self.settings = settings
        self.native_jobs: dict[str, Job] = {}
        assert worker.loaded is not None
        info = worker.loaded.info
        # the model's name, and what it was loaded from ("default", a path) as an alias
        self.model_ids = tuple(dict.fromkeys((info.name, info.source)))

    # ---- plumbing ------------------------------------------------------------------------------

    def guarded(self, handler: Handler, open_access: bool = False) -> Handler:
        async def run(request: Request) -> Response:
            try:
                if not open_access:
                    self.authorize(request)
                return await handler(request)
            except ApiError as error:
                return error_response(error)
        return run

    def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "this server needs an API key: send 'Authorization: Bearer KEY'",
                           code="missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "the API key is not valid for this server",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is {declared} bytes; this server takes at "
                                f"most {limit} (glmchat serve --max-body-bytes)")
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise ApiError(413, f"the request body is over {limit} bytes "
                                        "(glmchat serve --max-body-bytes)")
        except ClientDisconnect:
            raise ApiError(400, "the client went away before sending the whole body") from None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    def submit(self, params: Any, **kwargs: Any) -> Job:
        try:
            return self.worker.submit(params, **kwargs)
        except GlmchatError as exc:
            raise ApiError(503, str(exc)) from None

    # ---- small endpoints -----------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if self.worker.healthy:
            return JSONResponse({"status": "ok", "running": self.worker.running,
                                 "waiting": self.worker.waiting})
        return JSONResponse({"status": "unavailable",
                             "error": self.worker.crash or "the model is not loaded"},
                            status_code=503)

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(serve_metrics.render(self.worker),
                                 media_type="text/plain; version=0.0.4")

    def model_card(self) -> dict[str, Any]:
        assert self.worker.loaded is not None
        info = self.worker.loaded.info
        return {"id": info.name, "object": "model", "created": int(self.worker.started_at),
                "owned_by": "glmchat", "root": info.source,
                "context_length": info.context_length, "max_model_len": info.context_length}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.model_card()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["model"] not in self.model_ids:
            raise ApiError(404, f"The model `{request.path_params['model']}` does not exist",
                           code="model_not_found")
        return JSONResponse(self.model_card())

    async def native_model(self, request: Request) -> Response:
        memory = self.worker.memory
        return JSONResponse({"loaded": wire.to_wire(self.worker.loaded),
                             "memory": wire.to_wire(memory) if memory else None})

    async def native_memory(self, request: Request) -> Response:
        if self.worker.memory is None:
            raise ApiError(503, "no memory report yet")
        return JSONResponse(wire.to_wire(self.worker.memory))

    # ---- OpenAI-compatible generation ----------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        return await self.openai(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self.openai(request, chat=False)

    async def openai(self, request: Request, chat: bool) -> Response:
        parsed = parse_request(await self.read_json(request), chat=chat,
                               model_ids=self.model_ids, limits=self.settings.limits)
        runs = _Runs(self, request, parsed)
        first = await runs.first_event()  # errors before any output keep their status code
        if isinstance(first, Failed):
            await runs.close()
            raise ApiError(400 if first.usage else 503, first.error)
        if not parsed.stream:
            try:
                results = [result async for result in runs.results()]
            finally:
                await runs.close()
            if runs.disconnected:
                return Response(status_code=499)
            return JSONResponse(full_response(parsed, runs.request_id, results))
        return StreamingResponse(self.openai_stream(runs), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    async def openai_stream(self, runs: _Runs) -> AsyncIterator[bytes]:
        parsed, rid, created = runs.parsed, runs.request_id, runs.created
        results: list[GenerationResult] = []
        try:
            async for index, event in runs.events():
                if isinstance(event, Token) and not event.provisional and event.text:
                    if index not in runs.opened:
                        runs.opened.add(index)
                        yield _sse(json.dumps(openai_chunk(parsed, rid, created, index,
                                                           text="", role=True)))
                    yield _sse(json.dumps(openai_chunk(parsed, rid, created, index,
                                                       text=event.text)))
                elif isinstance(event, Failed):
                    yield _sse(json.dumps(ApiError(400 if event.usage else 503,
                                                   event.error).body()))
                    break
                elif isinstance(event, Finished):
                    results.append(event.result)
                    for piece in _finish_chunks(runs, index, event.result):
                        yield _sse(json.dumps(piece))
            if parsed.include_usage and results:
                yield _sse(json.dumps(usage_chunk(parsed, rid, created, results)))
            yield _sse("[DONE]")
        finally:
            await runs.close()

    # ---- the native event stream ---------------------------------------------------------------

    async def native_generate(self, request: Request) -> Response:
        body = await self.read_json(request)
        try:
            generate: Generate = wire.from_wire(body, Generate)
        except wire.WireError as exc:
            raise ApiError(422, f"not a Generate request: {exc}") from None
        problems = param_problems(generate.params.to_dict())
        if problems:
            raise ApiError(422, problems[0])
        cap = self.settings.limits.max_tokens
        if generate.params.max_new_tokens > cap:
            raise ApiError(400, f"max_new_tokens = {generate.params.max_new_tokens} is more "
                                f"than this server allows ({cap}; glmchat serve --max-tokens)")
        job = self.submit(generate.params, prompt=generate.prompt, messages=generate.messages,
                          raw=generate.raw)
        self.native_jobs[job.id] = job
        sse = "text/event-stream" in request.headers.get("accept", "")
        return StreamingResponse(
            self.native_stream(request, job, generate.id, sse),
            media_type="text/event-stream" if sse else "application/x-ndjson",
            headers={"X-Glmchat-Request-Id": job.id, "Cache-Control": "no-cache"})

    async def native_stream(self, request: Request, job: Job, client_id: str,
                            sse: bool) -> AsyncIterator[bytes]:
        watcher = asyncio.create_task(self._watch_disconnect(request, lambda: [job]))
        try:
            while True:
                event = await job.events.get()
                if getattr(event, "id", None) == job.id:
                    event = dataclasses.replace(cast(Any, event), id=client_id)
                line = wire.dumps(event)
                yield _sse(line) if sse else (line + "\n").encode()
                if isinstance(event, Finished | Failed):
                    break
            if sse:
                yield _sse("[DONE]")
        finally:
            watcher.cancel()
            self.native_jobs.pop(job.id, None)
            if not job.done:
                self.worker.cancel(job)

    async def native_cancel(self, request: Request) -> Response:
        body = await self.read_json(request)
        job_id = body.get("id") if isinstance(body, dict) else None
        job = self.native_jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise ApiError(404, f"no running generation {job_id!r}", param="id")
        self.worker.cancel(job)
        return JSONResponse({"id": job_id, "cancelled": True})

    async def _watch_disconnect(self, request: Request,
                                current: Callable[[], list[Job]]) -> None:
        """Cancel the request's job(s) when its client goes away."""
        with contextlib.suppress(Exception):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    break
            for job in current():
                self.worker.cancel(job)

    # ---- the app -------------------------------------------------------------------------------

    def app(self) -> Starlette:
        g = self.guarded
        routes = [
            Route("/health", g(self.health, open_access=True), methods=["GET"]),
            Route("/metrics", g(self.metrics), methods=["GET"]),
            Route("/v1/models", g(self.models), methods=["GET"]),
            Route("/v1/models/{model:path}", g(self.model), methods=["GET"]),
            Route("/v1/chat/completions", g(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", g(self.completions), methods=["POST"]),
            Route("/glmchat/v1/generate", g(self.native_generate), methods=["POST"]),
            Route("/glmchat/v1/cancel", g(self.native_cancel), methods=["POST"]),
            Route("/glmchat/v1/model", g(self.native_model), methods=["GET"]),
            Route("/glmchat/v1/memory", g(self.native_memory), methods=["GET"]),
        ]

        async def http_error(request: Request, exc: Exception) -> Response:
            status = exc.status_code if isinstance(exc, HTTPException) else 500
            what = {404: f"no such endpoint: {request.url.path} (see GET /v1/models)",
                    405: f"{request.method} is not allowed on {request.url.path}"}
            return error_response(ApiError(status, what.get(status, str(exc))))

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


class _Runs:
    """The generations behind one OpenAI request: one for beam search (its beams are the
    choices), else ``n`` in a row (sampling seeds seed, seed+1, …)."""

    def __init__(self, server: Server, request: Request, parsed: ParsedRequest) -> None:
        self.server = server
        self.parsed = parsed
        self.request_id = completion_id(parsed.chat)
        self.created = int(time.time())
        self.count = 1 if parsed.beam else parsed.n
        self.job: Job | None = None
        self.index = 0
        self.opened: set[int] = set()
        self.disconnected = False
        self._pending: Event | None = None
        self._watcher = asyncio.create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        await self.server._watch_disconnect(request, lambda: [self.job] if self.job else [])
        self.disconnected = True

    def _start(self, index: int) -> Job:
        params = self.parsed.params
        if index > 0 and params.seed >= 0:
            params = params.replace(seed=params.seed + index)
        kwargs: dict[str, Any] = ({"messages": self.parsed.messages} if self.parsed.chat
                                  else {"prompt": self.parsed.prompt, "raw": True})
        self.job = self.server.submit(params, **kwargs)
        return self.job

    async def first_event(self) -> Event:
        job = self._start(0)
        self._pending = await job.events.get()
        return self._pending

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        for index in range(self.count):
            job = self.job if index == 0 and self.job is not None else self._start(index)
            while True:
                if index == 0 and self._pending is not None:
                    event, self._pending = self._pending, None
                else:
                    event = await job.events.get()
                yield index, event
                if isinstance(event, Finished | Failed):
                    break
            if isinstance(event, Failed) or self.disconnected:
                return

    async def results(self) -> AsyncIterator[GenerationResult]:
        async for _, event in self.events():
            if isinstance(event, Failed):
                raise ApiError(400 if event.usage else 503, event.error)
            if isinstance(event, Finished):
                yield event.result

    async def close(self) -> None:
        self._watcher.cancel()
        if self.job is not None and not self.job.done:
            self.server.worker.cancel(self.job)


def _finish_chunks(runs: _Runs, index: int, result: GenerationResult) -> list[dict[str, Any]]:
    """The chunks that end a choice; beam search sends its beams (one choice each) here."""
    from glmchat.serve_openai import choices_of

    parsed, rid, created = runs.parsed, runs.request_id, runs.created
    out = []
    if parsed.beam:
        for i, choice in enumerate(choices_of(parsed, [result])):
            out.append(openai_chunk(parsed, rid, created, i, text=choice.text, role=True))
            out.append(openai_chunk(parsed, rid, created, i, text="" if parsed.chat else None,
                                    finish_reason=choice.finish_reason,
                                    token_ids=choice.token_ids if parsed.return_token_ids
                                    else None))
        return out
    (choice,) = choices_of(parsed, [result])
    if index not in runs.opened:
        runs.opened.add(index)
        out.append(openai_chunk(parsed, rid, created, index, text="", role=True))
    last = openai_chunk(parsed, rid, created, index, finish_reason=choice.finish_reason,
                        token_ids=choice.token_ids if parsed.return_token_ids else None)
    if parsed.return_token_ids:
        last["prompt_token_ids"] = result.prompt_token_ids
    out.append(last)
    return out
