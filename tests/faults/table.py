"""The README's Faults table, made from the suite's declarations.

    python -m tests.faults.table           print it
    python -m tests.faults.table --write   put it into README.md between the markers
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.faults.cases import all_cases

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN = ("<!-- faults table: made by `python -m tests.faults.table --write` from "
         "tests/faults; do not edit by hand -->")
END = "<!-- end of faults table -->"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    lines = ["| Fault | What glmchat does | What is kept |", "|---|---|---|"]
    lines += [f"| {_cell(c.fault)} | {_cell(c.behaviour)} | {_cell(c.kept)} |"
              for _, c in all_cases()]
    return "\n".join(lines)


def readme_table(text: str) -> str | None:
    """The table now in the README (None when the markers are missing)."""
    if BEGIN not in text or END not in text:
        return None
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def write(path: Path = README) -> None:
    text = path.read_text(encoding="utf-8")
    if readme_table(text) is None:
        raise SystemExit(f"{path} has no faults table markers; add\n{BEGIN}\n{END}")
    before, rest = text.split(BEGIN, 1)
    after = rest.split(END, 1)[1]
    path.write_text(f"{before}{BEGIN}\n{render()}\n{END}{after}", encoding="utf-8")


if __name__ == "__main__":
    if "--write" in sys.argv[1:]:
        write()
    else:
        print(render())
