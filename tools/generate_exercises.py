"""Generate exercises/ from solutions/ with nbgrader, and tell whether the committed exercises/ has drifted.

    python tools/generate_exercises.py             # every week: solutions/weekNN -> exercises/weekNN
    python tools/generate_exercises.py 0 3         # weeks 0 and 3 only
    python tools/generate_exercises.py --check     # regenerate into a scratch folder, list differences, change nothing

(`make exercises` runs the first.) Each week is one nbgrader assignment. nbgrader's `generate_assignment`
turns every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region into
``# YOUR CODE HERE`` / ``raise NotImplementedError()``, drops ``### BEGIN HIDDEN TESTS`` regions, clears
outputs, locks the graded cells and records checksums; files beside the notebooks (data) are copied as they are.

It runs in a scratch course folder (a copy of solutions/weekNN) with the settings of nbgrader_config.py (course id,
folder names) and without a gradebook (nbgrader's --no-db; the notebooks come out the same), so it never writes a
database or a log into the repository, and two runs give byte-identical files: every notebook is written back in
nbformat's canonical form. To record an assignment in the instructors' gradebook, run nbgrader itself from the
repository root: `nbgrader generate_assignment week00 --force` (same output, gradebook in the course cache).
"""

from __future__ import annotations

import argparse
import difflib
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout without an install
    sys.path.insert(0, str(REPO))

from helpers.notebooks import (  # noqa: E402
    CourseError, notebook_problems, parse_week, use_this_python, week_name, weeks_in,
)

SOURCE, RELEASE = "solutions", "exercises"
"""Folder names; nbgrader_config.py must agree (checked by :func:`load_config`)."""

IGNORE = (".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".*")
"""Files in a week folder that are never copied (nbgrader_config.py's CourseDirectory.ignore says the same)."""


class ExerciseError(CourseError):
    """nbgrader refused a solutions notebook, or the configuration is not the course's."""


def load_config(root: Path):
    """nbgrader's configuration from ``root/nbgrader_config.py``, checked against the folder names used here."""
    from traitlets.config import Config, PyFileConfigLoader

    path = Path(root) / "nbgrader_config.py"
    if not path.is_file():
        raise ExerciseError(f"{path} is missing: nbgrader needs it to know the course id and folders")
    config = PyFileConfigLoader(path.name, path=str(path.parent)).load_config()
    cd = config.get("CourseDirectory", Config())
    for key, expected in (("source_directory", SOURCE), ("release_directory", RELEASE)):
        if cd.get(key) != expected:
            raise ExerciseError(f"{path}: CourseDirectory.{key} is {cd.get(key)!r}; the course uses {expected!r}")
    return config


def generate_week(root: Path, week: int, dest: Path, *, config=None) -> list[Path]:
    """Generate ``dest/weekNN`` (replacing it) from ``root/solutions/weekNN``; returns the files written."""
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import Config

    root, dest = Path(root), Path(dest)
    name = week_name(week)
    source = root / SOURCE / name
    if not source.is_dir():
        raise ExerciseError(f"{source} does not exist; the weeks in {root / SOURCE} are {weeks_in(root / SOURCE)}")
    config = load_config(root) if config is None else config
    for notebook in sorted(source.rglob("*.ipynb")):
        unstable = [p for p in notebook_problems(notebook, need_parameters=False) if "have no id" in p]
        if unstable:
            raise ExerciseError(unstable[0])
    use_this_python()  # in case nbgrader starts a program from PATH (it runs `alembic` for a gradebook)

    with tempfile.TemporaryDirectory(prefix=f"nbgrader-{name}-") as scratch:
        scratch = Path(scratch)
        shutil.copytree(source, scratch / SOURCE / name, ignore=shutil.ignore_patterns(*IGNORE))
        cfg = Config()
        cfg.merge(config)
        cfg.CourseDirectory.root = str(scratch)
        cfg.CourseDirectory.db_url = f"sqlite:///{scratch / 'gradebook.db'}"
        cfg.CourseDirectory.ignore = list(IGNORE)
        (scratch / "exchange").mkdir()
        cfg.Exchange.root = str(scratch / "exchange")  # the API sets up an exchange; keep it out of /usr/local
        # nbgrader's --no-db: a scratch gradebook would be thrown away, and creating one costs 3 s (alembic).
        cfg.GenerateAssignment.no_database = True
        cfg.SaveCells.enabled = False
        api = NbGraderAPI(coursedir=CourseDirectory(config=cfg), config=cfg)
        result = api.generate_assignment(name, force=True, create=True)
        if not result.get("success"):
            raise ExerciseError(_nbgrader_failure(source, result))
        released = scratch / RELEASE / name
        for notebook in released.rglob("*.ipynb"):
            _canonicalise(notebook)
        target = dest / name
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(released, target)
    return sorted(p for p in target.rglob("*") if p.is_file())


def generate(root: Path = REPO, weeks: list[int] | None = None, dest: Path | None = None) -> list[Path]:
    """Generate the exercises of ``weeks`` (default: every week in solutions/) into ``dest`` (default:
    ``root/exercises``). With every week, week folders in ``dest`` that solutions/ no longer has are removed."""
    root = Path(root)
    dest = root / RELEASE if dest is None else Path(dest)
    config = load_config(root)
    everything = weeks is None
    weeks = weeks_in(root / SOURCE) if everything else weeks
    written = []
    for week in weeks:
        written += generate_week(root, week, dest, config=config)
    if everything and dest.is_dir():
        for stale in sorted(dest.glob("week[0-9][0-9]")):
            if stale.is_dir() and int(stale.name[4:]) not in weeks:
                shutil.rmtree(stale)
    return written


def _canonicalise(path: Path) -> None:
    """Write a notebook back in nbformat's canonical form (sorted keys, one-space indent, final newline)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=nbformat.NO_CONVERT)
    nbformat.write(nb, str(path))


def _nbgrader_failure(source: Path, result: dict) -> str:
    log = result.get("log") or ""
    errors = [line.strip() for line in log.splitlines() if "ERROR" in line or "Error" in line]
    trace = (result.get("error") or "").strip().splitlines()
    last = trace[-1] if trace else "no traceback"
    said = "\n  ".join([*errors[-8:], last])
    hint = ""
    if any(word in log for word in ("metadata", "solution", "grade_id", "points")):
        hint = (
            "\nCheck the nbgrader cell metadata there: every ### BEGIN SOLUTION region must be in a cell marked as "
            "a solution; graded test cells need a grade_id and points."
        )
    return f"nbgrader could not generate exercises from {source}:\n  {said}{hint}"


# ---------------------------------------------------------------------------------------------- drift


def compare_trees(committed: Path, generated: Path, *, label: str = RELEASE) -> list[str]:
    """Differences between the ``committed`` exercises folder and a freshly ``generated`` one, one sentence
    each, naming the file and, for a notebook, its first differing cell. An empty list: no drift."""
    committed, generated = Path(committed), Path(generated)

    def files(folder: Path) -> set[str]:
        if not folder.is_dir():
            return set()
        return {
            p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and not any(part.startswith(".") or part == "__pycache__" for part in p.parts)
        }

    have, want = files(committed), files(generated)
    problems = []
    for rel in sorted(want - have):
        problems.append(f"{label}/{rel} is missing: solutions/ generates it")
    for rel in sorted(have - want):
        problems.append(f"{label}/{rel} is not generated from solutions/ (stale or edited by hand): remove it")
    for rel in sorted(have & want):
        a, b = committed / rel, generated / rel
        if filecmp.cmp(a, b, shallow=False):
            continue
        if rel.endswith(".ipynb"):
            problems.append(f"{label}/{rel}: {first_difference(a, b)}")
        else:
            problems.append(f"{label}/{rel} differs from the copy in solutions/")
    if problems:
        problems.append("regenerate with `make exercises` (never edit exercises/ by hand) and commit the result")
    return problems


def first_difference(committed: Path, generated: Path) -> str:
    """Where two notebooks first differ, for a person: the cell (index, id, nbgrader grade_id) and the first
    differing line of its source, or the metadata, or the cell count."""
    import nbformat

    try:
        a = nbformat.read(str(committed), as_version=nbformat.NO_CONVERT)
    except Exception as exc:
        return f"the committed notebook cannot be read ({exc})"
    b = nbformat.read(str(generated), as_version=nbformat.NO_CONVERT)
    for i, (ca, cb) in enumerate(zip(a.cells, b.cells)):
        if ca == cb:
            continue
        grade_id = cb.get("metadata", {}).get("nbgrader", {}).get("grade_id")
        where = f"cell {i} (id {cb.get('id')!r}" + (f", grade_id {grade_id!r})" if grade_id else ")")
        if ca.get("source") != cb.get("source"):
            diff = [
                line for line in difflib.unified_diff(
                    ca.source.splitlines(), cb.source.splitlines(), "committed", "generated", lineterm="", n=0
                )
                if line[:1] in "+-" and not line.startswith(("+++", "---"))
            ]
            return f"differs first at {where}, in its source:\n    " + "\n    ".join(diff[:6])
        keys = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        return f"differs first at {where}, in {', '.join(keys)}"
    if len(a.cells) != len(b.cells):
        return f"has {len(a.cells)} cells; solutions/ generates {len(b.cells)}"
    keys = sorted(k for k in set(a) | set(b) if k != "cells" and a.get(k) != b.get(k))
    if keys:
        return f"differs in the notebook's {', '.join(keys)}"
    return "differs in formatting only (not written by nbformat)"


def check(root: Path = REPO) -> list[str]:
    """Regenerate every week into a scratch folder and compare with ``root/exercises``."""
    with tempfile.TemporaryDirectory(prefix="exercises-") as scratch:
        generate(root, dest=Path(scratch))
        return compare_trees(Path(root) / RELEASE, Path(scratch))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weeks", nargs="*", help="weeks to generate (default: every week in solutions/)")
    parser.add_argument("--check", action="store_true", help="report drift from a fresh generation; change nothing")
    parser.add_argument("--root", default=str(REPO), help="the course checkout (default: this repository)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    try:
        if args.check:
            problems = check(root)
            if problems:
                print("exercises/ has drifted from solutions/:", *problems, sep="\n- ", file=sys.stderr)
                return 1
            print(f"exercises/ matches solutions/ ({len(weeks_in(root / SOURCE))} week(s))")
            return 0
        weeks = [parse_week(w) for w in args.weeks] or None
        if weeks is None and not weeks_in(root / SOURCE):
            print(f"no notebooks in {root / SOURCE} yet: nothing to generate")
            return 0
        written = generate(root, weeks)
    except CourseError as exc:
        print(f"generate_exercises: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path.relative_to(root) if path.is_relative_to(root) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
