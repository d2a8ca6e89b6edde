"""The argument parser every glmchat command uses: a usage error is one line, then where help is.

argparse's own ``error`` prints the whole usage block (16 lines for ``glmchat``) before the
message; ours prints ``glmchat: error: …`` and ``see glmchat --help``, and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line (subparsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        first = message.splitlines()[0] if message else "bad arguments"
        sys.stderr.write(f"glmchat: error: {first}\nsee {self.prog} --help\n")
        sys.exit(2)
