"""`glmchat convert DIR [--out OUT]`: convert GLM-130B's official checkpoint once, explicitly.

The same conversion a first `--model DIR` does (model/glm_checkpoint.py): merged per-layer
safetensors, by default into the cache dir under the checkpoint's digest so later starts find
it; with --out, into OUT (then `--model OUT` loads it directly). Imports torch only when run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from glmchat.errors import UsageError
from glmchat.usage import Parser


def convert_main(argv: list[str]) -> int:
    parser = Parser(prog="glmchat convert", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path, help="checkpoint dir: latest + <iter>/mp_rank_XX_*.pt")
    parser.add_argument("--out", type=Path, metavar="OUT",
                        help="where to write (default: the cache dir, keyed by digest)")
    parser.add_argument("--num-heads", type=int, default=0, metavar="N",
                        help="attention heads (0 = from the checkpoint)")
    args = parser.parse_args(argv)
    from glmchat import paths
    from glmchat.model import glm_checkpoint as ckpt
    from glmchat.model import sources

    source: Path = args.dir.expanduser()
    if not ckpt.is_official(source):
        raise UsageError(f"{source} is not a GLM-130B checkpoint dir (no 'latest' file); "
                         "pass the directory that holds latest and the iteration folder")
    found = ckpt.find(source)
    digest = sources.files_digest([*found.shards, source / "latest"])
    target = args.out.expanduser() if args.out else \
        paths.models_cache_dir() / f"glm130b-{digest[:16]}"
    if ckpt.is_converted(target):
        print(f"already converted: {target}", file=sys.stderr)
        print(target)
        return 0
    started = time.perf_counter()
    print(f"converting {source} (TP={found.tp}, iteration {found.iteration}) -> {target}",
          file=sys.stderr)
    hint = "pass --out DIR on a writable disk" if args.out else \
        "set XDG_CACHE_HOME to a writable directory, or pass --out DIR"
    config = ckpt.convert(found, target, heads=args.num_heads, source_digest=digest, hint=hint,
                          report=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
    print(f"done in {time.perf_counter() - started:.1f} s: {config.num_layers} layers, hidden "
          f"{config.hidden_size}, {config.num_attention_heads} heads, vocab "
          f"{config.vocab_size}", file=sys.stderr)
    print(target)
    return 0
