"""The notebook runner (`course-run`, helpers.notebooks) and the test suite's own notebook execution.

The course's notebooks themselves are executed by nbval (`make test` passes ``course solutions --nbval-lax``),
not here: these tests run the tools on a throwaway course (tests/conftest.py's ``course_root``), each notebook
a few cells long, so they stay fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from helpers import notebooks
from helpers.notebooks import CourseError, Timing, format_timing_table, parse_week

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("text,week", [("0", 0), ("00", 0), ("week00", 0), ("week3", 3), ("Week 07", 7), (5, 5)])
def test_parse_week(text, week):
    assert parse_week(text) == week


@pytest.mark.parametrize("text", ["", "banana", "week", "-1", "100", "3.5"])
def test_parse_week_rejects(text):
    with pytest.raises(CourseError, match="week"):
        parse_week(text)


def test_missing_week_lists_the_weeks_there_are(course_root):
    with pytest.raises(CourseError, match=r"week 4 has no notebooks in .*course; the weeks there are: 0"):
        notebooks.week_notebooks(course_root, 4)
    assert notebooks.week_notebooks(course_root, 0) == [course_root / "course" / "week00" / "week00.ipynb"]


def test_find_root_walks_up(course_root):
    assert notebooks.find_root(course_root / "course" / "week00") == course_root


def test_timing_table_marks_ok_over_and_failed():
    table = format_timing_table(
        [Timing("course/week00/week00.ipynb", 41.25), Timing("course/week01/week01.ipynb", 130.0),
         Timing("solutions/week01/week01.ipynb", 3.0, error="cell In [4] raised ValueError: x")],
        budget_s=120,
    )
    lines = table.splitlines()
    assert lines[0].split() == ["notebook", "seconds", "budget", "status"]
    assert lines[1].split() == ["course/week00/week00.ipynb", "41.2", "120", "OK"]
    assert lines[2].split() == ["course/week01/week01.ipynb", "130.0", "120", "OVER"]
    assert lines[3].split()[-1] == "FAILED"


def test_course_run_injects_parameters_and_writes_html(course_root, capsys):
    status = notebooks.main(
        ["00", "--preset", "local", "--seed", "3", "--root", str(course_root), "--out", "out"]
    )
    out = capsys.readouterr().out
    assert status == 0, out
    executed = course_root / "out" / "week00" / "week00.ipynb"
    nb = nbformat.read(str(executed), as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and 'PRESET = "local"' in injected[0].source and "SEED = 3" in injected[0].source
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert printed.startswith("local 3")
    html = executed.with_suffix(".html").read_text()
    assert "<html" in html and "local 3" in html
    assert "course/week00/week00.ipynb" in out and " OK" in out  # the timing table
    # the source notebook is left as committed: no outputs
    assert notebooks.notebook_problems(course_root / "course" / "week00" / "week00.ipynb") == []


def test_course_run_solutions_and_failures(course_root, capsys):
    path = course_root / "solutions" / "week00" / "week00.ipynb"
    nb = json.loads(path.read_text())
    nb["cells"][3]["source"] = ["assert add(1, 2) == 4, 'wrong sum'"]
    path.write_text(json.dumps(nb))
    status = notebooks.main(["week0", "--which", "solutions", "--root", str(course_root), "--no-html"])
    captured = capsys.readouterr()
    assert status == 1
    assert "raised AssertionError: wrong sum" in captured.err
    executed = course_root / "build" / "week00" / "solutions" / "week00.ipynb"
    assert executed.is_file() and not executed.with_suffix(".html").exists()
    assert "FAILED" in captured.out


def test_course_run_explains_a_missing_week(course_root, capsys):
    assert notebooks.main(["9", "--root", str(course_root)]) == 2
    assert "week 9 has no notebooks" in capsys.readouterr().err


def install_conftest(root: Path) -> None:
    """This conftest.py in ``root/tests``, as in the repository, beside a broken notebook it must not run."""
    from conftest import write_notebook
    from nbformat.v4 import new_code_cell

    (root / "tests").mkdir(exist_ok=True)
    shutil.copy(HERE / "conftest.py", root / "tests" / "conftest.py")
    write_notebook(root / "tests" / "fixtures" / "broken.ipynb", [new_code_cell("raise SystemExit('collected')")])


def test_nbval_run_prints_seconds_per_notebook(course_root, tmp_path):
    """What `make test` does to course/ and solutions/, on the throwaway course: nbval in lax mode with this
    conftest's timing table. One kernel per notebook; the table sums each notebook's cells."""
    install_conftest(course_root)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    env.pop("COURSE_PRESET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", "course", "solutions", "--nbval-lax", "--nbval-current-env",
         "--nbval-cell-timeout=120", "-p", "no:cacheprovider", "-q", "--rootdir", str(course_root)],
        cwd=course_root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "seconds per notebook" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.endswith((" OK", " OVER"))}
    assert set(rows) == {"course/week00/week00.ipynb", "solutions/week00/week00.ipynb"}
    assert rows["course/week00/week00.ipynb"][2:] == ["120", "OK"]


def test_nbval_run_uses_the_local_preset(course_root):
    """conftest.py sets COURSE_PRESET=local for the kernels when nbval is on and nobody chose a preset."""
    install_conftest(course_root)
    nb_path = course_root / "course" / "week00" / "week00.ipynb"
    nb = json.loads(nb_path.read_text())
    nb["cells"][2]["source"] = ["import os\n", "assert os.environ['COURSE_PRESET'] == 'local'"]
    nb_path.write_text(json.dumps(nb))
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    env.pop("COURSE_PRESET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "tests", str(nb_path), "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider",
         "-q", "--rootdir", str(course_root)],
        cwd=course_root, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
