"""Run the course's notebooks, time them, and keep them tidy.

``course-run`` executes one week's notebooks with papermill and writes the executed notebook and an HTML copy:

    course-run                          # week 0, preset auto, into build/week00/
    course-run 3 --preset local         # week 3 on the CPU preset
    course-run week00 --which solutions --seed 1 --out /tmp/build

The parameters cell of every notebook (tagged ``parameters``) holds ``PRESET = "auto"`` and ``SEED``;
papermill replaces them with ``--preset`` and ``--seed``. At the end it prints seconds per notebook against the
course's budget of 120 s per notebook on the ``local`` preset (:data:`BUDGET_S`); the test suite prints the same
table for its own run (``tests/conftest.py``).

:func:`notebook_problems` lists what keeps a committed notebook from being tidy (outputs left in, another
kernel, no parameters cell); the tests apply it to every notebook in course/, solutions/ and exercises/.

Heavy imports (papermill, nbconvert) happen inside the functions that need them, so ``import helpers`` and the
test suite's timing table stay fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BUDGET_S = 120.0
"""Seconds one notebook may take on the ``local`` preset on a 2-core CPU."""

FOLDERS = ("course", "solutions", "exercises")
"""The three notebook folders: lessons, answers, and the exercises generated from them."""

KERNEL = "python3"
"""The kernelspec every committed notebook names, and the kernel papermill starts."""

_WEEK_RE = re.compile(r"^\s*(?:week[\s_-]?)?(\d{1,2})\s*$", re.IGNORECASE)


class CourseError(Exception):
    """A mistake a person can fix (wrong week, no checkout, missing kernel): printed without a traceback."""


# ----------------------------------------------------------------------------------------------- finding


def parse_week(text: str | int) -> int:
    """``0``, ``"0"``, ``"00"``, ``"week00"`` and ``"week 3"`` name weeks 0 and 3."""
    if isinstance(text, int):
        week = text
    else:
        match = _WEEK_RE.match(str(text))
        if match is None:
            raise CourseError(f"{text!r} is not a week: write it as 3, 03 or week03")
        week = int(match.group(1))
    if not 0 <= week <= 99:
        raise CourseError(f"week {week} is out of range: weeks are numbered 0 to 99")
    return week


def week_name(week: int) -> str:
    """The folder name of ``week``: ``week_name(3) == "week03"``."""
    return f"week{week:02d}"


def find_root(start: str | Path | None = None) -> Path:
    """The checkout holding ``course/``: the first folder at or above ``start`` (default: the working directory)
    with both ``course/`` and ``pyproject.toml``, else the checkout this package was installed from (editable)."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "course").is_dir() and (folder / "pyproject.toml").is_file():
            return folder
    installed_from = Path(__file__).resolve().parent.parent
    if (installed_from / "course").is_dir():
        return installed_from
    raise CourseError(
        f"no course checkout found at or above {here}: run course-run inside the course repository "
        "(the folder with course/ and pyproject.toml), or pass --root"
    )


def notebooks_in(folder: Path) -> list[Path]:
    """The notebooks directly in ``folder``, sorted by name (checkpoints and hidden files left out)."""
    return sorted(p for p in Path(folder).glob("*.ipynb") if not p.name.startswith("."))


def weeks_in(folder: Path) -> list[int]:
    """The weeks of ``folder`` (``course/``, ``solutions/`` or ``exercises/``) that hold at least one notebook."""
    weeks = []
    for sub in sorted(Path(folder).glob("week[0-9][0-9]")):
        if sub.is_dir() and notebooks_in(sub):
            weeks.append(int(sub.name[4:]))
    return weeks


def all_notebooks(root: Path, folders: tuple[str, ...] = FOLDERS) -> list[Path]:
    """Every week notebook under ``root``'s ``folders``, sorted: ``course/week00/week00.ipynb``, ..."""
    found = []
    for name in folders:
        for week in weeks_in(Path(root) / name):
            found.extend(notebooks_in(Path(root) / name / week_name(week)))
    return found


def week_notebooks(root: Path, week: int, which: str = "course") -> list[Path]:
    """The notebooks of one week in ``root/which``; a :class:`CourseError` naming the weeks there are if none."""
    folder = Path(root) / which / week_name(week)
    found = notebooks_in(folder) if folder.is_dir() else []
    if not found:
        there = weeks_in(Path(root) / which)
        listing = ", ".join(str(w) for w in there) if there else "none yet"
        raise CourseError(f"week {week} has no notebooks in {Path(root) / which}; the weeks there are: {listing}")
    return found


# ----------------------------------------------------------------------------------------------- running


def use_this_python() -> None:
    """Put this interpreter's folder first on PATH, for the programs this process starts.

    A kernelspec whose argv starts with a bare ``python`` runs whatever ``python`` is first on PATH; with the
    virtual environment not activated (``make course`` does not activate it) that is another interpreter, which
    cannot import the course package. nbgrader likewise runs ``alembic`` from PATH to create its gradebook.
    """
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + path


def check_kernel(name: str = KERNEL) -> None:
    """Raise a :class:`CourseError` saying how to fix it if Jupyter has no kernel called ``name``."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    import shutil

    use_this_python()
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise CourseError(
            f"Jupyter has no kernel called {name!r}. Set up the environment with `make course` (or "
            f"scripts/setup-venv.sh), or register one: {sys.executable} -m ipykernel install --sys-prefix "
            f"--name {name}"
        ) from None
    runs = shutil.which(spec.argv[0]) if spec.argv else None
    if runs and Path(runs).parent != Path(sys.executable).parent:
        print(
            f"course-run: warning: the {name!r} kernel ({spec.resource_dir}) runs {runs}, not this environment's "
            f"{sys.executable}; if the notebooks cannot import helpers, run: {sys.executable} -m ipykernel "
            f"install --sys-prefix --name {name}",
            file=sys.stderr,
        )


@dataclass
class Timing:
    """How long one notebook took, and whether it finished."""

    notebook: str
    seconds: float
    error: str | None = None


def run_notebook(
    source: Path,
    executed: Path,
    *,
    preset: str = "auto",
    seed: int = 0,
    kernel: str = KERNEL,
    html: bool = True,
    progress: bool = True,
) -> Timing:
    """Execute ``source`` with papermill into ``executed`` (and ``executed`` with ``.html``), in ``source``'s
    folder, with ``PRESET`` and ``SEED`` injected after the ``parameters`` cell.

    A failing cell does not raise: the executed copy (with the traceback in it) and its HTML are still written,
    and the returned :class:`Timing` carries the error.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    source, executed = Path(source), Path(executed)
    executed.parent.mkdir(parents=True, exist_ok=True)
    use_this_python()
    error = None
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(source),
            str(executed),
            parameters={"PRESET": preset, "SEED": seed},
            kernel_name=kernel,
            progress_bar=progress,
            cwd=str(source.parent),
        )
    except PapermillExecutionError as exc:
        error = f"cell In [{exc.exec_count}] raised {exc.ename}: {exc.evalue}"
    except (RuntimeError, TimeoutError) as exc:  # nbclient's DeadKernelError (a RuntimeError), CellTimeoutError
        error = f"the kernel stopped: {type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    if html and executed.exists():
        write_html(executed, executed.with_suffix(".html"))
    return Timing(notebook=_label(source), seconds=seconds, error=error)


def _label(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter tables), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def write_html(notebook: Path, html_path: Path) -> Path:
    """Convert an executed notebook to a standalone HTML page (nbconvert's HTMLExporter, lab template)."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(notebook), as_version=4))
    Path(html_path).write_text(body, encoding="utf-8")
    return Path(html_path)


def time_notebooks(
    notebooks: list[Path],
    out: Path,
    *,
    preset: str = "local",
    seed: int = 0,
    budget_s: float = BUDGET_S,
    html: bool = True,
    file=None,
) -> list[Timing]:
    """Execute each of ``notebooks`` into ``out`` and print a table of seconds per notebook against the budget.

    Returns the timings; a notebook that fails is timed up to its failure and shown as FAILED.
    """
    file = file or sys.stdout
    timings = []
    for source in notebooks:
        source = Path(source)
        print(f"running {source} (preset {preset}, seed {seed})", file=file, flush=True)
        timing = run_notebook(source, Path(out) / source.name, preset=preset, seed=seed, html=html)
        if timing.error:
            print(f"  FAILED: {timing.error}", file=file, flush=True)
        timings.append(timing)
    print(format_timing_table(timings, budget_s=budget_s), file=file, flush=True)
    return timings


def format_timing_table(timings: list[Timing], *, budget_s: float = BUDGET_S) -> str:
    """A plain-text table: notebook, seconds, budget, and OK / OVER (over budget) / FAILED.

    >>> print(format_timing_table([Timing("course/week00/week00.ipynb", 41.25)]))
    notebook                    seconds  budget  status
    course/week00/week00.ipynb     41.2     120  OK
    """
    header = ("notebook", "seconds", "budget", "status")
    rows = []
    for t in timings:
        status = "FAILED" if t.error else ("OK" if t.seconds <= budget_s else "OVER")
        rows.append((t.notebook, f"{t.seconds:.1f}", f"{budget_s:.0f}", status))
    width = max([len(header[0])] + [len(r[0]) for r in rows])
    lines = [f"{header[0]:<{width}}  {header[1]:>7}  {header[2]:>6}  {header[3]}"]
    lines += [f"{r[0]:<{width}}  {r[1]:>7}  {r[2]:>6}  {r[3]}" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- tidiness


def notebook_problems(path: Path, *, need_parameters: bool = True) -> list[str]:
    """What keeps the notebook at ``path`` from being committed as the course commits notebooks.

    - it is valid nbformat 4;
    - every cell has an id (nbformat 4.5), so tools that read it give the same output every time;
    - no outputs, no execution counts, no saved widget state (``jupyter nbconvert --clear-output --inplace PATH``
      clears the first two);
    - the kernelspec is ``python3`` (language python);
    - one code cell tagged ``parameters`` holds ``PRESET = "auto"`` and ``SEED = ...`` (if ``need_parameters``).

    Returns one sentence per problem; an empty list means the notebook is fine.
    """
    import json
    import warnings

    import nbformat

    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # missing cell ids are reported below, not warned about
            nb = nbformat.reads(json.dumps(raw), as_version=nbformat.NO_CONVERT)
    except Exception as exc:  # unreadable JSON, wrong structure: say so rather than crash the caller
        return [f"{path}: cannot be read as a notebook ({exc})"]
    problems = []
    if nb.get("nbformat") != 4:
        problems.append(f"{path}: nbformat {nb.get('nbformat')}, expected 4")
        return problems
    if raw.get("nbformat_minor", 0) >= 5 and any("id" not in c for c in raw.get("cells", [])):
        # nbformat would invent random ids on every read, so generated exercises would never be the same twice
        problems.append(f"{path}: some cells have no id; open and save it in JupyterLab to give them one")
    if "widgets" in raw.get("metadata", {}):
        problems.append(
            f"{path}: the notebook metadata keeps widget state ('widgets'); remove it (JupyterLab: "
            "Settings > Save Widget State Automatically, off; then save)"
        )
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as exc:
        problems.append(f"{path}: not a valid notebook: {exc.message}")

    spec = nb.metadata.get("kernelspec", {})
    if spec.get("name") != KERNEL or spec.get("language", "python") != "python":
        problems.append(
            f"{path}: kernelspec is {spec.get('name')!r}, expected {KERNEL!r} "
            "(in JupyterLab: Kernel > Change Kernel > Python 3, then save)"
        )

    dirty = [
        i for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    if dirty:
        shown = ", ".join(str(i) for i in dirty[:8]) + (" ..." if len(dirty) > 8 else "")
        problems.append(
            f"{path}: {len(dirty)} code cell(s) keep outputs or execution counts (cells {shown}); "
            f"clear them with: jupyter nbconvert --clear-output --inplace {path}"
        )

    if need_parameters:
        tagged = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        if len(tagged) != 1 or tagged[0].cell_type != "code":
            problems.append(
                f"{path}: expected exactly one code cell tagged 'parameters', found {len(tagged)} "
                "(in JupyterLab: select the cell, open the property inspector, add the tag 'parameters')"
            )
        else:
            source = tagged[0].source
            if not re.search(r'^PRESET\s*=\s*"auto"', source, re.MULTILINE):
                problems.append(f'{path}: the parameters cell must set PRESET = "auto"')
            if not re.search(r"^SEED\s*=", source, re.MULTILINE):
                problems.append(f"{path}: the parameters cell must set SEED")
    return problems


# ----------------------------------------------------------------------------------------------- command


def build_parser() -> argparse.ArgumentParser:
    from .runtime import PRESETS

    parser = argparse.ArgumentParser(
        prog="course-run",
        description="Execute one week's notebooks with papermill; write the executed notebooks and HTML copies.",
        epilog="Example: course-run 3 --preset local  ->  build/week03/week03.ipynb and build/week03/week03.html",
    )
    parser.add_argument("week", nargs="?", default="0", help="week to run: 0, 00 or week00 (default: 0)")
    parser.add_argument(
        "--preset", default="auto", choices=["auto", *PRESETS],
        help="hardware preset injected as PRESET (default: auto, which picks from the machine)",
    )
    parser.add_argument("--seed", type=int, default=0, help="injected as SEED (default: 0)")
    parser.add_argument("--out", default="build", help="output folder (default: build, relative to the checkout)")
    parser.add_argument(
        "--which", default="course", choices=["course", "solutions"],
        help="run the lesson (course/, default) or the exercise notebooks with answers (solutions/)",
    )
    parser.add_argument("--root", default=None, help="the course checkout (default: found from the working directory)")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML copies")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``course-run`` command; returns the exit status (0: every notebook ran)."""
    args = build_parser().parse_args(argv)
    try:
        week = parse_week(args.week)
        root = Path(args.root).resolve() if args.root else find_root()
        notebooks = week_notebooks(root, week, args.which)
        out = Path(args.out)
        out = (out if out.is_absolute() else root / out) / week_name(week)
        if args.which != "course":
            out = out / args.which
        check_kernel(KERNEL)
    except CourseError as exc:
        print(f"course-run: {exc}", file=sys.stderr)
        return 2

    print(
        f"week {week}: {len(notebooks)} notebook(s) from {root / args.which / week_name(week)}, "
        f"preset {args.preset}, seed {args.seed} -> {out}",
        flush=True,
    )
    timings = time_notebooks(notebooks, out, preset=args.preset, seed=args.seed, html=not args.no_html)
    failed = [t for t in timings if t.error]
    for t in failed:
        executed = out / Path(t.notebook).name
        print(f"course-run: {t.notebook}: {t.error} (the executed copy shows the traceback: {executed})",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
