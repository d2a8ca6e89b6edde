"""The transformers family: every causal LM that transformers loads (HF directory, GGUF, the
embedded default), placed by accelerate or streamed by our offload runtime."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from glmchat import paths
from glmchat.errors import UsageError
from glmchat.infill import MaskedText
from glmchat.protocol import Generate, GenerationResult, ModelInfo, ModelSpec

from . import offload, sources
from . import placement as place
from .clock import RunContext
from .family import LoadedModel, Progress

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(spec_dtype: str, config: Any) -> torch.dtype:
    if spec_dtype != "auto":
        return DTYPES[spec_dtype]
    configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(configured, str):
        configured = DTYPES.get(configured)
    if isinstance(configured, torch.dtype) and configured in DTYPES.values():
        if configured != torch.float32 and place.gpu_count() == 0:
            # On a CPU: the stored dtype where a one-time probe finds fast kernels for it
            # (streamed layers are then not converted every token), else float32.
            from .dtype_probe import cpu_computes_fast

            return configured if cpu_computes_fast(configured) else torch.float32
        return configured
    return torch.float32


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    configured = model.generation_config.eos_token_id
    if isinstance(configured, int):
        ids.append(configured)
    elif isinstance(configured, list):
        ids.extend(configured)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)



def _check_offload_dir(offload_dir: Path) -> None:
    """accelerate writes offloaded weights there: fail now, in words, if it cannot."""
    try:
        offload_dir.mkdir(parents=True, exist_ok=True)
        probe = offload_dir / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        why = "a file is where the directory should be" if isinstance(
            exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise UsageError(f"offload dir {offload_dir} is not writable ({why}); "
                         "pass --offload-dir DIR") from None

class TransformersFamily:
    name = "transformers"
    default_beam_scorer = "transformers"

    def claims(self, source: str) -> bool:
        return True

    def load(self, spec: ModelSpec, progress: Progress) -> LoadedModel:
        progress(0, 4, f"checking {spec.path}")
        resolved = sources.resolve(spec.path)
        if resolved.needs_conversion:
            sources.convert_gguf(resolved, progress)
        weights_dir = resolved.weights_dir
        quantized = None
        if spec.quantize != "none":  # weight-only quantized decoder layers (model/quant.py)
            from . import quant

            quantized = quant.prepare(weights_dir, resolved.digest, spec.quantize,
                                      spec.quant_group, progress,
                                      "cuda" if place.gpu_count() else "cpu")
        if quantized is not None:
            weights_dir = quantized.runtime_dir
            for note in quantized.notes:
                progress(1, 4, f"note: {note}")
            for fallback in quantized.fallbacks:
                progress(1, 4, f"note: kept at full width (the kernel cannot take it): "
                         f"{fallback}")
        progress(1, 4, f"reading {resolved.name} config")
        try:
            config = AutoConfig.from_pretrained(weights_dir)
        except (ValueError, OSError, KeyError) as exc:
            raise UsageError(f"{weights_dir}/config.json cannot be used: {exc}") from None
        dtype = pick_dtype(spec.dtype, config)
        with init_empty_weights():
            meta_model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tie = getattr(meta_model, "tie_weights", None)
        if callable(tie):
            tie()  # a tied head and its embedding: one parameter, counted once
        n_params = sum(p.numel() for p in meta_model.parameters())
        untied = getattr(config, "glmchat_untied_head", None)  # quant.py's copy of a tied head
        if untied:
            n_params -= sum(p.numel() for p in meta_model.get_submodule(untied).parameters())
        meta_params = n_params  # tied weights once (streaming binds them apart)
        if quantized is not None:
            from .qlinear import swap_linears

            swap_linears(meta_model, weights_dir, quantized.scheme, quantized.group_size)

        progress(2, 4, "placing layers")
        lookup_on_disk = False
        if quantized is not None:
            from .qlinear import lookup_on_disk as _lookup_on_disk

            lookup_on_disk = _lookup_on_disk(meta_model, weights_dir, dtype)
        device_map = place.compute_device_map(meta_model, spec, dtype, lookup_on_disk)
        offload_dir = Path(spec.offload_dir or paths.default_offload_dir()).expanduser()
        runtime = "resident"
        streamed = spec.offload_runtime == "glmchat" and offload.streams_layers(device_map)
        if streamed:
            runtime = "glmchat"
        elif device_map is not None and "disk" in device_map.values():
            runtime = "accelerate"
            _check_offload_dir(offload_dir)
        if device_map is not None and len(set(device_map.values())) == 1:
            only = next(iter(device_map.values()))
            device_map = None if only == "cpu" else device_map
        if quantized is not None:  # quantized layers load through our runtime, always
            streamed = True
            runtime = "glmchat" if offload.streams_layers(device_map) else "resident"
            device_map = device_map or {"": "cuda:0" if place.gpu_count() else "cpu"}

        progress(3, 4, f"loading {resolved.name} weights ({human(n_params)} parameters)")
        kwargs: dict[str, Any] = {"dtype": dtype}
        if device_map is not None:
            kwargs.update(device_map=device_map, offload_folder=str(offload_dir))
        streamer: offload.OffloadRuntime | None = None
        notes: list[str] = []
        try:
            if streamed:
                assert device_map is not None
                try:
                    streamer = offload.load_offloaded(meta_model, weights_dir, device_map, dtype,
                                                      offload.compute_device(device_map),
                                                      reader=spec.offload_reader)
                except offload.NotStreamable as exc:
                    if quantized is not None:  # quantized layers exist for our runtime only
                        raise UsageError(f"--quantize {spec.quantize} cannot be used with "
                                         f"{resolved.name} ({exc}); run with --quantize "
                                         "none") from None
                    # Not an error for the user: accelerate's runtime loads through
                    # transformers, whatever its checkpoint conversions do.
                    streamed, runtime = False, "accelerate"
                    notes.append(f"the glmchat offload runtime cannot stream this checkpoint "
                                 f"({exc}); using accelerate's runtime instead")
                    _check_offload_dir(offload_dir)
            if streamed:
                assert streamer is not None
                model, device_map = meta_model, streamer.device_map
                streamer.quantize = quantized.label if quantized is not None else "none"
                with contextlib.suppress(OSError):
                    model.generation_config = GenerationConfig.from_pretrained(weights_dir)
            else:
                model = AutoModelForCausalLM.from_pretrained(weights_dir, **kwargs)
            del meta_model
            tokenizer = AutoTokenizer.from_pretrained(weights_dir)
        except (OSError, ValueError, RuntimeError) as exc:
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UsageError(f"{weights_dir} cannot be loaded: {first_line}") from None
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        if streamed:  # the runtime binds tied names to separate tensors; quantized: packed
            n_params = meta_params
        placement = place.summarize(model, device_map, runtime)
        if quantized is not None:
            placement.quantize = quantized.label
        placement.notes.extend(notes)
        context = int(getattr(config, "max_position_embeddings", 0)
                      or getattr(tokenizer, "model_max_length", 2048))
        info = ModelInfo(
            name=resolved.name, source=spec.path, weights_dir=str(weights_dir),
            digest=resolved.digest, architecture=(config.architectures or ["?"])[0],
            n_params=n_params, dtype=str(dtype).removeprefix("torch."),
            n_layers=int(getattr(config, "num_hidden_layers", placement.n_layers)),
            context_length=context, has_chat_template=bool(tokenizer.chat_template),
            eos_token_ids=_eos_ids(model, tokenizer),
            quantize=quantized.label if quantized is not None else "none")
        progress(4, 4, f"{resolved.name} ready")
        return LoadedModel(model, tokenizer, info, placement, streamer, family=self)

    def prompt_ids(self, loaded: LoadedModel, request: Generate) -> list[int]:
        tokenizer = loaded.tokenizer
        params = request.params
        use_template = not request.raw and loaded.info.has_chat_template
        if use_template:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            if not messages:
                messages = [{"role": "user", "content": request.prompt}]
            if not any(m["content"].strip() for m in messages if m["role"] == "user"):
                raise UsageError("the prompt is empty; type a question or pipe some text")
            if params.system_prompt and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": params.system_prompt})
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        text = request.prompt or "\n".join(m.content for m in request.messages)
        if not text.strip():
            raise UsageError("the prompt is empty; type a question or pipe some text")
        return [int(i) for i in tokenizer(text)["input_ids"]]

    def blanks(self, loaded: LoadedModel, request: Generate) -> MaskedText | None:
        from . import infill

        return infill.masked_prompt(request)

    def fill_blanks(self, ctx: RunContext, request: Generate, masked: MaskedText,
                    should_stop: Callable[[], bool]) -> GenerationResult:
        from . import infill

        return infill.run_infill(ctx, request, masked, should_stop)
