"""`glmchat bench glm`: the in-house GLM-130B at a scaled shape, random weights.

Writes a random checkpoint in the official layout (``--tp`` shards), times glmchat's one-time
conversion (GB/s), then loads the converted copy resident and times prefill and greedy decode
(tokens/s, and the weight bytes read per token, the number that decides GLM-130B's speed) for
each ``--dtypes``. The default shape is about 1 B parameters (16 layers, hidden 2048, inner 5504,
16 heads, GLM-130B's vocabulary). The GLM-130B family loads resident for now, so there is no
offloaded side to compare yet (README: GLM-130B, known gaps).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from glmchat.usage import Parser


def write_random_checkpoint(directory: Path, layers: int, hidden: int, inner: int, heads: int,
                            vocab: int, tp: int, seed: int = 0) -> int:
    """Official layout, fp16, split ``tp`` ways by convert_tp.py's rules; returns bytes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    hn = hidden // heads
    inv_freq = (1.0 / (10000 ** (torch.arange(0, hn, 2).float() / hn))).half()

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, generator=g) / shape[-1] ** 0.5).half()

    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    emb = rand(vocab, hidden)
    for r, part in enumerate(emb.chunk(tp)):
        shards[r]["transformer.word_embeddings.weight"] = part.clone()
    for n in range(layers):
        p = f"transformer.layers.{n}."
        qkv_w, qkv_b = rand(3 * hidden, hidden), rand(3 * hidden)
        dense_w, h4_w, h4_b = rand(hidden, hidden), rand(2 * inner, hidden), rand(2 * inner)
        out_w = rand(hidden, inner)
        x1, x2 = h4_w.chunk(2)
        b1, b2 = h4_b.chunk(2)
        for r in range(tp):
            s = shards[r]
            for name in ("input_layernorm", "post_attention_layernorm"):
                s[p + name + ".weight"] = torch.ones(hidden, dtype=torch.half)
                s[p + name + ".bias"] = torch.zeros(hidden, dtype=torch.half)
            s[p + "attention.query_key_value.weight"] = qkv_w.chunk(tp)[r].clone()
            s[p + "attention.query_key_value.bias"] = qkv_b.chunk(tp)[r].clone()
            s[p + "attention.dense.weight"] = dense_w.chunk(tp, dim=1)[r].clone()
            s[p + "attention.dense.bias"] = torch.zeros(hidden, dtype=torch.half)
            s[p + "mlp.dense_h_to_4h.weight"] = torch.cat((x1.chunk(tp)[r], x2.chunk(tp)[r]))
            s[p + "mlp.dense_h_to_4h.bias"] = torch.cat((b1.chunk(tp)[r], b2.chunk(tp)[r]))
            s[p + "mlp.dense_4h_to_h.weight"] = out_w.chunk(tp, dim=1)[r].clone()
            s[p + "mlp.dense_4h_to_h.bias"] = torch.zeros(hidden, dtype=torch.half)
            s[p + "attention.rotary_emb.inv_freq"] = inv_freq.clone()
    for s in shards:
        s["transformer.final_layernorm.weight"] = torch.ones(hidden, dtype=torch.half)
        s["transformer.final_layernorm.bias"] = torch.zeros(hidden, dtype=torch.half)
    (directory / "1").mkdir(parents=True, exist_ok=True)
    (directory / "latest").write_text("1")
    total = 0
    for r, s in enumerate(shards):
        torch.save({"module": s}, directory / "1" / f"mp_rank_{r:02d}_model_states.pt")
        total += sum(t.numel() * t.element_size() for t in s.values())
    return total


def main(argv: list[str]) -> int:
    parser = Parser(prog="glmchat bench glm", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inner", type=int, default=5504)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=150528)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--work-dir", type=Path, help="where the checkpoints go (default: temp)")
    args = parser.parse_args(argv)

    import torch
    from glmchat.model import generate as gen
    from glmchat.model import glm_checkpoint as ckpt
    from glmchat.model import glm_generate as glm
    from glmchat.model.family_glm130b import load_weights
    from glmchat.model.glm130b import GLM130B
    from glmchat.model.icetk_tokenizer import SOP

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="glmchat-bench-glm-"))
    report: dict[str, object] = {"shape": vars(args) | {"work_dir": str(work)}}
    t0 = time.perf_counter()
    written = write_random_checkpoint(work / "ckpt", args.layers, args.hidden, args.inner,
                                      args.heads, args.vocab, args.tp)
    report["checkpoint_gb"] = round(written / 1e9, 3)
    report["write_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    config = ckpt.convert(ckpt.find(work / "ckpt"), work / "converted",
                          report=lambda line: print(f"  convert: {line}", file=sys.stderr))
    convert_s = time.perf_counter() - t0
    report["convert_s"] = round(convert_s, 2)
    report["convert_gb_per_s"] = round(written / 1e9 / convert_s, 3)
    prompt = [20000 + (i * 7919) % 100000 for i in range(args.prompt_tokens)]
    seq, _, use_gmask = glm.build_sequence(prompt)
    runs = []
    for name in [d for d in args.dtypes.split(",") if d]:
        dtype = getattr(torch, name)
        with torch.device("meta"):
            model = GLM130B(config)
        t0 = time.perf_counter()
        load_weights(model, work / "converted", dtype, torch.device("cpu"))
        load_s = time.perf_counter() - t0
        timing = gen.StepTiming()
        with torch.inference_mode():
            glm.filling_sequence(model.eval(), [*seq, SOP], len(seq) - 1, use_gmask,
                                 args.new_tokens, glm.Sampling(greedy=True, end_tokens=()),
                                 timing=timing)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        step = sorted(timing.step_s)[len(timing.step_s) // 2] if timing.step_s else 0.0
        runs.append({"dtype": name, "load_s": round(load_s, 2),
                     "prefill_tokens_per_s": round(timing.prefill_tokens / timing.prefill_s, 1),
                     "decode_tokens_per_s": round(1 / step, 2) if step else None,
                     "weight_gb_read_per_token": round(weight_bytes / 1e9, 3),
                     "effective_gb_per_s": round(weight_bytes / 1e9 / step, 2) if step else None})
        del model
    report["runs"] = runs
    print(json.dumps(report, indent=1))
    return 0
