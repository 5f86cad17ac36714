"""Shared test setup.

Notebook execution: `make test` passes ``course solutions --nbval-lax --nbval-current-env`` to pytest, so nbval
runs every course/ and solutions/ notebook cell by cell in a kernel of this environment (lax mode: a cell fails
only by raising). The notebooks' parameters cell says ``PRESET = "auto"``; ``COURSE_PRESET=local`` (set by the
Makefile, and here when nbval is on and nobody set it) makes that the CPU preset.

At the end of the run, :func:`pytest_terminal_summary` prints seconds per notebook (the sum of its cells' setup,
call and teardown times, kernel start included) against the 120 s budget per notebook, marked OK or OVER.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Notebooks under tests/ are data for tests (e.g. submissions to grade, some broken on purpose), never run by nbval.
collect_ignore_glob = ["*.ipynb"]


def pytest_configure(config):
    if getattr(config.option, "nbval_lax", False) or getattr(config.option, "nbval", False):
        os.environ.setdefault("COURSE_PRESET", "local")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def notebook_seconds(reports) -> dict[str, float]:
    """Seconds per notebook file, summed over its nbval cell items' reports (``path.ipynb::Cell 3``)."""
    seconds: dict[str, float] = defaultdict(float)
    seen = set()
    for report in reports:
        nodeid = getattr(report, "nodeid", "")
        path, sep, _ = nodeid.partition("::")
        if not sep or not path.endswith(".ipynb"):
            continue
        key = (nodeid, getattr(report, "when", None))
        if key in seen:  # a report can sit in two stats lists (e.g. a failed call with a captured warning)
            continue
        seen.add(key)
        seconds[path] += getattr(report, "duration", 0.0) or 0.0
    return dict(seconds)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from helpers.notebooks import BUDGET_S, Timing, format_timing_table

    reports = [r for stats in terminalreporter.stats.values() for r in stats]
    seconds = notebook_seconds(reports)
    if not seconds:
        return
    failed = {
        r.nodeid.partition("::")[0]
        for r in terminalreporter.stats.get("failed", []) + terminalreporter.stats.get("error", [])
        if hasattr(r, "nodeid")
    }
    timings = [
        Timing(notebook=path, seconds=s, error="failed" if path in failed else None)
        for path, s in sorted(seconds.items())
    ]
    terminalreporter.write_sep("=", f"seconds per notebook (budget {BUDGET_S:.0f} s each, local preset)")
    terminalreporter.write_line(format_timing_table(timings, budget_s=BUDGET_S))
    over = [t.notebook for t in timings if not t.error and t.seconds > BUDGET_S]
    if over:
        terminalreporter.write_line(f"over budget: {', '.join(over)}")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def reproducible_checks(request):
    """Exercise checks draw their inputs from a seed per test, so a failure reproduces; ``CHECK_SEED_OFFSET=k``
    shifts every seed, to sweep the checks over other inputs (``for k in 1 2 3; do CHECK_SEED_OFFSET=$k pytest
    tests/test_checks*.py; done``)."""
    import random
    import zlib

    from helpers import checks

    offset = int(os.environ.get("CHECK_SEED_OFFSET", "0"))
    checks.seed_source = random.Random(zlib.crc32(request.node.nodeid.encode()) + offset)
    yield
    checks.seed_source = None


def write_notebook(path: Path, cells: list, *, kernel: str = "python3"):
    """Write a notebook of ``cells`` (nbformat cell nodes) with a ``kernel`` kernelspec and stable cell ids."""
    import nbformat
    from nbformat.v4 import new_notebook

    nb = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": kernel, "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
        },
    )
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(path))
    return nb


def make_course(root: Path) -> Path:
    """A throwaway course checkout: week 0 in course/ and solutions/ (nbgrader metadata, a hidden test, a data
    file), the repository's nbgrader_config.py, and a pyproject.toml so the tools recognise it as a checkout."""
    from nbformat.v4 import new_code_cell, new_markdown_cell

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "nbgrader_config.py", root / "nbgrader_config.py")
    (root / "pyproject.toml").write_text("[project]\nname = 'fixture'\n")

    def parameters():
        return new_code_cell('PRESET = "auto"\nSEED = 0', metadata={"tags": ["parameters"]})

    write_notebook(root / "course" / "week00" / "week00.ipynb", [
        new_markdown_cell("# Week 0 (fixture)"),
        parameters(),
        new_code_cell("import os\nprint(PRESET, SEED, os.environ.get('COURSE_PRESET'))"),
    ])
    write_notebook(root / "solutions" / "week00" / "week00.ipynb", [
        new_markdown_cell("# Week 0 exercises (fixture)"),
        parameters(),
        new_code_cell(
            "def add(a, b):\n    ### BEGIN SOLUTION\n    return a + b\n    ### END SOLUTION",
            metadata={"nbgrader": {"solution": True, "grade": False, "locked": False, "grade_id": "add",
                                   "schema_version": 3}},
        ),
        new_code_cell(
            "assert add(1, 2) == 3\n### BEGIN HIDDEN TESTS\nassert add(-1, 1) == 0\n### END HIDDEN TESTS",
            metadata={"nbgrader": {"solution": False, "grade": True, "locked": True, "grade_id": "test_add",
                                   "points": 1, "schema_version": 3}},
        ),
    ])
    (root / "solutions" / "week00" / "agora.txt").write_text("a data file copied along\n")
    return root


@pytest.fixture
def course_root(tmp_path, monkeypatch) -> Path:
    """A throwaway course checkout (see :func:`make_course`) with its nbgrader gradebook in ``tmp_path``."""
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    return make_course(tmp_path / "course-root")
