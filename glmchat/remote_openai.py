"""OpenAICompatRemote: a Backend that talks to any OpenAI-compatible server (vLLM, SGLang,
llama.cpp's server, Ollama, transformers serve) over plain HTTP + SSE.

It yields the worker protocol's events, so a front end cannot tell it from the local worker,
except where the server cannot say what the worker says; then it says so once, in place, and
invents nothing:

| feature           | over the OpenAI API                                                   |
|-------------------|-----------------------------------------------------------------------|
| greedy, sampling  | temperature 0 / temperature, top_p, top_k, seed (a fresh one is drawn  |
|                   | here and sent, so the reply can be replayed)                          |
| beam search       | refused: the reply fails with a sentence saying so                    |
| [MASK] infill     | the prompt goes as plain text, and a note says the blanks were not    |
|                   | filled                                                                |
| token ids         | asked for (return_token_ids) from vLLM and glmchat serve; from others |
|                   | none: empty, with a note, and the count comes from the server's usage |
| memory            | the server's KV-cache use from its Prometheus /metrics (vLLM, SGLang) |
|                   | or "not reported by this server"                                      |
| cancel            | closes the connection: servers abort a request whose client left      |
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from glmchat.httpclient import HttpError, HttpTarget
from glmchat.protocol import (
    Failed,
    Generate,
    Loaded,
    LoadProgress,
    Memory,
    ModelInfo,
    ModelSpec,
    Placement,
)
from glmchat.remote_events import GenerationRun, QueueBackend

KV_METRICS = (  # Prometheus names of the KV-cache fill (0..1) by server
    ("vllm:kv_cache_usage_perc", "vLLM"), ("vllm:gpu_cache_usage_perc", "vLLM"),
    ("sglang:token_usage", "SGLang"),
)
NOT_REPORTED = "memory: not reported by this server"
TOKEN_ID_SERVERS = ("vllm", "glmchat")  # owned_by of servers that send token ids when asked
# vLLM's names for what OpenAI lacks; a server that refuses one gets the request without it
EXTRA_FIELDS = ("top_k", "min_tokens", "return_token_ids")


def kv_cache_note(metrics: str) -> str | None:
    """The KV-cache use a Prometheus /metrics text reports, as a sentence; None if none."""
    for name, server in KV_METRICS:
        values = []
        for line in metrics.splitlines():
            if line.startswith(name) and not line.startswith("#"):
                head, _, value = line.rpartition(" ")
                if head.split("{")[0] == name:
                    try:
                        values.append(float(value))
                    except ValueError:
                        continue
        if values:
            return f"server KV cache {max(values):.0%} in use ({server} /metrics)"
    return None


def context_length(model: dict[str, Any]) -> int:
    """The context length a /v1/models entry states, in the names servers use; 0 if none."""
    for key in ("max_model_len", "context_length", "context_window", "max_context_length"):
        value = model.get(key)
        if isinstance(value, int) and value > 0:
            return value
    meta = model.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("n_ctx_train"), int):
        return int(meta["n_ctx_train"])
    return 0


class OpenAICompatRemote(QueueBackend):
    """See the module docstring. ``model``: the server's model id ("" = the only one it
    serves); ``stream``: False asks for whole replies (one Token, then Finished)."""

    deterministic = False  # batching and kernels differ; it may not report token ids

    def __init__(self, url: str, *, api_key: str | None = None, model: str = "",
                 timeout: float = 600.0, ca_file: str | None = None, verify: bool = True,
                 stream: bool = True) -> None:
        super().__init__()
        self.target = HttpTarget(url, api_key=api_key, timeout=timeout, ca_file=ca_file,
                                 verify=verify)
        self.model = model
        self.streaming = stream
        self.description = f"OpenAI-compatible server at {self.target.public}"
        self._said: set[str] = set()  # notes already given: each is said once
        self._memory_note: str | None = None  # None: not asked yet
        self._served = ""  # the model id the server answers with
        self._refused: set[str] = set()  # fields beyond the OpenAI API this server rejected
        self._owner = ""  # /v1/models' owned_by: "vllm", "glmchat", …

    # ---- requests -------------------------------------------------------------------------------

    def _load(self, spec: ModelSpec) -> None:
        t0 = time.perf_counter()
        self.put(LoadProgress(0, 1, f"asking {self.target.public} for its models"))
        try:
            listing = self.target.get_json(self.target.api_path + "/models")
        except HttpError as exc:
            self.put(Failed(None, str(exc), usage=exc.usage))
            return
        models = [m for m in (listing.get("data") if isinstance(listing, dict) else None) or []
                  if isinstance(m, dict) and isinstance(m.get("id"), str)]
        ids = [m["id"] for m in models]
        if self.model:
            chosen = next((m for m in models if m["id"] == self.model), None)
            if chosen is None and ids:
                self.put(Failed(None, f"{self.target.public} serves {', '.join(ids[:8])}, not "
                                      f"{self.model}; fix --backend-model / [backend] model",
                                usage=True))
                return
            chosen = chosen or {"id": self.model}
        elif len(models) == 1:
            chosen = models[0]
        else:
            what = f"{len(ids)} models ({', '.join(ids[:8])})" if ids else "no model list"
            self.put(Failed(None, f"{self.target.public} has {what}; name the one to use with "
                                  "--backend-model NAME or [backend] model", usage=True))
            return
        self._served = chosen["id"]
        self._owner = str(chosen.get("owned_by") or "")
        info = ModelInfo(name=self._served, source=self._served, weights_dir="", digest="",
                         architecture=str(chosen.get("owned_by") or "remote"), n_params=0,
                         dtype="", n_layers=0, context_length=context_length(chosen),
                         has_chat_template=True, backend=self.target.public)
        placement = Placement(device_map={}, layers_per_tier={}, bytes_per_tier={}, n_layers=0,
                              runtime="remote", gpu_available=False)
        self.put(LoadProgress(1, 1, f"{self._served} at {self.target.public}"))
        self.put(Loaded(info=info, placement=placement, load_s=time.perf_counter() - t0))
        self._stats()

    def _stats(self) -> None:
        if self._memory_note is None or self._memory_note != NOT_REPORTED:
            try:
                note = kv_cache_note(self.target.get_text(self.target.root_path + "/metrics",
                                                          timeout=5.0))
            except HttpError:
                note = None
            self._memory_note = note or NOT_REPORTED
        self.put(Memory(devices=[], cpu_rss=0, disk_bytes=0, gpu_available=False,
                        note=self._memory_note))

    def _generate(self, request: Generate, run: GenerationRun) -> None:
        params = request.params
        if params.strategy == "beam":
            self.put(Failed(request.id, f"beam search: {self.target.public} speaks the OpenAI "
                                        "API, which has none; use /strategy greedy or sample "
                                        "(glmchat serve and the local worker do beam search)",
                            usage=True))
            return
        from glmchat.infill import has_masks

        chat = not request.raw  # as the local worker: a chat template unless --raw
        payload: dict[str, Any] = {"model": self._served or self.model,
                                   "max_tokens": params.max_new_tokens, "stream": self.streaming}
        if chat:
            messages = [{"role": m.role, "content": m.content} for m in request.messages] or [
                {"role": "user", "content": request.prompt}]
            if params.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": params.system_prompt})
            payload["messages"] = messages
            text_in = messages[-1]["content"]
        else:
            payload["prompt"] = text_in = request.prompt or "\n".join(
                m.content for m in request.messages)
        seed: int | None = None
        if params.strategy == "sample":
            seed = params.seed if params.seed >= 0 else secrets.randbits(31)
            payload.update(temperature=params.temperature, top_p=params.top_p, seed=seed)
            if params.top_k and "top_k" not in self._refused:
                payload["top_k"] = params.top_k
        else:
            payload.update(temperature=0.0, top_p=1.0)
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.min_new_tokens and "min_tokens" not in self._refused:
            payload["min_tokens"] = params.min_new_tokens  # vLLM's and SGLang's name
        if self.streaming:
            payload["stream_options"] = {"include_usage": True}
        if self._owner in TOKEN_ID_SERVERS:
            payload["return_token_ids"] = True  # vLLM's name; glmchat serve takes it too
        notes = []
        if has_masks(text_in):
            notes.append(self.once("infill: this server does not fill [MASK] blanks; the "
                                   "prompt went to it as plain text"))
        if params.no_repeat_ngram_size:
            notes.append(self.once("no_repeat_ngram_size: the OpenAI API has no such setting; "
                                   "this server did not apply it"))
        path = self.target.api_path + ("/chat/completions" if chat else "/completions")
        run.notes = [n for n in notes if n]
        run.seed = seed
        run.payload_path = path
        self.stream_reply(request, run, payload, chat)

    def once(self, note: str) -> str:
        """``note`` the first time it is given, "" after."""
        if note in self._said:
            return ""
        self._said.add(note)
        return note

    def stream_reply(self, request: Generate, run: GenerationRun, payload: dict[str, Any],
                     chat: bool) -> None:
        """POST the request and turn the answer (SSE chunks or one JSON body) into events."""
        try:
            conn, response = self.target.open("POST", run.payload_path, payload)
        except HttpError as exc:
            refused = [k for k in EXTRA_FIELDS if k in payload and exc.usage and k in str(exc)]
            if not refused:
                self.put(Failed(request.id, str(exc), usage=exc.usage))
                return
            # Nothing streamed yet: the same request again, without what it does not take.
            self._refused.update(refused)
            for key in refused:
                del payload[key]
                run.notes.append(self.once(f"{key}: this server does not take it (beyond the "
                                           "OpenAI API); replies are made without it"))
            self.stream_reply(request, run, payload, chat)
            return
        run.attach(conn)
        try:
            if self.streaming:
                from glmchat.httpclient import sse_events

                for data in sse_events(response):
                    if run.cancelled:
                        break
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        continue  # not JSON: a server's stray keep-alive text
                    run.take(chunk, chat)
                    if run.error:
                        break
            else:
                run.take(json.loads(response.read()), chat)
        except (OSError, ValueError) as exc:
            if not run.cancelled:
                run.error = self.target.failure(exc).args[0] if isinstance(exc, OSError) \
                    else f"{self.target.public} sent a reply that is not JSON"
        finally:
            conn.close()
        if not run.cancelled and not run.error and run.finish_reason is None:
            run.error = (f"{self.target.public} ended the stream before the reply finished "
                         "(no finish_reason)")
        if not run.token_ids and not run.error:
            run.notes.append(self.once("token ids: not reported by this server (replay "
                                       "--check compares the text instead)"))
        run.notes = [n for n in run.notes if n]
        self.put(run.finished(request) if not run.error or run.cancelled
                 else Failed(request.id, run.error))

