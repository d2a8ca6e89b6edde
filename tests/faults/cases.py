"""Each fault test declares what it injects, what glmchat does, and what is kept; the README's
"Faults" table is made from these declarations (``python -m tests.faults.table``), and
test_readme_table.py fails when the two differ, so the table cannot drift from the suite."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


@dataclass(frozen=True)
class Fault:
    fault: str  # what goes wrong
    behaviour: str  # what glmchat does about it (message, exit code)
    kept: str  # what the user still has afterwards


def fault(fault: str, behaviour: str, kept: str) -> Callable[[F], F]:
    """Mark a test as one row of the Faults table."""

    def mark(test: F) -> F:
        test.fault = Fault(fault, behaviour, kept)  # type: ignore[attr-defined]
        return test

    return mark


def all_cases() -> list[tuple[str, Fault]]:
    """(test id, Fault) for every marked test in tests/faults, in file then source order."""
    import tests.faults as package

    cases: list[tuple[int, str, Fault]] = []
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                   if m.name.startswith("test_"))
    for index, name in enumerate(names):
        module = importlib.import_module(f"tests.faults.{name}")
        for attr, test in vars(module).items():
            case = getattr(test, "fault", None)
            if isinstance(case, Fault) and attr.startswith("test_"):
                line = inspect.getsourcelines(test)[1]
                cases.append((index * 100_000 + line, f"{name}::{attr}", case))
    return [(test_id, case) for _, test_id, case in sorted(cases, key=lambda c: c[0])]
