"""A tiny random GLM-130B checkpoint in the official layout, regenerated from a seed.

``make_state_dict`` repeats the reference oracle's seeded initialisation
(../shared/glm130b/reference/oracle.py ``make_full_state_dict``) draw for draw, in SAT's key
order, so the weights are bit-identical to the ones THUDM's code ran (checked against the
fixture's sha256 of every tensor). ``write_checkpoint`` splits them by convert_tp.py's rules.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

FIXTURE = Path(__file__).parent / "fixtures" / "glm130b_reference.json"
ITERATION = "49300"


def fixture() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(FIXTURE.read_text())
    return data


def tensor_sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _shape(key: str, cfg: dict[str, Any]) -> tuple[int, ...]:
    h, inner = cfg["hidden_size"], cfg["inner_hidden_size"]
    tail = key.split(".", 3)[-1] if key.startswith("transformer.layers.") else key
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.word_embeddings.weight": (cfg["vocab_size"], h),
        "transformer.final_layernorm.weight": (h,), "transformer.final_layernorm.bias": (h,),
        "input_layernorm.weight": (h,), "input_layernorm.bias": (h,),
        "post_attention_layernorm.weight": (h,), "post_attention_layernorm.bias": (h,),
        "attention.query_key_value.weight": (3 * h, h), "attention.query_key_value.bias": (3 * h,),
        "attention.dense.weight": (h, h), "attention.dense.bias": (h,),
        "mlp.dense_h_to_4h.weight": (2 * inner, h), "mlp.dense_h_to_4h.bias": (2 * inner,),
        "mlp.dense_4h_to_h.weight": (h, inner), "mlp.dense_4h_to_h.bias": (h,),
    }
    return shapes[tail]


def make_state_dict(data: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    data = data or fixture()
    cfg, init = data["config"], data["config"]["init"]
    g = torch.Generator().manual_seed(cfg["seed"])
    h, inner = cfg["hidden_size"], cfg["inner_hidden_size"]
    sd: dict[str, torch.Tensor] = {}
    for name in data["key_order"]:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        r = torch.randn(_shape(name, cfg), generator=g, dtype=torch.float32)
        if name.endswith("word_embeddings.weight"):
            t = r * init["embedding_std"]
        elif name.endswith("layernorm.weight"):
            t = 1.0 + 0.1 * r
        elif name.endswith("query_key_value.weight"):
            t = r * init["qkv_gain"] / math.sqrt(h)
        elif name.endswith("dense_4h_to_h.weight"):
            t = r * init["out_gain"] / math.sqrt(inner)
        elif name.endswith("attention.dense.weight"):
            t = r * init["out_gain"] / math.sqrt(h)
        elif name.endswith(".weight"):
            t = r / math.sqrt(h)
        else:
            t = 0.1 * r
        sd[name] = t.half()
    emb = sd["transformer.word_embeddings.weight"]
    row_scale = torch.exp(init["embedding_row_lognormal_sigma"]
                          * torch.randn(emb.shape[0], generator=g, dtype=torch.float32))
    emb = (emb.float() * row_scale[:, None]).half()
    median_norm = emb.float().norm(dim=-1).median()
    specials = data["special_tokens"]
    for tname, factor in [*init["special_row_norm_x_median"].items(),
                          *init["end_token_row_norm_x_median"].items()]:
        row = emb[specials[tname]].float()
        emb[specials[tname]] = (row / row.norm() * median_norm * factor).half()
    off = init["logit_shift"]
    emb[:, off["column"]] = off["embedding_value"]
    sd["transformer.final_layernorm.weight"][off["column"]] = 0.0
    sd["transformer.final_layernorm.bias"][off["column"]] = off["final_ln_bias"]
    sd["transformer.word_embeddings.weight"] = emb
    hn = h // cfg["num_attention_heads"]
    inv_freq = (1.0 / (10000 ** (torch.arange(0, hn, 2).float() / hn))).half()
    for i in range(cfg["num_layers"]):
        sd[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
    return {k: sd[k] for k in data["key_order"]}


def split(sd: dict[str, torch.Tensor], tp: int) -> list[dict[str, torch.Tensor]]:
    """convert_tp.py's split: the inverse of its merge."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for key, t in sd.items():
        if key.endswith(("layernorm.weight", "layernorm.bias", "attention.dense.bias",
                         "dense_4h_to_h.bias", "rotary_emb.inv_freq")):
            parts = [t.clone() for _ in range(tp)]
        elif key.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            parts = [p.clone() for p in t.chunk(tp, dim=1)]
        elif key.endswith(("dense_h_to_4h.weight", "dense_h_to_4h.bias")):
            x1, x2 = t.chunk(2, dim=0)
            parts = [torch.cat((a, b)) for a, b in zip(x1.chunk(tp), x2.chunk(tp), strict=True)]
        else:
            parts = [p.clone() for p in t.chunk(tp, dim=0)]
        for shard, part in zip(shards, parts, strict=True):
            shard[key] = part
    return shards


def write_checkpoint(directory: Path, tp: int = 1,
                     sd: dict[str, torch.Tensor] | None = None) -> Path:
    sd = sd if sd is not None else make_state_dict()
    (directory / ITERATION).mkdir(parents=True, exist_ok=True)
    (directory / "latest").write_text(ITERATION)
    for rank, shard in enumerate(split(sd, tp) if tp > 1 else [sd]):
        torch.save({"module": shard},
                   directory / ITERATION / f"mp_rank_{rank:02d}_model_states.pt")
    return directory
