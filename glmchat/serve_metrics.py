"""Prometheus text exposition for `glmchat serve`'s /metrics (no client library needed)."""

from __future__ import annotations

from collections.abc import Sequence

from glmchat.serve_worker import TTFT_BUCKETS, ServedWorker


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(worker: ServedWorker) -> str:
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str,
               samples: Sequence[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}" if isinstance(value, float)
                         else f"{name}{labels} {value}")

    c = worker.counters
    metric("glmchat_up", "gauge", "1 while the model worker is alive and loaded.",
           [("", 1 if worker.healthy else 0)])
    if worker.loaded is not None:
        info = worker.loaded.info
        metric("glmchat_model_info", "gauge", "The served model.",
               [(f'{{name="{_label(info.name)}",source="{_label(info.source)}",'
                 f'digest="{info.digest}",context_length="{info.context_length}"}}', 1)])
    metric("glmchat_requests_running", "gauge", "Requests generating now.",
           [("", worker.running)])
    metric("glmchat_requests_waiting", "gauge", "Requests queued behind the running one.",
           [("", worker.waiting)])
    metric("glmchat_requests_total", "counter", "Finished requests by outcome.",
           [(f'{{outcome="{k}"}}', v) for k, v in sorted(c.requests_total.items())]
           or [('{outcome="eos"}', 0)])
    metric("glmchat_prompt_tokens_total", "counter", "Prompt tokens read.",
           [("", c.prompt_tokens_total)])
    metric("glmchat_generation_tokens_total", "counter", "Tokens generated.",
           [("", c.generation_tokens_total)])
    average = (c.generation_tokens_total / c.decode_seconds_total
               if c.decode_seconds_total > 0 else 0.0)
    metric("glmchat_decode_tokens_per_second", "gauge",
           "Decode speed: of the last request, and averaged over all.",
           [('{window="last"}', float(c.last_decode_tokens_per_s)),
            ('{window="all"}', float(average))])
    lines.append("# HELP glmchat_time_to_first_token_seconds Request received to first token "
                 "(queueing included).")
    lines.append("# TYPE glmchat_time_to_first_token_seconds histogram")
    for bound, count in zip(TTFT_BUCKETS, c.ttft_buckets, strict=True):
        lines.append(f'glmchat_time_to_first_token_seconds_bucket{{le="{bound:g}"}} {count}')
    lines.append(f'glmchat_time_to_first_token_seconds_bucket{{le="+Inf"}} {c.ttft_count}')
    lines.append(f"glmchat_time_to_first_token_seconds_sum {c.ttft_sum:g}")
    lines.append(f"glmchat_time_to_first_token_seconds_count {c.ttft_count}")
    memory = worker.memory
    if memory is not None:
        metric("glmchat_memory_used_bytes", "gauge", "Memory in use per device.",
               [(f'{{device="{_label(d.name)}"}}', d.used) for d in memory.devices]
               + [('{device="cpu_rss"}', memory.cpu_rss)])
        metric("glmchat_memory_total_bytes", "gauge", "Memory per device.",
               [(f'{{device="{_label(d.name)}"}}', d.total) for d in memory.devices])
        metric("glmchat_offloaded_bytes", "gauge", "Weights offloaded to disk.",
               [("", memory.disk_bytes)])
    return "\n".join(lines) + "\n"
