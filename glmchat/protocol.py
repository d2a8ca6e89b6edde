"""The worker protocol: typed requests (front end → worker) and events (worker → front end).

Plain dataclasses, pickled over a multiprocessing Pipe. Both sides import this module; it must
never import torch. Events that belong to one generation carry its ``id``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glmchat.params import GenerationParams

# --------------------------------------------------------------------------------------------
# shared records


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how to place it."""

    path: str = "default"  # "default" = the embedded SmolLM2; else a directory or .gguf file
    dtype: str = "auto"
    gpu_memory: float | None = None  # GiB per GPU; None = what is free
    cpu_memory: float | None = None  # GiB; None = what is available
    offload_dir: str = ""  # "" = the cache dir's offload/
    offload_runtime: str = "glmchat"
    offload_reader: str = "auto"  # glmchat runtime, CPU compute: "auto" | "mmap" | "direct"
    threads: int = 0
    tokenizer: str = ""  # GLM-130B: ice_text.model; "" = the checkpoint dir, ~/.icetk_models
    num_heads: int = 0  # GLM-130B: attention heads; 0 = from the checkpoint
    quantize: str = "none"  # weight-only quantized decoder layers: "none" | "int8" | "int4"
    quant_group: int = 32  # int4: group size along the input dimension


@dataclass
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class ModelInfo:
    name: str
    source: str  # what the user asked for ("default", a path)
    weights_dir: str  # the safetensors directory actually loaded
    digest: str  # sha256 of the source weights
    architecture: str
    n_params: int
    dtype: str
    n_layers: int
    context_length: int
    has_chat_template: bool
    eos_token_ids: list[int] = field(default_factory=list)
    quantize: str = "none"  # the weights' scheme: "none" | "int8" | "int4-g32" ...
    backend: str = ""  # the server that generates (URL without credentials); "" = local


@dataclass
class Placement:
    """Where the model lives: each module's device and totals per tier."""

    device_map: dict[str, str]  # module name → "cuda:0" | "cpu" | "disk"
    layers_per_tier: dict[str, int]  # tier → number of decoder layers
    bytes_per_tier: dict[str, int]  # tier → parameter bytes
    n_layers: int
    runtime: str  # "resident" | "accelerate" | "glmchat"
    gpu_available: bool
    quantize: str = "none"  # the weights' scheme: "none" | "int8" | "int4-g32" ...
    notes: list[str] = field(default_factory=list)  # for the user: a runtime fallen back from


@dataclass
class DeviceMemory:
    name: str  # "cuda:0 (NVIDIA H100)"
    used: int
    total: int


@dataclass
class Beam:
    text: str
    token_ids: list[int]
    score: float


@dataclass
class Timings:
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    ttft_s: float = 0.0  # request received → first token out
    decode_tokens: int = 0
    decode_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0


@dataclass
class Span:
    """A filled infill blank: characters [start, end) of the result text."""

    start: int
    end: int
    mask: str  # "[MASK]" | "[sMASK]" | "[gMASK]"
    score: float | None = None  # the fill's score (nats) where the strategy ranked candidates


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "eos" | "length" | "stop" | "cancelled"
    strategy: str
    seed: int | None
    params: GenerationParams
    timings: Timings
    beams: list[Beam] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # things to tell the user (infill warnings)


# --------------------------------------------------------------------------------------------
# requests


@dataclass
class Load:
    spec: ModelSpec


@dataclass
class Generate:
    id: str
    params: GenerationParams
    prompt: str = ""  # raw text (used when raw, or when messages is empty)
    messages: list[ChatMessage] = field(default_factory=list)
    raw: bool = False  # True: no chat template


@dataclass
class Cancel:
    id: str


@dataclass
class GetStats:
    pass


@dataclass
class Shutdown:
    pass


Request = Load | Generate | Cancel | GetStats | Shutdown

# --------------------------------------------------------------------------------------------
# events


@dataclass
class Ready:
    """The worker process is up (before any model is loaded)."""

    pid: int
    versions: dict[str, str]


@dataclass
class LoadProgress:
    done: int
    total: int
    what: str


@dataclass
class Loaded:
    info: ModelInfo
    placement: Placement
    load_s: float


@dataclass
class Token:
    """Generated text. ``provisional`` (beam search): ``text`` is the whole current best beam,
    replacing the previous provisional text; otherwise ``text`` is appended."""

    id: str
    text: str
    token_id: int
    provisional: bool = False


@dataclass
class StepStats:
    id: str
    new_tokens: int
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    ttft_s: float
    step_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Memory:
    devices: list[DeviceMemory]
    cpu_rss: int
    disk_bytes: int
    gpu_available: bool
    note: str = ""  # e.g. "no GPU: CPU RAM is the fast tier"


@dataclass
class Finished:
    id: str
    result: GenerationResult


@dataclass
class Failed:
    """A request failed. ``id`` is None for a failed Load. ``usage``: the user's input was bad
    (exit code 2) rather than the run failing (exit code 1)."""

    id: str | None
    error: str
    usage: bool = False


Event = Ready | LoadProgress | Loaded | Token | StepStats | Memory | Finished | Failed
