"""Model families: "which architecture" behind one small interface.

A family knows how to load a model from a source, how to turn a request into prompt ids, which
requests are blank-filling ones and how it fills them, and which beam scorer it uses by default.
The engine asks the family of the loaded model and never tests for one by name. Members:

  transformers  every causal LM that transformers loads (family_transformers.py)
  glm130b       GLM-130B's official checkpoint, in-house model (family_glm130b.py)

A third family is a new file that implements ``ModelFamily`` and is listed in ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from glmchat.infill import MaskedText
from glmchat.protocol import Generate, GenerationResult, ModelInfo, ModelSpec, Placement

from .clock import RunContext

if TYPE_CHECKING:
    from .offload import OffloadRuntime

Progress = Callable[[int, int, str], None]


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    placement: Placement
    offload: OffloadRuntime | None = None  # our runtime, when it streams layers
    family: ModelFamily | None = None  # None only for code that builds one by hand


class ModelFamily(Protocol):
    name: str
    default_beam_scorer: str  # "transformers" | "glm130b"

    def claims(self, source: str) -> bool:
        """Whether this family loads ``source`` (what the user passed as --model)."""
        ...

    def load(self, spec: ModelSpec, progress: Progress) -> LoadedModel: ...

    def prompt_ids(self, loaded: LoadedModel, request: Generate) -> list[int]: ...

    def blanks(self, loaded: LoadedModel, request: Generate) -> MaskedText | None:
        """The request's blanks when it is to be filled by ``fill_blanks``; None: plain."""
        ...

    def fill_blanks(self, ctx: RunContext, request: Generate, masked: MaskedText,
                    should_stop: Callable[[], bool]) -> GenerationResult: ...


def families() -> list[ModelFamily]:
    from .family_glm130b import Glm130bFamily
    from .family_transformers import TransformersFamily

    return [Glm130bFamily(), TransformersFamily()]  # first that claims a source wins


def for_source(source: str) -> ModelFamily:
    for family in families():
        if family.claims(source):
            return family
    raise AssertionError("the transformers family claims every source")
