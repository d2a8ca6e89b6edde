"""The GLM-130B family: the official checkpoint, icetk ids, the in-house model, its own blank
loop and beam search (SPEC §2-6).

Every request is a blank-filling one, as in GLM-130B's generate.py: a prompt without masks gets
``[gMASK]`` appended. Blanks are filled left to right by model/glm_generate.py; greedy, seeded
sampling (BaseStrategy) or beam search (BeamSearchStrategy, deterministic).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from pathlib import Path

import torch

from glmchat import paths
from glmchat.errors import UsageError
from glmchat.infill import GMASK, MASK, SMASK, MaskedText, parse_masks, splice
from glmchat.protocol import (
    Beam,
    Generate,
    GenerationResult,
    ModelInfo,
    ModelSpec,
    Token,
)

from . import generate as gen
from . import glm_checkpoint as ckpt
from . import glm_generate as glm
from . import placement as place
from . import sources
from .clock import RunContext
from .family import LoadedModel, Progress
from .glm130b import GLM130B, GLM130BConfig
from .icetk_tokenizer import END_TOKENS, IceTextTokenizer, find_file
from .icetk_tokenizer import GMASK as GMASK_ID
from .icetk_tokenizer import MASK as MASK_ID
from .icetk_tokenizer import SMASK as SMASK_ID

MASK_IDS = {MASK: MASK_ID, SMASK: SMASK_ID, GMASK: GMASK_ID}
MASK_RE = re.compile(r"\[[sg]?MASK\]")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def converted_dir(source: Path, spec: ModelSpec, progress: Progress) -> tuple[Path, str]:
    """The per-layer safetensors of ``source``: converted once into the cache, by digest."""
    if ckpt.is_converted(source):
        marker = (source / ckpt.MARKER).read_text()
        return source, marker
    found = ckpt.find(source)
    digest = sources.files_digest([*found.shards, source / "latest"])
    target = paths.models_cache_dir() / f"glm130b-{digest[:16]}"
    if not ckpt.is_converted(target):
        progress(1, 4, f"converting {source.name} (once, TP={found.tp})")
        ckpt.convert(found, target, heads=spec.num_heads, source_digest=digest,
                     report=lambda line: progress(1, 4, f"converting {source.name}: {line}"))
    return target, digest


def load_weights(model: GLM130B, converted: Path, dtype: torch.dtype,
                 device: torch.device) -> None:
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for file in ckpt.converted_files(converted, model.config.num_layers):
        sources.check_safetensors(file)
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UsageError(f"{converted} does not fit a GLM-130B model: {first}; "
                         "delete it to convert again") from None


class Glm130bFamily:
    name = "glm130b"
    default_beam_scorer = "glm130b"

    def claims(self, source: str) -> bool:
        path = Path(source).expanduser()
        return source != "default" and (ckpt.is_official(path) or ckpt.is_converted(path))

    def load(self, spec: ModelSpec, progress: Progress) -> LoadedModel:
        source = Path(spec.path).expanduser()
        progress(0, 4, f"checking {spec.path}")
        if spec.quantize != "none":
            raise UsageError(f"--quantize {spec.quantize} is not available for GLM-130B "
                             f"checkpoints yet ({spec.path}); load it at full width "
                             "(--quantize none)")
        converted, digest = converted_dir(source, spec, progress)
        config: GLM130BConfig = ckpt.read_config(converted, spec.num_heads)
        tokenizer = IceTextTokenizer(
            find_file(spec.tokenizer, source if ckpt.is_official(source) else None),
            config.vocab_size)
        on_gpu = place.gpu_count() > 0
        dtype = DTYPES.get(spec.dtype) or (torch.float16 if on_gpu else torch.float32)
        device = torch.device("cuda:0" if on_gpu else "cpu")
        progress(2, 4, "building the model")
        with torch.device("meta"):
            model = GLM130B(config)
        progress(3, 4, f"loading {source.name} weights")
        load_weights(model, converted, dtype, device)
        model.eval()
        n_params = sum(p.numel() for p in model.parameters())
        placement = place.summarize(model, None, "resident")
        info = ModelInfo(
            name=source.resolve().name, source=spec.path, weights_dir=str(converted),
            digest=digest, architecture="GLM130B", n_params=n_params,
            dtype=str(dtype).removeprefix("torch."), n_layers=config.num_layers,
            context_length=config.max_sequence_length, has_chat_template=False,
            eos_token_ids=list(END_TOKENS))
        progress(4, 4, f"{source.name} ready")
        return LoadedModel(model, tokenizer, info, placement, None, family=self)

    def prompt_ids(self, loaded: LoadedModel, request: Generate) -> list[int]:
        seq, _, _ = glm.build_sequence(*self._tokens(loaded.tokenizer, self._text(request)))
        return seq

    def blanks(self, loaded: LoadedModel, request: Generate) -> MaskedText | None:
        return parse_masks(self._text(request), raw=True)  # no mask: [gMASK] appended

    @staticmethod
    def _text(request: Generate) -> str:
        text = request.prompt
        if not text:
            users = [m.content for m in request.messages if m.role == "user"]
            text = users[-1] if users else ""
        if not text.strip():
            raise UsageError("the prompt is empty; type a question or pipe some text")
        return text

    @staticmethod
    def _tokens(tokenizer: IceTextTokenizer, text: str) -> tuple[list[int], bool]:
        pieces = MASK_RE.split(text)
        masks = MASK_RE.findall(text)
        tokens: list[int] = []
        for piece, mask in zip(pieces, masks, strict=False):
            tokens.extend(tokenizer.encode(piece) if piece else [])
            tokens.append(MASK_IDS[mask])
        if pieces[-1]:
            tokens.extend(tokenizer.encode(pieces[-1]))
        return tokens, text.endswith("MASK]")

    def fill_blanks(self, ctx: RunContext, request: Generate, masked: MaskedText,
                    should_stop: Callable[[], bool]) -> GenerationResult:
        params = request.params.validate()
        tokenizer: IceTextTokenizer = ctx.tokenizer
        model: GLM130B = ctx.model
        text = masked.text()
        tokens, ends_with_mask = self._tokens(tokenizer, text)
        seq, mask_id, use_gmask = glm.build_sequence(tokens, ends_with_mask)
        budget = min(params.max_new_tokens, ctx.info.context_length)
        if len(seq) + 1 >= ctx.info.context_length:
            raise UsageError(f"the prompt is {len(seq)} tokens but {ctx.info.name} reads at most "
                             f"{ctx.info.context_length}; shorten it")
        seed = None
        if params.strategy == "sample":
            seed = params.seed if params.seed >= 0 else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None

        def make_strategy() -> glm.Strategy:
            if params.strategy == "beam":
                style = "transformers" if params.beam_scorer == "transformers" else "glm130b"
                return glm.BeamSearch(params.num_beams, length_penalty=params.length_penalty,
                                      no_repeat_ngram_size=params.no_repeat_ngram_size,
                                      min_gen_length=params.min_new_tokens, style=style)
            return glm.Sampling(greedy=params.strategy != "sample",
                                temperature=params.temperature, top_k=params.top_k,
                                top_p=params.top_p if params.top_p < 1.0 else 0.0,
                                generator=generator)

        timing = gen.StepTiming()
        made = [0, 0]  # tokens of the earlier fills, of the current one
        beam = params.strategy == "beam"

        shown = [""]  # the current fill's text already streamed

        def send(text: str, token_id: int = -1) -> None:
            if text and not beam:
                ctx.emit(Token(id=request.id, text=text, token_id=token_id))

        def on_round(index: int, current: list[int]) -> Callable[[list[int]], None]:
            # Token events carry the result text in order: the text before each blank, then
            # the fill as it grows (a sentencepiece word's leading space appears with the next
            # piece, so the fill is decoded whole and only the new end is sent).
            made[0], made[1] = made[0] + made[1], 0
            shown[0] = ""
            send(masked.segments[index] if index < len(masked.segments) else "")

            def on_step(generated: list[int]) -> None:  # the tokens after sop
                ctx.clock.token()
                made[1] = len(generated)
                new = [t for t in generated if t not in END_TOKENS]
                text = tokenizer.decode(new)
                if beam:
                    ctx.emit(Token(id=request.id, text=text, token_id=generated[-1],
                                   provisional=True))
                elif text.startswith(shown[0]) and len(text) > len(shown[0]):
                    send(text[len(shown[0]):], new[-1])
                    shown[0] = text
                ctx.step_stats(request.id, timing, made[0] + len(generated))
            return on_step

        finish = "eos"
        rounds: list[glm.BlankRound] = []
        with torch.inference_mode():
            try:
                _answers, rounds = glm.fill_blanks(
                    model, seq, mask_id, use_gmask, len(seq) + 1 + budget, make_strategy,
                    should_stop=should_stop, on_round=on_round, timing=timing)
            except gen.Cancelled:
                finish = "cancelled"
        fills = [tokenizer.decode(r.blanks[0]) if r.blanks else "" for r in rounds]
        if finish != "cancelled" and rounds:
            send(fills[-1][len(shown[0]):] if fills[-1].startswith(shown[0]) else "")
            send(masked.segments[len(rounds)] if len(rounds) < len(masked.segments) else "")
        out_text, spans = splice(masked, fills)
        token_ids = [t for r in rounds for t in (r.blanks[0] if r.blanks else [])]
        if finish != "cancelled" and rounds:
            last = rounds[-1].raw_output[0] if rounds[-1].raw_output else []
            finish = "eos" if last and last[-1] in END_TOKENS else "length"
        beams: list[Beam] = []
        if beam and rounds:
            last_round = rounds[-1]
            for blank, score in zip(last_round.blanks, last_round.scores, strict=False):
                beam_text, _ = splice(masked, [*fills[:-1], tokenizer.decode(blank)])
                beams.append(Beam(text=beam_text, token_ids=token_ids[:len(token_ids) - len(
                    last_round.blanks[0])] + blank, score=float(score)))
            beams = beams[:params.num_return_sequences] if params.num_return_sequences else beams
        ctx.emit(ctx.memory())
        return GenerationResult(
            text=out_text, token_ids=token_ids, prompt_token_ids=seq, finish_reason=finish,
            strategy=params.strategy, seed=seed, params=params,
            timings=ctx.clock.timings(timing, len(token_ids)), beams=beams, spans=spans,
            notes=masked.warnings())
