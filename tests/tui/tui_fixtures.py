"""Fixed content for the TUI's snapshot tests: events as the worker would send them."""

from __future__ import annotations

from glmchat.params import GenerationParams
from glmchat.protocol import (
    Beam,
    DeviceMemory,
    GenerationResult,
    Loaded,
    Memory,
    ModelInfo,
    Placement,
    Span,
    StepStats,
    Timings,
)

GIB = 1 << 30

LOADED = Loaded(
    info=ModelInfo(name="SmolLM2-135M-Instruct", source="default", weights_dir="/cache/w",
                   digest="0" * 64, architecture="LlamaForCausalLM", n_params=134_515_008,
                   dtype="float32", n_layers=30, context_length=8192, has_chat_template=True,
                   eos_token_ids=[2]),
    placement=Placement(device_map={"": "cpu"}, layers_per_tier={"cuda:0": 12, "cpu": 14,
                                                                 "disk": 4},
                        bytes_per_tier={"cuda:0": 220 << 20, "cpu": 250 << 20,
                                        "disk": 70 << 20},
                        n_layers=30, runtime="glmchat", gpu_available=True),
    load_s=3.4)

MEMORY_GPU = Memory(devices=[DeviceMemory("cuda:0 (NVIDIA H100)", 21 * GIB, 80 * GIB)],
                    cpu_rss=int(1.3 * GIB), disk_bytes=70 << 20, gpu_available=True)
MEMORY_CPU_ONLY = Memory(devices=[], cpu_rss=int(0.9 * GIB), disk_bytes=0, gpu_available=False,
                         note="no GPU: CPU RAM is the fast tier, disk the slow one")

STEP_TIMES = [0.055, 0.052, 0.060, 0.051, 0.049, 0.070, 0.053, 0.050, 0.048, 0.052, 0.066,
              0.051, 0.050, 0.054, 0.049, 0.047, 0.058, 0.052]


def steps(gen_id: str = "g1") -> list[StepStats]:
    return [StepStats(id=gen_id, new_tokens=i + 2, decode_tokens_per_s=19.1,
                      prefill_tokens_per_s=412.0, ttft_s=0.21, step_s=step)
            for i, step in enumerate(STEP_TIMES)]


REPLY = ("Paris is the capital of France.\n\nA few facts:\n\n- It sits on the **Seine**.\n"
         "- About 2.1 million people live in the city proper.\n\n```python\nprint('bonjour')\n```")


def beam_result() -> GenerationResult:
    beams = [Beam("The capital of France is Paris.", list(range(8)), -0.593),
             Beam("The capital of France is Paris, the City of Light,", list(range(12)), -0.622),
             Beam("The capital of France is Paris, the City of Light.", list(range(12)), -0.649)]
    params = GenerationParams(strategy="beam", num_beams=3, num_return_sequences=3)
    return GenerationResult(
        text=beams[0].text, token_ids=beams[0].token_ids, prompt_token_ids=[1] * 30,
        finish_reason="eos", strategy="beam", seed=None, params=params,
        timings=Timings(prefill_tokens=30, prefill_s=0.08, prefill_tokens_per_s=375.0,
                        ttft_s=0.19, decode_tokens=7, decode_s=0.9, decode_tokens_per_s=7.8,
                        total_s=1.1),
        beams=beams)


def greedy_result() -> GenerationResult:
    return GenerationResult(
        text=REPLY, token_ids=list(range(60)), prompt_token_ids=[1] * 30, finish_reason="eos",
        strategy="greedy", seed=None, params=GenerationParams(),
        timings=Timings(prefill_tokens=30, prefill_s=0.07, prefill_tokens_per_s=412.0,
                        ttft_s=0.21, decode_tokens=59, decode_s=3.1, decode_tokens_per_s=19.1,
                        total_s=3.4))


def infill_result() -> GenerationResult:
    text = "The Eiffel Tower is in Paris and was finished in 1889."
    start = text.index("Paris")
    year = text.index("1889")
    result = greedy_result()
    result.text = text
    result.token_ids = list(range(14))
    result.spans = [Span(start, start + len("Paris"), "[MASK]"),
                    Span(year, year + len("1889"), "[MASK]")]
    return result
