"""Generation parameters: one dataclass shared by config, CLI, protocol and sessions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from glmchat.errors import UsageError

Strategy = Literal["greedy", "sample", "beam"]
STRATEGIES: tuple[str, ...] = ("greedy", "sample", "beam")
BEAM_SCORERS: tuple[str, ...] = ("auto", "transformers", "glm130b")


@dataclass
class GenerationParams:
    strategy: str = "greedy"
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.9
    seed: int = -1
    num_beams: int = 4
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    no_repeat_ngram_size: int = 0
    stop: list[str] = field(default_factory=list)
    system_prompt: str = ""
    beam_scorer: str = "auto"  # "auto" = the model family's own; "transformers" | "glm130b"

    def validate(self) -> GenerationParams:
        """Raise UsageError naming the first bad value and what is allowed; return self."""
        problems = param_problems(dataclasses.asdict(self))
        if problems:
            raise UsageError(problems[0])
        return self

    def replace(self, **changes: Any) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationParams:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


PARAM_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(GenerationParams))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def param_problems(values: dict[str, Any]) -> list[str]:
    """Every problem with a (possibly partial) dict of generation params, as readable sentences."""
    out: list[str] = []

    def check(name: str, ok: bool, allowed: str) -> None:
        if name in values and not ok:
            out.append(f"{name} = {values[name]!r} is invalid: {allowed}")

    v = values
    check("strategy", v.get("strategy") in STRATEGIES, "use greedy, sample or beam")
    check("max_new_tokens", _is_int(v.get("max_new_tokens")) and v["max_new_tokens"] >= 1,
          "use an integer >= 1")
    check("min_new_tokens", _is_int(v.get("min_new_tokens")) and v["min_new_tokens"] >= 0,
          "use an integer >= 0")
    check("temperature", _is_number(v.get("temperature")) and v["temperature"] > 0,
          "use a number > 0 (greedy decoding is --strategy greedy)")
    check("top_k", _is_int(v.get("top_k")) and v["top_k"] >= 0, "use an integer >= 0 (0 = off)")
    check("top_p", _is_number(v.get("top_p")) and 0 < v["top_p"] <= 1, "use a number in (0, 1]")
    check("seed", _is_int(v.get("seed")) and -1 <= v["seed"] < 2**63,
          "use an integer >= 0, or -1 for a fresh seed")
    check("num_beams", _is_int(v.get("num_beams")) and 1 <= v["num_beams"] <= 64,
          "use an integer from 1 to 64")
    check("num_return_sequences",
          _is_int(v.get("num_return_sequences")) and v["num_return_sequences"] >= 1,
          "use an integer >= 1")
    check("length_penalty", _is_number(v.get("length_penalty")), "use a number")
    check("early_stopping", isinstance(v.get("early_stopping"), bool), "use true or false")
    check("no_repeat_ngram_size",
          _is_int(v.get("no_repeat_ngram_size")) and v["no_repeat_ngram_size"] >= 0,
          "use an integer >= 0 (0 = off)")
    check("stop", isinstance(v.get("stop"), list)
          and all(isinstance(s, str) and s for s in v["stop"]), "use a list of non-empty strings")
    check("system_prompt", isinstance(v.get("system_prompt"), str), "use a string")
    check("beam_scorer", v.get("beam_scorer") in BEAM_SCORERS,
          "use " + ", ".join(BEAM_SCORERS) + " (auto = the model family's own)")
    if not out and {"num_return_sequences", "num_beams", "strategy"} <= v.keys():
        if v["strategy"] == "beam" and v["num_return_sequences"] > v["num_beams"]:
            out.append(f"num_return_sequences = {v['num_return_sequences']} is invalid: "
                       f"it cannot exceed num_beams ({v['num_beams']})")
        if v["strategy"] != "beam" and v["num_return_sequences"] > 1:
            out.append("num_return_sequences > 1 needs --strategy beam")
    if (not out and {"min_new_tokens", "max_new_tokens"} <= v.keys()
            and v["min_new_tokens"] > v["max_new_tokens"]):
        out.append(f"min_new_tokens = {v['min_new_tokens']} is invalid: "
                   f"it cannot exceed max_new_tokens ({v['max_new_tokens']})")
    return out
