"""The generations behind one OpenAI-compatible request of `glmchat serve`.

One generation for beam search (its beams are the choices), else ``n`` in a row (sampling seeds
seed, seed+1, …). A watcher task cancels the running one when the client goes away, so a
request waiting in the queue or streaming stops within a token of its client leaving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from glmchat.protocol import Event, Failed, Finished, GenerationResult
from glmchat.serve_openai import ApiError, ParsedRequest, choices_of, completion_id
from glmchat.serve_openai import chunk as openai_chunk
from glmchat.serve_worker import Job

if TYPE_CHECKING:
    from glmchat.serve_app import Server


class OpenAIRuns:
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


def finish_chunks(runs: OpenAIRuns, index: int, result: GenerationResult) -> list[dict[str, Any]]:
    """The chunks that end a choice; beam search sends its beams (one choice each) here."""
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
