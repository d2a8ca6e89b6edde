"""Fill-in-the-middle formats: a model whose tokenizer has FIM tokens fills a blank in its own
format (found in the vocabulary, not from the model's name: a fine-tune keeps its base model's
tokens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glmchat.infill import GMASK

from . import rerank
from .fill import Blank, Candidate, FillContext, Filled, beam_fills, stream_fill


@dataclass(frozen=True)
class FimFormat:
    name: str
    prefix: str
    suffix: str
    middle: str
    ends: tuple[str, ...] = ()  # tokens that end the middle, besides the model's EOS
    suffix_first: bool = False  # [SUFFIX]…[PREFIX]… (Codestral)


FIM_FORMATS: tuple[FimFormat, ...] = (
    FimFormat("qwen2.5-coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>",
              ("<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|repo_name|>")),
    FimFormat("starcoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>",
              ("<|endoftext|>", "<file_sep>", "<fim_pad>")),
    FimFormat("santacoder", "<fim-prefix>", "<fim-suffix>", "<fim-middle>",
              ("<|endoftext|>", "<fim-pad>")),
    FimFormat("deepseek-coder", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>",
              ("<｜end▁of▁sentence｜>", "<|EOT|>")),
    FimFormat("codellama", "▁<PRE>", "▁<SUF>", "▁<MID>", ("▁<EOT>",)),
    FimFormat("codellama", "<PRE>", "<SUF>", "<MID>", ("<EOT>",)),
    FimFormat("codestral", "[PREFIX]", "[SUFFIX]", "[MIDDLE]", (), suffix_first=True),
)


def detect_fim(tokenizer: Any) -> FimFormat | None:
    """The FIM format whose three tokens are all in the tokenizer's vocabulary (by token, not by
    the model's name: a fine-tune keeps its base model's tokens)."""
    vocab = tokenizer.get_vocab()
    for fim in FIM_FORMATS:
        if all(token in vocab for token in (fim.prefix, fim.suffix, fim.middle)):
            return fim
    return None


def fim_prompt(ctx: FillContext, fim: FimFormat, prefix: str, suffix: str) -> list[int]:
    vocab = ctx.tokenizer.get_vocab()
    pre = [vocab[fim.prefix], *ctx.encode(prefix, special=False)]
    suf = [vocab[fim.suffix], *ctx.encode(suffix, special=False)]
    start = ctx.encode("")  # the tokenizer's own BOS, if it adds one
    body = suf + pre if fim.suffix_first else pre + suf
    return [*start, *body, vocab[fim.middle]]


@dataclass
class FimStrategy:
    fim: FimFormat
    name: str = "fim"

    def fill(self, ctx: FillContext, blank: Blank) -> Filled:
        vocab = ctx.tokenizer.get_vocab()
        ends = [vocab[t] for t in self.fim.ends if t in vocab]
        settings = ctx.settings(blank.max_new_tokens, ends)
        prompt_ids = fim_prompt(ctx, self.fim, blank.prefix, blank.suffix)
        if ctx.params.strategy == "beam":
            found = beam_fills(ctx, prompt_ids, settings, rerank.boundary(
                GMASK, ctx.params.stop, False))
            return Filled([Candidate(p.text, p.token_ids, p.score, p.finish)
                           for p in found] or [Candidate("", [], None, "length")], False)
        return Filled([stream_fill(ctx, prompt_ids, settings)], True)
