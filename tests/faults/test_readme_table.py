"""The README's Faults table is exactly what the suite's cases declare."""

from __future__ import annotations

from tests.faults.cases import all_cases
from tests.faults.table import README, readme_table, render


def test_readme_faults_table_is_made_from_the_cases() -> None:
    assert len(all_cases()) >= 10
    in_readme = readme_table(README.read_text(encoding="utf-8"))
    assert in_readme is not None, "README.md lacks the faults table markers"
    assert in_readme == render(), ("README's Faults table differs from tests/faults: run "
                                   "`python -m tests.faults.table --write`")
