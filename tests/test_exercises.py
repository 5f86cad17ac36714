"""exercises/ is generated from solutions/ and never drifts; every committed notebook is tidy.

The first group checks the repository itself; the second checks the tools on a throwaway course
(tests/conftest.py's ``course_root``), so they are tested before any week exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

from helpers.notebooks import FOLDERS, all_notebooks, notebook_problems
from tools import generate_exercises as gen

REPO = Path(__file__).resolve().parent.parent
SOLUTION_MARKERS = ("### BEGIN SOLUTION", "### END SOLUTION", "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS")


def _rel(path: Path, root: Path = REPO) -> str:
    return Path(path).relative_to(root).as_posix()


def pairs(root: Path):
    """(solutions notebook, exercises notebook) for every solutions notebook under ``root``."""
    return [
        (nb, root / "exercises" / nb.relative_to(root / "solutions"))
        for nb in all_notebooks(root, ("solutions",))
    ]


def stub_problems(solution: Path, exercise: Path) -> list[str]:
    """What generate_assignment should have done to ``solution`` but ``exercise`` does not show."""
    if not exercise.is_file():
        return [f"{exercise} is missing"]
    sol = nbformat.read(str(solution), as_version=4)
    ex = nbformat.read(str(exercise), as_version=4)
    problems = []
    for i, cell in enumerate(ex.cells):
        for marker in SOLUTION_MARKERS:
            if marker in cell.source:
                problems.append(f"{exercise}: cell {i} still contains {marker!r}")
    ex_by_id = {c.get("id"): c for c in ex.cells}
    for cell in sol.cells:
        if cell.cell_type == "code" and "### BEGIN SOLUTION" in cell.source:
            stub = ex_by_id.get(cell.get("id"))
            if stub is None:
                problems.append(f"{exercise}: the solution cell {cell.get('id')!r} is gone")
            elif "raise NotImplementedError()" not in stub.source:
                problems.append(f"{exercise}: cell {cell.get('id')!r} should read `raise NotImplementedError()`")
    tagged = [c for c in ex.cells if "parameters" in c.metadata.get("tags", [])]
    if not tagged:
        problems.append(f"{exercise}: the 'parameters' tag was lost")
    return problems


# --------------------------------------------------------------------------------------- the repository


def test_exercises_do_not_drift_from_solutions(tmp_path):
    if not all_notebooks(REPO, ("solutions",)) and not all_notebooks(REPO, ("exercises",)):
        pytest.skip("no notebooks in solutions/ or exercises/ yet")
    gen.generate(REPO, dest=tmp_path / "exercises")
    problems = gen.compare_trees(REPO / "exercises", tmp_path / "exercises")
    if problems:
        pytest.fail("exercises/ has drifted from solutions/:\n- " + "\n- ".join(problems), pytrace=False)


@pytest.mark.parametrize("solution,exercise", pairs(REPO), ids=lambda p: _rel(p))
def test_exercise_has_stubs_and_no_hidden_tests(solution, exercise):
    problems = stub_problems(solution, exercise)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.mark.parametrize("notebook", all_notebooks(REPO, FOLDERS), ids=lambda p: _rel(p))
def test_committed_notebook_is_tidy(notebook):
    problems = notebook_problems(notebook, need_parameters=True)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


def test_every_course_week_has_solutions_and_exercises():
    from helpers.notebooks import weeks_in

    course, solutions, exercises = (weeks_in(REPO / f) for f in FOLDERS)
    assert set(solutions) <= set(course), f"solutions/ has weeks {sorted(set(solutions) - set(course))} course/ lacks"
    assert set(exercises) == set(solutions), (
        f"exercises/ has weeks {exercises}, solutions/ has {solutions}: run `make exercises`"
    )


# --------------------------------------------------------------------------------------- the tools


def test_generation_strips_answers_and_hidden_tests(course_root):
    written = gen.generate(course_root)
    assert sorted(_rel(p, course_root) for p in written) == ["exercises/week00/agora.txt", "exercises/week00/week00.ipynb"]
    [(solution, exercise)] = pairs(course_root)
    assert stub_problems(solution, exercise) == []
    assert notebook_problems(exercise) == []
    cells = nbformat.read(str(exercise), as_version=4).cells
    assert "# YOUR CODE HERE\n    raise NotImplementedError()" in cells[2].source
    assert cells[3].source == "assert add(1, 2) == 3"
    assert cells[3].metadata.nbgrader["points"] == 1


def test_generation_is_byte_identical_across_runs(course_root, tmp_path):
    gen.generate(course_root, dest=tmp_path / "first")
    gen.generate(course_root, dest=tmp_path / "second")
    for a in sorted((tmp_path / "first").rglob("*")):
        b = tmp_path / "second" / a.relative_to(tmp_path / "first")
        assert a.is_dir() or a.read_bytes() == b.read_bytes(), f"{a.name} differs between two runs"
    assert gen.compare_trees(tmp_path / "first", tmp_path / "second") == []


def test_drift_names_the_notebook_and_first_differing_cell(course_root, tmp_path):
    gen.generate(course_root)
    committed = course_root / "exercises" / "week00" / "week00.ipynb"
    nb = json.loads(committed.read_text())
    nb["cells"][3]["source"] = ["assert add(1, 2) == 4"]
    committed.write_text(json.dumps(nb, indent=1))
    (course_root / "exercises" / "week00" / "notes.txt").write_text("hand-made")
    (course_root / "exercises" / "week00" / "agora.txt").unlink()

    problems = gen.check(course_root)
    text = "\n".join(problems)
    assert "exercises/week00/week00.ipynb: differs first at cell 3 (id 'cell-3', grade_id 'test_add')" in text
    assert "-assert add(1, 2) == 4" in text and "+assert add(1, 2) == 3" in text
    assert "exercises/week00/agora.txt is missing" in text
    assert "exercises/week00/notes.txt is not generated from solutions/" in text
    assert "make exercises" in problems[-1]

    gen.generate(course_root)
    assert gen.check(course_root) == []


def test_stale_week_is_reported_and_removed(course_root):
    gen.generate(course_root)
    stale = course_root / "exercises" / "week07"
    stale.mkdir()
    (stale / "week07.ipynb").write_text("{}")
    assert any("week07/week07.ipynb is not generated" in p for p in gen.check(course_root))
    gen.generate(course_root)
    assert not stale.exists()


def test_nbgrader_refusal_is_explained(course_root):
    path = course_root / "solutions" / "week00" / "week00.ipynb"
    nb = json.loads(path.read_text())
    del nb["cells"][2]["metadata"]["nbgrader"]  # a solution region outside a solution cell
    path.write_text(json.dumps(nb, indent=1))
    with pytest.raises(gen.ExerciseError, match="nbgrader could not generate exercises from .*week00"):
        gen.generate(course_root)


def test_cells_without_ids_are_refused(course_root):
    path = course_root / "solutions" / "week00" / "week00.ipynb"
    nb = json.loads(path.read_text())
    del nb["cells"][1]["id"]
    path.write_text(json.dumps(nb, indent=1))
    with pytest.raises(gen.ExerciseError, match="some cells have no id"):
        gen.generate(course_root)


def test_command_line(course_root, capsys):
    assert gen.main(["--root", str(course_root)]) == 0
    assert "wrote exercises/week00/week00.ipynb" in capsys.readouterr().out
    assert gen.main(["--root", str(course_root), "--check"]) == 0
    assert gen.main(["--root", str(course_root), "5"]) == 2
    assert "solutions/week05 does not exist" in capsys.readouterr().err


def test_tidiness_problems_are_explained(course_root):
    path = course_root / "course" / "week00" / "week00.ipynb"
    assert notebook_problems(path) == []
    nb = json.loads(path.read_text())
    nb["cells"][2]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    nb["cells"][2]["execution_count"] = 1
    nb["cells"][1]["metadata"]["tags"] = []
    nb["metadata"]["kernelspec"]["name"] = "my-env"
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {}}
    del nb["cells"][0]["id"]
    path.write_text(json.dumps(nb))
    text = "\n".join(notebook_problems(path))
    assert "some cells have no id" in text and "widget state" in text
    assert "keep outputs" in text and "jupyter nbconvert --clear-output --inplace" in text
    assert "kernelspec is 'my-env'" in text
    assert "tagged 'parameters', found 0" in text

    nb["cells"][1]["metadata"]["tags"] = ["parameters"]
    nb["cells"][1]["source"] = 'PRESET = "local"'
    path.write_text(json.dumps(nb))
    text = "\n".join(notebook_problems(path))
    assert 'must set PRESET = "auto"' in text and "must set SEED" in text
