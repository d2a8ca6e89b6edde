"""The conveniences every backend offers over its own ``send``/``recv``/``new_id``: one
definition for the local worker (client.py) and the remote backends (remote_events.py,
remote_native.py), so that the front ends see the same load/stream semantics from each."""

from __future__ import annotations

from collections.abc import Iterator

from glmchat.errors import GlmchatError, UsageError
from glmchat.params import GenerationParams
from glmchat.protocol import (
    Cancel,
    ChatMessage,
    Event,
    Failed,
    Finished,
    Generate,
    GetStats,
    Load,
    Loaded,
    ModelSpec,
    Request,
)


class EventConveniences:
    def keep_finished(self, event: Finished) -> None:
        """Keep a generation's Finished as it arrives, so that an interrupt delivered just after
        it was read (a Ctrl+C between ``recv`` and its caller) cannot lose the reply."""
        kept: dict[str, Finished] = self.__dict__.setdefault("_finished", {})
        kept[event.id] = event
        while len(kept) > 8:  # the newest few are enough
            del kept[next(iter(kept))]

    def finished_for(self, gen_id: str) -> Finished | None:
        """This generation's Finished, if it has arrived."""
        kept: dict[str, Finished] = self.__dict__.get("_finished", {})
        return kept.get(gen_id)

    def send(self, request: Request) -> None:
        raise NotImplementedError

    def recv(self, timeout: float | None = None) -> Event | None:
        raise NotImplementedError

    def new_id(self) -> str:
        raise NotImplementedError

    def load(self, spec: ModelSpec) -> Iterator[Event]:
        """Send Load; yield events up to and including Loaded. A failed load raises."""
        self.send(Load(spec))
        while True:
            event = self.recv()
            if event is None:
                continue
            if isinstance(event, Failed) and event.id is None:
                raise (UsageError if event.usage else GlmchatError)(event.error)
            yield event
            if isinstance(event, Loaded):
                return

    def generate(self, params: GenerationParams, *, prompt: str = "",
                 messages: list[ChatMessage] | None = None, raw: bool = False) -> str:
        gen_id = self.new_id()
        self.send(Generate(id=gen_id, params=params, prompt=prompt, messages=messages or [],
                           raw=raw))
        return gen_id

    def stream(self, gen_id: str) -> Iterator[Event]:
        """Events up to and including this generation's Finished; its Failed raises."""
        while True:
            event = self.recv()
            if event is None:
                continue
            if isinstance(event, Failed) and event.id in (gen_id, None):
                raise (UsageError if event.usage else GlmchatError)(event.error)
            if isinstance(event, Finished):
                self.keep_finished(event)
            yield event
            if isinstance(event, Finished) and event.id == gen_id:
                return

    def cancel(self, gen_id: str) -> None:
        self.send(Cancel(gen_id))

    def request_stats(self) -> None:
        self.send(GetStats())
