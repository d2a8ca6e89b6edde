"""GLM-130B's tokenizer: icetk's text ids, without icetk (SPEC §3).

icetk encodes text with sentencepiece on ``ice_text.model`` and adds 20000 (its image tokens
come first); SAT's table puts the special tokens after the 150000 icetk ids. The file is found
at ``--tokenizer FILE`` / ``[model] tokenizer``, else ``ice_text.model`` in the checkpoint dir,
else icetk's own cache ``~/.icetk_models/``. Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from glmchat.errors import UsageError

NUM_IMAGE_TOKENS = 20000
NUM_TOKENS = 150000
SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK")
SPECIAL_IDS = {name: NUM_TOKENS + i for i, name in enumerate(SPECIALS)}
MASK, GMASK, SMASK = SPECIAL_IDS["[MASK]"], SPECIAL_IDS["[gMASK]"], SPECIAL_IDS["[sMASK]"]
SOP, EOP = SPECIAL_IDS["sop"], SPECIAL_IDS["eop"]
EOS = 20002  # '</s>', sentencepiece id 2
END_TOKENS = (EOP, EOS)  # generate.py L162
FILE_NAME = "ice_text.model"


def find_file(configured: str, checkpoint_dir: Path | None) -> Path:
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise UsageError(f"tokenizer file {configured} does not exist; pass the path of "
                             f"GLM-130B's {FILE_NAME} (--tokenizer FILE)")
        return path
    candidates = [checkpoint_dir / FILE_NAME] if checkpoint_dir is not None else []
    candidates.append(Path("~/.icetk_models").expanduser() / FILE_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = " or ".join(str(c) for c in candidates)
    raise UsageError(f"GLM-130B's tokenizer {FILE_NAME} was not found ({where}); put it in the "
                     "checkpoint dir or pass --tokenizer FILE (glmchat never downloads it)")


class IceTextTokenizer:
    """icetk's text ids (sentencepiece id + 20000) and SAT's special tokens."""

    eos_token_id = EOS

    def __init__(self, path: Path, vocab_size: int) -> None:
        import sentencepiece as spm

        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise UsageError(f"{path} is not a sentencepiece model ({exc}); pass GLM-130B's "
                             f"{FILE_NAME} with --tokenizer FILE") from None
        self.text_tokens = int(self.sp.vocab_size())
        top = NUM_IMAGE_TOKENS + self.text_tokens
        if top > NUM_TOKENS or NUM_TOKENS + len(SPECIALS) > vocab_size:
            raise UsageError(f"{path} has {self.text_tokens} pieces: ids up to {top} do not fit "
                             f"GLM-130B's layout (text below {NUM_TOKENS}, specials up to "
                             f"{NUM_TOKENS + len(SPECIALS)} in a {vocab_size}-row embedding); "
                             f"use the {FILE_NAME} that belongs to this checkpoint")

    def encode(self, text: str) -> list[int]:
        return [int(i) + NUM_IMAGE_TOKENS for i in self.sp.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; special tokens are dropped (``detokenize`` shows them)."""
        text_ids = [int(i) - NUM_IMAGE_TOKENS for i in ids
                    if NUM_IMAGE_TOKENS <= int(i) < NUM_IMAGE_TOKENS + self.text_tokens]
        return str(self.sp.decode(text_ids)).replace("<n>", "\n")

    def detokenize(self, ids: Sequence[int]) -> str:
        """SAT's detokenize: specials as ``[name]`` between decoded text runs."""
        names = {v: k for k, v in SPECIAL_IDS.items()}
        names[EOS] = "</s>"
        out, run = "", list[int]()
        for token in ids:
            if token in names:
                out += self.decode(run) + f"[{names[token]}]"
                run = list[int]()
            else:
                run.append(token)
        return out + self.decode(run)
