"""`glmchat bench make-model OUT`: a random-weight Llama-shaped model for offload benchmarks.

Values do not matter for speed, shapes and bytes do: the model has a real architecture's
layout, the default model's tokenizer (so prompts and chat templates work) and safetensors
shards as HuggingFace writes them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

from glmchat.usage import Parser

SHARD_BYTES = 2 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 49152  # the default model's tokenizer

    def params(self, tied: bool = False) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return self.layers * layer + self.vocab * self.hidden * (1 if tied else 2) + self.hidden


PRESETS = {
    "tiny": Shape(hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2),
    "135M": Shape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3),
    "1.1B": Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),
    "7B": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),
}


def parse_count(text: str) -> float:
    scale = {"K": 1e3, "M": 1e6, "B": 1e9}.get(text[-1:].upper(), 1.0)
    number = text[:-1] if scale != 1.0 else text
    try:
        return float(number) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count like 1.1B, "
                                         f"or one of {', '.join(PRESETS)}") from None


def shape_for(params: str) -> Shape:
    """A preset by name, or the nearest preset's width with as many layers as reach the count."""
    if params in PRESETS:
        return PRESETS[params]
    target = parse_count(params)
    base = min(PRESETS.values(), key=lambda s: abs(s.params() - target))
    per_layer = base.params() - replace(base, layers=0).params()
    layers = max(1, round((target - replace(base, layers=0).params()) / per_layer))
    return replace(base, layers=layers)


def write_model(out: Path, shape: Shape, dtype_name: str, tokenizer_dir: Path, *,
                tied: bool = False, seed: int = 0) -> int:
    """Write config, tokenizer and random weights to ``out``; returns the number of params."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32,
             "float16": torch.float16}[dtype_name]
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        rms_norm_eps=1e-5, dtype=dtype_name)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)

    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight",
                                                   (shape.vocab, shape.hidden))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "self_attn.q_proj.weight", (shape.hidden, shape.hidden)),
            (p + "self_attn.k_proj.weight", (kv, shape.hidden)),
            (p + "self_attn.v_proj.weight", (kv, shape.hidden)),
            (p + "self_attn.o_proj.weight", (shape.hidden, shape.hidden)),
            (p + "mlp.gate_proj.weight", (shape.intermediate, shape.hidden)),
            (p + "mlp.up_proj.weight", (shape.intermediate, shape.hidden)),
            (p + "mlp.down_proj.weight", (shape.hidden, shape.intermediate)),
            (p + "input_layernorm.weight", (shape.hidden,)),
            (p + "post_attention_layernorm.weight", (shape.hidden,)),
        ]
    tensors.append(("model.norm.weight", (shape.hidden,)))
    if not tied:
        tensors.append(("lm_head.weight", (shape.vocab, shape.hidden)))

    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    total = 0
    for name, dims in tensors:
        if len(dims) == 1:
            tensor = torch.ones(dims, dtype=dtype)
        else:
            tensor = torch.randn(dims, generator=generator).mul_(0.02).to(dtype)
        if shard_bytes and shard_bytes + tensor.nbytes > SHARD_BYTES:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += tensor.nbytes
        total += tensor.numel()
    weight_map = {}
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    for shard, file_name in zip(shards, names, strict=True):
        save_file(shard, str(out / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())},
                 "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def default_tokenizer_dir() -> Path:
    """The converted default model's directory (converting it once if needed)."""
    from glmchat.model import sources

    resolved = sources.resolve("default")
    if resolved.needs_conversion:
        sources.convert_gguf(resolved, lambda done, total, what: None)
    return resolved.weights_dir


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="glmchat bench make-model",
                    description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory to write the model to")
    parser.add_argument("--params", default="1.1B",
                        help=f"a preset ({', '.join(PRESETS)}) or a count like 2B")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "float16"),
                        default="bfloat16")
    parser.add_argument("--hidden-size", type=int)
    parser.add_argument("--intermediate-size", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int)
    parser.add_argument("--tied", action="store_true", help="tie the head to the embeddings")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    shape = shape_for(args.params)
    overrides = {"hidden": args.hidden_size, "intermediate": args.intermediate_size,
                 "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads}
    shape = replace(shape, **{k: v for k, v in overrides.items() if v is not None})
    t0 = time.perf_counter()
    count = write_model(args.out, shape, args.dtype, default_tokenizer_dir(), tied=args.tied,
                        seed=args.seed)
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(f"wrote {args.out}: {count / 1e9:.2f}B parameters, {args.dtype}, {shape.layers} layers, "
          f"{size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f}s")
    return 0
