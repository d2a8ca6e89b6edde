"""The GLM-130B family (placeholder until the loader lands): claims nothing yet."""

from __future__ import annotations

from collections.abc import Callable

from glmchat.infill import MaskedText
from glmchat.protocol import Generate, GenerationResult, ModelSpec

from .clock import RunContext
from .family import LoadedModel, Progress


class Glm130bFamily:
    name = "glm130b"
    default_beam_scorer = "glm130b"

    def claims(self, source: str) -> bool:
        return False

    def load(self, spec: ModelSpec, progress: Progress) -> LoadedModel:
        raise NotImplementedError

    def prompt_ids(self, loaded: LoadedModel, request: Generate) -> list[int]:
        raise NotImplementedError

    def blanks(self, loaded: LoadedModel, request: Generate) -> MaskedText | None:
        raise NotImplementedError

    def fill_blanks(self, ctx: RunContext, request: Generate, masked: MaskedText,
                    should_stop: Callable[[], bool]) -> GenerationResult:
        raise NotImplementedError
