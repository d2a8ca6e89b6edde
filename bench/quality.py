"""`glmchat bench quality`: what weight-only quantization costs, measured on a fixed text.

Every scheme is loaded through the engine (``model/engine.py``, the same path a chat takes)
beside the full-width model; the text is cut into chunks of ``--chunk`` tokens, each scored
in one forward by every model. Reported per scheme: perplexity of the text, its change from
full width, top-1 agreement (the share of positions where both models rank the same next token
first) and the mean KL divergence KL(full || scheme) of the next-token distributions.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "quality.txt"
SCHEMES = ("int8", "int4-g32", "int4-g64", "int4-g128")


@dataclass
class Score:
    name: str
    ppl: float
    top1: float = 1.0  # agreement with full width
    kl: float = 0.0  # mean KL(full || this), nats per position


def parse_scheme(label: str) -> tuple[str, int]:
    """"int4-g64" → ("int4", 64); "int8" → ("int8", 32)."""
    scheme, _, group = label.partition("-g")
    return scheme, int(group) if group else 32


def load(model: str, label: str, cpu_memory: float | None = None) -> Any:
    """The engine's LoadedModel for ``label`` ("none", "int8", "int4-g32" …)."""
    from glmchat.model.engine import Engine

    from glmchat.protocol import ModelSpec

    scheme, group = parse_scheme(label)
    return Engine(lambda event: None).load(ModelSpec(path=model, quantize=scheme,
                                                     quant_group=group, cpu_memory=cpu_memory))


def token_ids(tokenizer: Any, text: str) -> list[int]:
    return [int(i) for i in tokenizer(text)["input_ids"]]


def compare(reference: Any, candidates: dict[str, Any], ids: list[int], chunk: int
            ) -> list[Score]:
    """Score the reference (full width) and every candidate model on ``ids``."""
    import torch

    nll = {name: 0.0 for name in ["none", *candidates]}
    agree = {name: 0 for name in candidates}
    kl = {name: 0.0 for name in candidates}
    count = 0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, chunk):
            piece = torch.tensor([ids[start:start + chunk + 1]])
            inputs, targets = piece[:, :-1], piece[0, 1:]
            if targets.numel() == 0:
                break
            ref = reference(inputs).logits[0].float().log_softmax(-1)
            nll["none"] -= float(ref.gather(1, targets[:, None]).sum())
            ref_top = ref.argmax(-1)
            for name, model in candidates.items():
                out = model(inputs).logits[0].float().log_softmax(-1)
                nll[name] -= float(out.gather(1, targets[:, None]).sum())
                agree[name] += int((out.argmax(-1) == ref_top).sum())
                kl[name] += float((ref.exp() * (ref - out)).sum())
            count += targets.numel()
    scores = [Score("none", float(torch.exp(torch.tensor(nll["none"] / count))))]
    for name in candidates:
        scores.append(Score(name, float(torch.exp(torch.tensor(nll[name] / count))),
                            top1=agree[name] / count, kl=kl[name] / count))
    return scores


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmchat bench quality",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model directory, .gguf or default")
    parser.add_argument("--schemes", default=",".join(SCHEMES),
                        help="comma-separated: int8, int4-g32, int4-g64, int4-g128, int4-g256")
    parser.add_argument("--text", type=Path, default=TEXT, help="the text to score")
    parser.add_argument("--max-tokens", type=int, default=0, help="score only the first N")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per forward")
    return parser


def main(argv: list[str]) -> int:
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from glmchat.model.qlinear import quantized_bytes

    args = build_parser().parse_args(argv)
    labels = [s for s in args.schemes.split(",") if s]
    full = load(args.model, "none")
    ids = token_ids(full.tokenizer, args.text.read_text())
    ids = ids[:args.max_tokens] if args.max_tokens else ids
    candidates = {}
    for label in labels:
        candidates[label] = load(args.model, label)
    scores = compare(full.model, {k: v.model for k, v in candidates.items()}, ids, args.chunk)
    base = scores[0].ppl
    print(f"model: {full.info.name} ({full.info.dtype} compute), text: {args.text.name}, "
          f"{len(ids)} tokens in chunks of {args.chunk}")
    print(f"{'scheme':10s} {'ppl':>8s} {'Δ ppl':>8s} {'top-1':>7s} {'KL':>8s} "
          f"{'linear MB':>10s}")
    for score in scores:
        loaded = candidates.get(score.name, full)
        mb = quantized_bytes(loaded.model) / 1e6
        print(f"{score.name:10s} {score.ppl:8.3f} {(score.ppl / base - 1) * 100:+7.2f}% "
              f"{score.top1 * 100:6.2f}% {score.kl:8.4f} {mb:10.1f}")
    return 0
