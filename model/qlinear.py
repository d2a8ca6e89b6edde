"""The Linear layer of a quantized model, computed with torch's own weight-only kernels.

``swap_linears`` replaces, in a model built on the meta device, every ``nn.Linear`` whose
weight the checkpoint stores as integers (``model/quant.py`` wrote it) with a ``QLinear`` whose
parameters have the stored names, shapes and dtypes: ``weight`` (int8, or uint8 for int4) and
``weight_scale`` (int8) or ``weight_scale_zeros`` (int4, CPU-packed). Placement then counts
the quantized bytes, and the offload runtime loads and streams these parameters like any.

Compute (activations in bfloat16: with float32 activations the same kernels are 5-30x slower;
the result goes back to the model's dtype):

- CPU int8: ``aten._weight_int8pack_mm``; CPU int4: ``aten._weight_int4pack_mm_for_cpu``.
- CUDA int8: dequantize to bfloat16 + cuBLAS. Written, not run (no GPU was lent to this work).
  CUDA int4 (``aten._weight_int4pack_mm``, its own packing) is not written yet: ``quant.prepare``
  refuses it with a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

KERNEL_DTYPE = torch.bfloat16


def quant_matmul(scheme: str, group: int, x: torch.Tensor, tensors: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """``x`` (bf16 ``[M, K]``) times the quantized weight transposed: bf16 ``[M, N]``."""
    weight = tensors["weight"]
    if scheme == "int8":
        scale = tensors["weight_scale"]
        if scale.dtype != KERNEL_DTYPE:
            scale = scale.to(KERNEL_DTYPE)
        if weight.is_cuda:
            return nn.functional.linear(x, weight.to(KERNEL_DTYPE) * scale[:, None])
        if weight.data_ptr() % 64:  # the kernel faults on unaligned weights (quant.ALIGN)
            weight = weight.clone()
        return torch.ops.aten._weight_int8pack_mm(x, weight, scale)
    if scheme == "int4":
        if weight.is_cuda:
            raise NotImplementedError("int4 on CUDA")
        scale_zeros = tensors["weight_scale_zeros"]
        if scale_zeros.dtype != KERNEL_DTYPE:
            scale_zeros = scale_zeros.to(KERNEL_DTYPE)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group, scale_zeros)
    raise ValueError(f"unknown scheme {scheme!r}")


class QLinear(nn.Module):
    def __init__(self, scheme: str, group: int, in_features: int, out_features: int,
                 shapes: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 bias: nn.Parameter | None) -> None:
        super().__init__()
        self.scheme = scheme
        self.group_size = group
        self.in_features = in_features
        self.out_features = out_features
        self.tensor_names = sorted(shapes)
        for name, (shape, dtype) in shapes.items():
            self.register_parameter(name, nn.Parameter(
                torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False))
        self.bias = bias

    def extra_repr(self) -> str:
        group = f", group {self.group_size}" if self.scheme == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"{self.scheme}{group}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tensors = {name: self._parameters[name] for name in self.tensor_names}
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != KERNEL_DTYPE:
            flat = flat.to(KERNEL_DTYPE)
        out = quant_matmul(self.scheme, self.group_size, flat, tensors)  # type: ignore[arg-type]
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        out = out.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            out = out + self.bias
        return out


def stored_shapes(directory: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor's shape and dtype, from the safetensors headers (no data read)."""
    from safetensors import safe_open

    from .mapped import SAFETENSORS_DTYPES

    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                piece: Any = f.get_slice(key)
                out[key] = (tuple(piece.get_shape()), SAFETENSORS_DTYPES[piece.get_dtype()])
    return out


def swap_linears(model: nn.Module, directory: Path, scheme: str, group: int) -> int:
    """Replace the Linears the checkpoint in ``directory`` stores quantized; returns how many."""
    shapes = stored_shapes(directory)
    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        stored = shapes.get(f"{name}.weight")
        if stored is None or stored[1].is_floating_point:
            continue
        prefix = f"{name}."
        own = {key[len(prefix):]: value for key, value in shapes.items()
               if key.startswith(prefix) and key[len(prefix):].startswith("weight")}
        bias = module.bias if module.bias is not None else None
        # Each matrix's scheme is its stored dtype's: an int4 model keeps an int8 head.
        own_scheme = "int8" if stored[1] == torch.int8 else scheme
        replacement = QLinear(own_scheme, group, module.in_features, module.out_features, own,
                              bias)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, replacement)
        swapped += 1
    return swapped


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the quantized layers' parameters (the stored, streamed form)."""
    return sum(p.numel() * p.element_size() for m in model.modules() if isinstance(m, QLinear)
               for p in m.parameters(recurse=False))


def lookup_on_disk(model: nn.Module, directory: Path, dtype: torch.dtype) -> bool:
    """Whether placement should put the embedding table on disk first: the head is a quantized
    copy (``quant.py`` untied it) and the table is stored in the compute dtype, so the runtime
    maps it and a lookup reads only its rows (``offload._load``)."""
    if not getattr(getattr(model, "config", None), "glmchat_untied_head", None):
        return False
    embedding = model.get_input_embeddings()  # type: ignore[operator]
    names = {id(m): n for n, m in model.named_modules()}
    stored = stored_shapes(directory).get(f"{names.get(id(embedding), '')}.weight")
    return stored is not None and stored[1] == dtype
