"""GLM-130B's official checkpoint: find it, merge its tensor-parallel shards, convert it once.

The release is ``DIR/latest`` (the iteration, e.g. ``49300``) and
``DIR/<iter>/mp_rank_XX_model_states.pt`` = ``{"module": state_dict}`` at TP 1, 2, 4 or 8
(SPEC §6). ``convert`` merges it by GLM-130B's tools/convert_tp.py rules into per-layer
safetensors: one shard open at a time (``torch.load(mmap=True, weights_only=True)``, so a
checkpoint never runs code), each layer written as soon as it is merged, everything in a temp
dir renamed into place at the end — an interrupted conversion leaves nothing a start trusts.
"""

from __future__ import annotations

import json
import pickle
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from glmchat.errors import UsageError

from .atomic_dir import CACHE_HINT, building
from .glm130b import GLM130BConfig

SHARD_RE = re.compile(r"^mp_rank_(\d\d)_model_states\.pt$")
MARKER = "glmchat-glm130b.json"  # written last: its presence means the conversion finished
LAYER_PREFIX = "transformer.layers."
EMBEDDING = "transformer.word_embeddings.weight"
# convert_tp.py L18-35: kept from shard 0; joined along dim 1; GeGLU halves regrouped; else dim 0
REPLICATED = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "attention.dense.bias", "mlp.dense_4h_to_h.bias",
              "attention.rotary_emb.inv_freq")
CONCAT_DIM1 = ("attention.dense.weight", "mlp.dense_4h_to_h.weight")
GLU = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")
DEFAULT_HEAD_DIM = 128

Report = Callable[[str], None]


@dataclass
class OfficialCheckpoint:
    directory: Path
    iteration: str
    shards: list[Path]  # rank order

    @property
    def tp(self) -> int:
        return len(self.shards)


def is_official(path: Path) -> bool:
    return path.is_dir() and (path / "latest").is_file()


def find(directory: Path) -> OfficialCheckpoint:
    """Check the layout (not the tensors) and name the shard files in rank order."""
    try:
        iteration = (directory / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{directory}/latest cannot be read ({exc}); it should hold the "
                         "iteration, e.g. 49300") from None
    if not iteration or "/" in iteration or iteration.startswith("."):
        raise UsageError(f"{directory}/latest names no iteration ({iteration!r}); "
                         "write the iteration folder's name into it, e.g. 49300")
    folder = directory / iteration
    if not folder.is_dir():
        raise UsageError(f"{directory}/latest names iteration {iteration} but {folder} does not "
                         "exist; fix latest or download that iteration")
    ranks: dict[int, Path] = {}
    for entry in folder.iterdir():
        match = SHARD_RE.match(entry.name)
        if match:
            ranks[int(match.group(1))] = entry
    if not ranks:
        raise UsageError(f"{folder} has no mp_rank_XX_model_states.pt shards; "
                         "download the checkpoint's shards into it")
    n = max(ranks) + 1
    missing = [r for r in range(n) if r not in ranks]
    if missing:
        raise UsageError(f"{folder} lacks shard mp_rank_{missing[0]:02d}_model_states.pt of "
                         f"{n}; download the missing shard")
    return OfficialCheckpoint(directory, iteration, [ranks[r] for r in range(n)])


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """One shard's state dict, memory-mapped; never runs code from the file."""
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"{path} is not a plain checkpoint (it asks to run code or holds "
                         "objects other than tensors); refusing to load it") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"{path} is truncated or corrupt ({first}); re-download it") from None
    module = loaded.get("module") if isinstance(loaded, dict) else None
    if not isinstance(module, dict) or EMBEDDING not in module:
        raise UsageError(f"{path} is not a GLM-130B checkpoint shard (no 'module' state dict "
                         f"with {EMBEDDING}); point --model at the checkpoint directory")
    if any(key.endswith("_scale") for key in module):
        raise UsageError(f"{path} is a quantized (int4/int8) checkpoint; glmchat loads the fp16 "
                         "release for now: use the unquantized checkpoint")
    return module


def merge_tensor(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """convert_tp.py's rule for one key (the part after ``transformer.layers.N.``)."""
    if len(parts) == 1 or key.endswith(REPLICATED) or key.startswith("transformer.final_"):
        return parts[0]
    if key.endswith(CONCAT_DIM1):
        return torch.cat(parts, dim=1)
    if key.endswith(GLU):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=0)


def _layer_of(key: str) -> int | None:
    if not key.startswith(LAYER_PREFIX):
        return None
    return int(key[len(LAYER_PREFIX):].split(".", 1)[0])


def infer_config(first: dict[str, torch.Tensor], tp: int, heads: int = 0) -> GLM130BConfig:
    """Shapes from the tensors (shard 0 times the TP degree), heads from the rotary buffer."""
    layers = sorted({n for k in first if (n := _layer_of(k)) is not None})
    if not layers or layers != list(range(len(layers))):
        raise UsageError("the checkpoint's layers are not numbered 0..N-1; it is incomplete")
    vocab_rows, hidden = first[EMBEDDING].shape
    inner = first[f"{LAYER_PREFIX}0.mlp.dense_h_to_4h.weight"].shape[0] // 2 * tp
    if not heads:
        inv_freq = first.get(f"{LAYER_PREFIX}0.attention.rotary_emb.inv_freq")
        head_dim = 2 * inv_freq.numel() if inv_freq is not None else DEFAULT_HEAD_DIM
        if hidden % head_dim:
            raise UsageError(f"hidden size {hidden} is not a multiple of head dim {head_dim}; "
                             "pass --num-heads N")
        heads = hidden // head_dim
    if hidden % heads or heads % tp:
        raise UsageError(f"{heads} heads do not divide hidden size {hidden} across {tp} shards;"
                         " pass --num-heads N")
    return GLM130BConfig(num_layers=len(layers), hidden_size=hidden, inner_hidden_size=inner,
                         vocab_size=vocab_rows * tp, num_attention_heads=heads)


def _check_shapes(ckpt: OfficialCheckpoint, rank: int, first: dict[str, torch.Tensor],
                  shard: dict[str, torch.Tensor]) -> None:
    if sorted(first) != sorted(shard):
        raise UsageError(f"{ckpt.shards[rank]} holds other keys than "
                         f"{ckpt.shards[0].name}; the shards are of different checkpoints")
    for key, tensor in first.items():
        if shard[key].shape != tensor.shape:
            raise UsageError(f"{ckpt.shards[rank]}: {key} is {list(shard[key].shape)} but "
                             f"{list(tensor.shape)} in {ckpt.shards[0].name}; the shards mix "
                             "tensor-parallel degrees (use one download)")


def convert(ckpt: OfficialCheckpoint, target: Path, heads: int = 0,
            report: Report | None = None, source_digest: str = "",
            hint: str = CACHE_HINT) -> GLM130BConfig:
    """Merge the shards into ``target``: config.json, embedding.safetensors and
    layer_NNN.safetensors; atomic (temp dir + rename)."""
    from safetensors.torch import save_file

    with building(target, ".converting-", hint=hint) as tmp:
        first = load_shard(ckpt.shards[0])
        for rank in range(1, ckpt.tp):
            _check_shapes(ckpt, rank, first, load_shard(ckpt.shards[rank]))
        config = infer_config(first, ckpt.tp, heads)
        del first
        groups: list[tuple[str, list[str]]] = []
        keys = sorted(load_shard(ckpt.shards[0]))
        groups.append(("embedding", [k for k in keys if _layer_of(k) is None]))
        for n in range(config.num_layers):
            prefix = f"{LAYER_PREFIX}{n}."
            groups.append((f"layer_{n:03d}", [k for k in keys if k.startswith(prefix)]))
        started, written = time.perf_counter(), 0
        for index, (name, group) in enumerate(groups):
            parts: dict[str, list[torch.Tensor]] = {k: [] for k in group}
            for shard_path in ckpt.shards:  # one shard open at a time
                shard = load_shard(shard_path)
                for key in group:
                    parts[key].append(shard[key].clone())
                del shard
            merged = {k: merge_tensor(k, v).contiguous() for k, v in parts.items()
                      if not k.endswith("rotary_emb.inv_freq")}
            save_file(merged, str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
            written += sum(t.numel() * t.element_size() for t in merged.values())
            del parts, merged
            if report is not None:
                elapsed = max(time.perf_counter() - started, 1e-9)
                rate = written / elapsed
                eta = elapsed / (index + 1) * (len(groups) - index - 1)
                report(f"layer {index}/{len(groups) - 1} {rate / 1e9:.2f} GB/s "
                       f"ETA {eta:.0f} s")
        (tmp / "config.json").write_text(json.dumps(
            {"architecture": "GLM130B", **asdict(config)}, indent=1))
        (tmp / MARKER).write_text(json.dumps(
            {"source": str(ckpt.directory), "iteration": ckpt.iteration, "tp": ckpt.tp,
             "sha256": source_digest}, indent=1))
    return config


def read_config(converted: Path, heads: int = 0) -> GLM130BConfig:
    values = json.loads((converted / "config.json").read_text())
    values.pop("architecture", None)
    config = GLM130BConfig(**values)
    if heads:
        if config.hidden_size % heads:
            raise UsageError(f"{heads} heads do not divide hidden size {config.hidden_size}")
        config.num_attention_heads = heads
    return config


def is_converted(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def converted_files(converted: Path, n_layers: int) -> list[Path]:
    return [converted / "embedding.safetensors",
            *(converted / f"layer_{n:03d}.safetensors" for n in range(n_layers))]
