"""Weight-only quantization at conversion time, cached beside the converted models.

``prepare(resolved, scheme, group_size)`` turns a safetensors model into a quantized copy once,
in ``$XDG_CACHE_HOME/glmchat/models/<source digest>-<scheme>[-g<group>]/``, and returns the
directory the runtime loads. The Linear weights of the decoder layers and the head are
quantized; norms, biases and embeddings stay as stored. A tied head (the head *is* the
embedding table: SmolLM2, Llama-style test models) gets a quantized untied copy,
``lm_head.weight`` in ``rest.safetensors``, and the copy's ``config.json`` says
``tie_word_embeddings: false``: the lookup reads a few full-width rows of the table, while the
head, which every token reads whole, reads 2-4x fewer bytes (the config's
``glmchat_untied_head`` names it, so the parameter count stays the source model's).
Every decoder layer is its own safetensors file (``layer-00012.safetensors``), the rest is
``rest.safetensors``; the runtime maps and streams them like any checkpoint.

Stored (portable) forms, named after GLM-130B's quantized checkpoints (``<key>_scale``):

- int8: ``X.weight`` int8 ``[N, K]``, ``X.weight_scale`` bf16 ``[N]``: per-output-row absmax
  / 127, ``W ≈ q * scale`` (GLM-130B's scheme).
- int4: ``X.weight`` uint8 ``[N, K/2]``, two values a byte, the even column in the high
  nibble (GLM-130B's and torch's CUDA packer's layout); ``X.weight_scale`` and ``X.weight_zero``
  bf16 ``[N, K/g]``: min/max per group of ``g`` along K, ``W ≈ (q - 8) * scale + zero``.

The CPU int4 kernel (``aten._weight_int4pack_mm_for_cpu``) wants its own packing, which
differs between AVX512, AVX2 and default builds. It is made at conversion into
``cpu-<torch version>-<capability>/`` (``X.weight`` packed, ``X.weight_scale_zeros`` bf16
``[K/g, N, 2]``), checked against the portable form on one matrix at every load, and rebuilt
once when the check fails. int8 needs no packing: the portable form is what the kernel takes.

A matrix whose shape the kernel cannot take (N not a multiple of 16, K not a multiple of 32 or
of the group) stays at full width; the conversion says which, and the marker keeps the list.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from glmchat import paths
from glmchat.errors import UsageError

from .atomic_dir import building

SCHEMES = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
MARKER = "glmchat-quant.json"
PACKED_MARKER = "glmchat-packed.json"
FORMAT = 2  # 2: the head is quantized too
REST = "rest.safetensors"
CHECK_TOLERANCE = 0.02  # relative error of the packed kernel against the portable form

Progress = Callable[[int, int, str], None]


@dataclass
class QuantResult:
    """What ``prepare`` made: the directory to load and what the panels show."""

    scheme: str
    group_size: int
    runtime_dir: Path  # the directory the runtime maps (config, tokenizer, weights)
    quant_dir: Path  # the portable form
    fallbacks: list[str] = field(default_factory=list)  # "name: why" of full-width matrices
    notes: list[str] = field(default_factory=list)  # what happened at load (a repack)

    @property
    def label(self) -> str:
        return self.scheme if self.scheme != "int4" else f"int4-g{self.group_size}"


def check_scheme(scheme: str, group_size: int) -> None:
    if scheme not in SCHEMES:
        raise UsageError(f"unknown quantization scheme {scheme!r}; use one of "
                         f"{', '.join(SCHEMES)}")
    if group_size not in GROUP_SIZES:
        raise UsageError(f"quantization group size {group_size} is not supported; use one of "
                         f"{', '.join(map(str, GROUP_SIZES))}")


def quant_dir_for(digest: str, scheme: str, group_size: int) -> Path:
    suffix = f"-g{group_size}" if scheme == "int4" else ""
    return paths.models_cache_dir() / f"{digest[:16]}-{scheme}{suffix}"


def packed_key() -> str:
    return f"cpu-torch{torch.__version__}-{torch.backends.cpu.get_cpu_capability()}"


# ---- the arithmetic --------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row absmax: int8 ``[N, K]`` and bf16 scales ``[N]``."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-10).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise min/max along K: values 0..15 ``[N, K]`` (int32), bf16 scales and zeros
    ``[N, K/g]`` with ``W ≈ (q - 8) * scale + zero``."""
    n, k = w.shape
    groups = w.float().reshape(n, k // group, group)
    low = groups.amin(dim=-1)
    high = groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-10).to(torch.bfloat16)
    zero = (low + 8 * scale.float()).to(torch.bfloat16)
    # Quantize against the rounded scale and zero, so dequantization is the nearest grid point.
    lowest = zero.float() - 8 * scale.float()
    q = torch.round((groups - lowest[..., None]) / scale.float()[..., None]).clamp(0, 15)
    return q.to(torch.int32).reshape(n, k), scale, zero


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int32 0..15 ``[N, K]`` → uint8 ``[N, K/2]``, even column in the high nibble."""
    return ((q[:, ::2] << 4) | (q[:, 1::2] & 0xF)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    high = (packed >> 4).to(torch.int32)
    low = (packed & 0xF).to(torch.int32)
    return torch.stack([high, low], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
                    ) -> torch.Tensor:
    q = unpack_nibbles(packed).float()
    n, k = q.shape
    group = k // scale.shape[1]
    out = (q.reshape(n, -1, group) - 8) * scale.float()[..., None] + zero.float()[..., None]
    return out.reshape(n, k)


def pack_int4_cpu(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The portable int4 form → the CPU kernel's packed weight and ``[K/g, N, 2]`` scales."""
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_nibbles(packed), 8)
    scale_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()
    return weight, scale_zeros


def unsupported(scheme: str, n: int, k: int, group: int) -> str | None:
    """Why the kernel cannot take an ``[n, k]`` matrix, or None. (Measured on torch 2.13's CPU
    kernels: K not a multiple of 32 reads out of bounds or gives wrong sums.)"""
    if k % 32:
        return f"K = {k} is not a multiple of 32"
    if scheme == "int4":
        if n % 16:
            return f"N = {n} is not a multiple of 16"
        if k % group:
            return f"K = {k} is not a multiple of the group size {group}"
    return None


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(
        min=1e-6))


def check_matrix(scheme: str, group: int, tensors: dict[str, torch.Tensor],
                 reference: torch.Tensor) -> float:
    """Relative error of the kernel on ``tensors`` (one layer's ``weight`` ... in runtime form)
    against x @ ``reference``.T: a fixed input, a few rows."""
    from .qlinear import quant_matmul

    x = torch.randn(4, reference.shape[1], generator=torch.Generator().manual_seed(0))
    x = x.to(torch.bfloat16)
    want = x.float() @ reference.t()
    got = quant_matmul(scheme, group, x, tensors)
    return relative_error(got, want)


# ---- conversion ------------------------------------------------------------------------------


ALIGN = 64  # the CPU int8 kernel faults on a weight that is not 64-byte aligned (AVX512 loads)


def save_aligned(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file whose every tensor starts 64-byte aligned in the file, so that the
    mapping (page-aligned) and the direct reader's slots (offsets kept modulo 4 KiB) hand the
    kernels aligned weights. Gaps are filled with ``__pad_N`` uint8 tensors (the format wants
    the data covered without holes); loaders ask for their own names and never see them."""
    from .mapped import SAFETENSORS_DTYPES

    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": metadata}
    order: list[tuple[torch.Tensor | int, int]] = []
    cursor = 0
    for n, (key, tensor) in enumerate(tensors.items()):
        pad = -cursor % ALIGN
        if pad:
            header[f"__pad_{n}"] = {"dtype": "U8", "shape": [pad],
                                    "data_offsets": [cursor, cursor + pad]}
            order.append((pad, pad))
            cursor += pad
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [cursor, cursor + nbytes]}
        order.append((tensor, nbytes))
        cursor += nbytes
    text = json.dumps(header, separators=(",", ":"))
    text += " " * (-(8 + len(text.encode())) % ALIGN)
    encoded = text.encode()
    with path.open("wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for item, nbytes in order:
            if isinstance(item, int):
                f.write(bytes(item))
            elif nbytes:
                f.write(item.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


@dataclass
class Head:
    """The model's head: its weight's name, and the embedding's when the two are tied."""

    key: str  # "lm_head.weight"
    tied_to: str | None  # "model.embed_tokens.weight" when the config ties them


def _layer_linears(weights_dir: Path) -> tuple[str, dict[str, int], Head | None]:
    """The decoder layer list's name and, for every Linear weight inside it, its layer; the
    head (an ``nn.Linear`` output embedding), if any."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from .offload import decoder_layers

    config = AutoConfig.from_pretrained(weights_dir)
    with init_empty_weights():
        meta = AutoModelForCausalLM.from_config(config)
    layers_name, layers = decoder_layers(meta)
    linears: dict[str, int] = {}
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                linears[f"{layers_name}.{i}.{name}.weight"] = i
    head: Head | None = None
    output, inputs = meta.get_output_embeddings(), meta.get_input_embeddings()
    if isinstance(output, nn.Linear) and output.bias is None:
        names = {id(m): n for n, m in meta.named_modules()}
        tied = bool(getattr(config, "tie_word_embeddings", False)) and inputs is not None
        head = Head(f"{names[id(output)]}.weight",
                    f"{names[id(inputs)]}.weight" if tied else None)
    return layers_name, linears, head


def _quantize_into(out: dict[str, torch.Tensor], key: str, tensor: torch.Tensor, scheme: str,
                   group: int) -> None:
    base = key.removesuffix(".weight")
    if scheme == "int8":
        q, scale = quantize_int8(tensor)
        out[key], out[f"{base}.weight_scale"] = q, scale
    else:
        q4, scale, zero = quantize_int4(tensor, group)
        out[key] = pack_nibbles(q4)
        out[f"{base}.weight_scale"], out[f"{base}.weight_zero"] = scale, zero


def _write_marker(directory: Path, name: str, data: dict[str, Any]) -> None:
    files = {f.name: f.stat().st_size for f in sorted(directory.glob("*.safetensors"))}
    (directory / name).write_text(json.dumps({**data, "files": files}, indent=1))


def _marker_ok(directory: Path, name: str, expect: dict[str, Any]) -> dict[str, Any] | None:
    """The marker, when the directory is complete: every file the marker lists is there, of
    its size, with a sound header; None when it was never finished. A directory that claims to
    be finished and is not raises (the caller rebuilds it)."""
    from .sources import check_safetensors

    marker = directory / name
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
        files = data["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise CorruptCache(f"{marker} is unreadable") from None
    if any(data.get(k) != v for k, v in expect.items()):
        return None  # another format or key: made again
    for file_name, size in files.items():
        path = directory / file_name
        if not path.is_file() or path.stat().st_size != size:
            raise CorruptCache(f"{path} is missing or has the wrong size")
        try:
            check_safetensors(path)
        except UsageError as exc:
            raise CorruptCache(str(exc)) from None
    return dict(data)


class CorruptCache(Exception):
    """A quantized cache directory that says it is finished but is not."""


def _copy_side_files(source: Path, target: Path) -> None:
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")) \
                and not f.name.startswith("glmchat-"):
            shutil.copy2(f, target / f.name)


def convert(weights_dir: Path, digest: str, scheme: str, group: int, target: Path,
            progress: Progress) -> list[str]:
    """Write the portable quantized copy of ``weights_dir`` into ``target`` (atomic by rename).
    Returns the matrices kept at full width, with why."""
    from safetensors import safe_open

    from .sources import weight_files

    layers_name, linears, head = _layer_linears(weights_dir)
    head_source: torch.Tensor | None = None  # the head's (or tied embedding's) weight
    per_file: dict[str, dict[str, torch.Tensor]] = {}
    fallbacks: list[str] = []
    prefix = f"{layers_name}."
    target.parent.mkdir(parents=True, exist_ok=True)
    with building(target, ".quantizing-") as tmp:
        files = weight_files(weights_dir)
        for n_file, path in enumerate(files):
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                for n_key, key in enumerate(keys):
                    if n_key % 16 == 0:
                        progress(n_file * len(keys) + n_key, len(files) * len(keys),
                                 f"quantizing {key} ({scheme})")
                    tensor = f.get_tensor(key)
                    if head is not None and key in (head.key, head.tied_to):
                        if key == head.key or head_source is None:
                            head_source = tensor
                        if key == head.key:
                            continue  # quantized below
                    if key.startswith(prefix):
                        layer = int(key[len(prefix):].split(".", 1)[0])
                        out = per_file.setdefault(f"layer-{layer:05d}.safetensors", {})
                    else:
                        out = per_file.setdefault(REST, {})
                    if key not in linears or tensor.dim() != 2:
                        out[key] = tensor.contiguous()
                        continue
                    n, k = tensor.shape
                    why = unsupported(scheme, n, k, group)
                    if why is not None:
                        fallbacks.append(f"{key} [{n}, {k}]: {why}")
                        out[key] = tensor.contiguous()
                        continue
                    _quantize_into(out, key, tensor, scheme, group)
        untied = _quantize_head(head, head_source, scheme, group,
                                per_file.setdefault(REST, {}), fallbacks)
        for name, tensors in per_file.items():
            save_aligned(tensors, tmp / name, {"format": "pt", "quantize": scheme})
        _copy_side_files(weights_dir, tmp)
        if untied is not None:
            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text())
            config.update(tie_word_embeddings=False, glmchat_untied_head=untied)
            config_path.write_text(json.dumps(config, indent=2))
        _write_marker(tmp, MARKER, {"format": FORMAT, "source_digest": digest,
                                    "scheme": scheme, "group_size": group,
                                    "layers": layers_name, "fallbacks": fallbacks})
    return fallbacks


# The head's scheme per model scheme. int4 keeps an int8 head: measured on the embedded model
# (whose table is not from Q4 blocks), an int4 g32 head cost +5 % perplexity and 80 % top-1
# agreement, against -0.1 % and 99 % for int4 layers with an int8 head.
HEAD_SCHEME = {"int8": "int8", "int4": "int8"}


def _quantize_head(head: Head | None, source: torch.Tensor | None, scheme: str, group: int,
                   out: dict[str, torch.Tensor], fallbacks: list[str]) -> str | None:
    """Quantize the head into ``out`` (the rest file), in ``HEAD_SCHEME``'s scheme. A shape
    the kernel cannot take stays full width (and tied, if it was), with a note. Returns the
    head's name when it is a quantized copy of a tied embedding (the copy's config unties
    them), else None."""
    if head is None or source is None or source.dim() != 2:
        if head is not None and source is not None:
            out[head.key] = source.contiguous()
        return None
    n, k = source.shape
    scheme = HEAD_SCHEME[scheme]
    why = unsupported(scheme, n, k, group)
    if why is not None:
        fallbacks.append(f"{head.key} [{n}, {k}]: {why}")
        if head.tied_to is None:
            out[head.key] = source.contiguous()
        return None
    _quantize_into(out, head.key, source, scheme, group)
    return head.key.removesuffix(".weight") if head.tied_to is not None else None


def pack_cpu(quant_dir: Path, group: int, progress: Progress) -> Path:
    """The CPU int4 kernel's packed copy of ``quant_dir``, for this torch and CPU capability."""
    from safetensors import safe_open

    target = quant_dir / packed_key()
    with building(target, ".packing-", parent=quant_dir) as tmp:
        layer_files = sorted(quant_dir.glob("layer-*.safetensors"))
        if _has_int4(quant_dir / REST):  # the head
            layer_files.append(quant_dir / REST)
        for n, path in enumerate(layer_files):
            progress(n, len(layer_files), f"packing {path.name} for {packed_key()}")
            out: dict[str, torch.Tensor] = {}
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
                for key in sorted(keys):
                    if key.endswith((".weight_scale", ".weight_zero")):
                        continue
                    base = key.removesuffix(".weight")
                    tensor = f.get_tensor(key)
                    if key.endswith(".weight") and f"{base}.weight_zero" in keys:
                        weight, scale_zeros = pack_int4_cpu(
                            tensor, f.get_tensor(f"{base}.weight_scale"),
                            f.get_tensor(f"{base}.weight_zero"))
                        out[key], out[f"{base}.weight_scale_zeros"] = weight, scale_zeros
                    else:
                        out[key] = tensor
            save_aligned(out, tmp / path.name, {"format": "pt", "quantize": "int4"})
        for f in quant_dir.iterdir():
            if f.is_file() and f not in layer_files and f.name != MARKER:
                try:
                    os.link(f, tmp / f.name)  # the rest and the side files: the same bytes
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        _write_marker(tmp, PACKED_MARKER, {"format": FORMAT, "key": packed_key(),
                                           "group_size": group})
    return target


def _has_int4(path: Path) -> bool:
    from safetensors import safe_open

    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as f:
        return any(key.endswith(".weight_zero") for key in f.keys())  # noqa: SIM118


# ---- what the engine calls -------------------------------------------------------------------


def _first_quantized(quant_dir: Path) -> tuple[Path, str] | None:
    from safetensors import safe_open

    for path in sorted(quant_dir.glob("layer-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in sorted(f.keys()):
                if key.endswith(".weight_zero"):
                    return path, key.removesuffix(".weight_zero")
    return None


def verify_packed(quant_dir: Path, packed_dir: Path, group: int) -> float:
    """The CPU kernel on one packed matrix against its portable form: the relative error."""
    from safetensors import safe_open

    found = _first_quantized(quant_dir)
    if found is None:
        return 0.0
    path, base = found
    with safe_open(str(path), framework="pt") as f:
        reference = dequantize_int4(f.get_tensor(f"{base}.weight"),
                                    f.get_tensor(f"{base}.weight_scale"),
                                    f.get_tensor(f"{base}.weight_zero"))
    with safe_open(str(packed_dir / path.name), framework="pt") as f:
        tensors = {"weight": f.get_tensor(f"{base}.weight"),
                   "weight_scale_zeros": f.get_tensor(f"{base}.weight_scale_zeros")}
    return check_matrix("int4", group, tensors, reference)


def prepare(weights_dir: Path, digest: str, scheme: str, group: int, progress: Progress,
            device_type: str = "cpu") -> QuantResult | None:
    """The quantized copy of ``weights_dir`` for ``scheme`` (None for "none"), made once and
    checked at every load: a corrupt cache is rebuilt, a CPU-packed copy that does not match
    its stored form on this CPU is packed again."""
    check_scheme(scheme, group)
    if scheme == "none":
        return None
    if device_type == "cuda" and scheme == "int4":
        raise UsageError("--quantize int4 is not supported on a GPU yet (the CUDA int4 kernel "
                         "needs its own packing); use --quantize int8 there")
    group = group if scheme == "int4" else 0
    quant_dir = quant_dir_for(digest, scheme, group)
    notes: list[str] = []
    expect = {"format": FORMAT, "source_digest": digest, "scheme": scheme, "group_size": group}
    try:
        marker = _marker_ok(quant_dir, MARKER, expect)
    except CorruptCache as exc:
        notes.append(f"the quantized cache {quant_dir} was corrupt ({exc}): rebuilt it")
        marker = None
    if marker is None:
        progress(0, 1, f"quantizing to {scheme} (once)")
        convert(weights_dir, digest, scheme, group, quant_dir, progress)
        marker = _marker_ok(quant_dir, MARKER, expect)
        assert marker is not None
    result = QuantResult(scheme, group, quant_dir, quant_dir, list(marker["fallbacks"]), notes)
    if scheme == "int4":
        result.runtime_dir = _packed_for_cpu(quant_dir, group, progress, notes)
    return result


def _packed_for_cpu(quant_dir: Path, group: int, progress: Progress, notes: list[str]) -> Path:
    packed_dir = quant_dir / packed_key()
    expect = {"format": FORMAT, "key": packed_key(), "group_size": group}
    try:
        ready = _marker_ok(packed_dir, PACKED_MARKER, expect) is not None
    except CorruptCache as exc:
        notes.append(f"the packed int4 copy {packed_dir} was corrupt ({exc}): packed it again")
        ready = False
    if not ready:
        pack_cpu(quant_dir, group, progress)
    error = verify_packed(quant_dir, packed_dir, group)
    if error > CHECK_TOLERANCE:
        notes.append(f"the packed int4 copy {packed_dir.name} did not match its stored form "
                     f"on this CPU (relative error {error:.3g}): packed it again")
        pack_cpu(quant_dir, group, progress)
        error = verify_packed(quant_dir, packed_dir, group)
        if error > CHECK_TOLERANCE:
            raise UsageError(f"the int4 kernel gives wrong results on this CPU ({packed_key()}, "
                             f"relative error {error:.3g}); use --quantize int8")
    return packed_dir
