"""Autograde one week's submissions, each in its own sandbox, resumably.

For a run, :func:`autograde` makes a private work folder outside the repository and the grading folder:

1. ``template/``: the week's solutions notebooks and ``nbgrader generate_assignment`` into a fresh gradebook
   (the release, cell checksums, points and hidden tests that nbgrader restores);
2. ``solutions/``: the solutions themselves graded as a submission, outside the sandbox (their code is the
   instructor's): it fills the course's model cache, which submissions may read but not change, and proves
   the solutions score full points on this machine;
3. per submission, ``sNNN/``: a copy of that gradebook, the source, and the student's notebook after
   :func:`~helpers.grading.restore.restore`; then :mod:`helpers.grading.runner` runs nbgrader's autograde and
   generate_feedback there, in a process forked from a server that has nbgrader imported already (seconds per
   submission), the kernel in its :class:`~helpers.grading.sandbox.Sandbox`, under an outer wall-clock limit;
4. the result (points per check, what happened), the executed notebook, the feedback page and the log are
   copied into the grading folder (:mod:`helpers.grading.layout`), and ``sNNN/`` is deleted.

The original submissions are only read. A submission already graded, whose files and solutions are unchanged,
is skipped unless ``force``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import nbformat

from . import layout, runner
from .restore import SubmissionError, graded_cells, read_notebook, restore
from .sandbox import MIB, Limits, Sandbox, cache_dir, check_private, find_bwrap, needed_paths, warnings

# A submission's status: "ok" (errors in cells are the student's mistakes, graded as usual), or one of the three
# ways it failed to run, which make `course-grade autograde` exit with 1: "timeout" (a cell interrupted, or the
# notebook's time budget used up), "died" (the kernel died), "error" (it could not be graded at all).


@dataclass
class Options:
    """How to grade. The defaults suit the course's week notebooks on the ``local`` preset."""

    cell_timeout: int = 300
    """Seconds a cell may run before it is interrupted (nbgrader's ``ExecutePreprocessor.timeout``)."""
    notebook_timeout: int = 1200
    """Seconds for a whole notebook; cells after that are not run. The grader is killed 120 s later still."""
    limits: Limits = field(default_factory=Limits)
    max_output_mib: int = 16
    """Output kept per cell."""
    jobs: int = 1
    """Submissions graded at once."""
    force: bool = False
    """Grade again submissions that were already graded."""
    sandbox: str = "auto"
    """``auto``: bubblewrap when it works, else say so and grade without; ``require``: refuse without it;
    ``none``: no isolation (resource limits only)."""
    hide: list[str] = field(default_factory=list)
    """More paths the kernel must not see (the uploads folder, say)."""
    expose: list[str] = field(default_factory=list)
    """Folders inside hidden ones the kernel needs, read-only (a model cache in $HOME, say)."""
    show_hidden_tests: bool = False
    """Show the hidden tests' code on the feedback pages."""
    work_dir: str | None = None
    """Where the private work folder is made (default: the system's temporary folder)."""
    keep_work: bool = False
    """Keep the work folder, for debugging."""
    check_solutions: bool = True
    """First grade the solutions themselves (outside the sandbox): builds the model cache, checks full points."""


@dataclass
class Week:
    """The assignment: notebooks and graded cells of one week in the solutions folder."""

    name: str
    folder: Path
    notebooks: list[str]
    cells: list[dict]
    """``{"notebook", "exercise", "max_points"}`` per graded cell, in order."""
    sha256: str

    @property
    def max_points(self) -> float:
        return sum(c["max_points"] for c in self.cells)


def default_source() -> Path:
    """The repository's ``solutions/`` folder (next to ``helpers/``)."""
    return Path(__file__).resolve().parents[2] / "solutions"


def load_week(source: Path, week: str) -> Week:
    layout.check_week(week)
    folder = Path(source) / week
    if not folder.is_dir():
        have = sorted(p.name for p in Path(source).iterdir() if p.is_dir()) if Path(source).is_dir() else []
        raise ValueError(f"{folder}: no such week folder" + (f" (found: {', '.join(have)})" if have else ""))
    paths = sorted(p for p in folder.glob("*.ipynb"))
    if not paths:
        raise ValueError(f"{folder}: no .ipynb notebooks in the week folder")
    cells = []
    for p in paths:
        for gid, points in graded_cells(read_notebook(str(p))):
            cells.append({"notebook": p.stem, "exercise": gid, "max_points": points})
    if not cells:
        raise ValueError(f"{folder}: the notebooks have no graded cells (nbgrader metadata with points)")
    return Week(week, folder, [p.stem for p in paths], cells, layout.tree_sha256(folder))


def find_students(root: Path, week: str) -> list[str]:
    base = layout.submitted(root)
    if not base.is_dir():
        return []
    return sorted(p.parent.name for p in base.glob(f"*/{week}") if p.is_dir())


# --------------------------------------------------------------------------------------------------- a run


class Run:
    """One ``course-grade autograde`` invocation for one week."""

    def __init__(self, root: Path, week: Week, options: Options, say=print):
        self.root, self.week, self.opt, self.say = Path(root).resolve(), week, options, say
        if options.sandbox == "none":
            self.use_bwrap, self.sandbox_note = False, "sandbox: none (asked for); resource limits only"
        else:
            self.use_bwrap, self.sandbox_note = find_bwrap()
            if not self.use_bwrap and options.sandbox == "require":
                raise RuntimeError(self.sandbox_note)
        self.notes = warnings(self.use_bwrap, self.sandbox_note) if options.sandbox != "none" else [self.sandbox_note]
        work_parent = options.work_dir or tempfile.gettempdir()
        os.makedirs(work_parent, exist_ok=True)
        self.work = Path(tempfile.mkdtemp(prefix="cg-", dir=work_parent)).resolve()
        # Kernel sockets need a short path (107 characters at most), whatever --work-dir is.
        short = "/tmp" if os.access("/tmp", os.W_OK) else None
        self.sockets = Path(tempfile.mkdtemp(prefix="cgrt-", dir=short)).resolve()
        try:
            self.hide, self.keep = self._visibility()
        except Exception:
            self.close()
            raise
        self.env = dict(os.environ)
        bindir = os.path.dirname(sys.executable)  # nbgrader calls `alembic` from PATH
        self.env["PATH"] = bindir + os.pathsep + self.env.get("PATH", "")
        pkg_root = str(Path(__file__).resolve().parents[2])
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in [pkg_root, self.env.get("PYTHONPATH", "")] if p)
        self.env["JUPYTER_CONFIG_DIR"] = str(self.work / "jupyter-config")  # none of the instructor's config
        self.env["JUPYTER_DATA_DIR"] = str(self.work / "jupyter-data")
        self.env.pop("JUPYTER_PATH", None)
        self.children: set[int] = set()  # process groups of running graders, killed if the run is stopped
        self.stopping = False

    def _visibility(self) -> tuple[list[str], list[str]]:
        """What the kernel must not see, and what it needs to see inside that.

        Private paths are never shown, not even in part: the grading folder (every submission, the grades), the
        work folder, the solutions, the uploads, the repository's git history and nbgrader's gradebook in the
        cache (both hold the hidden tests, which a submission could otherwise print into its feedback). Broad ones
        (homes, mounts) are hidden except for the interpreter, the packages and the course's model cache.
        """
        pkg_root = Path(__file__).resolve().parents[2]
        private = [
            str(self.root),
            str(self.work),
            str(self.sockets),
            str(self.week.folder.parent.resolve()),
            *self._collected_from(),
            str(pkg_root / ".git"),
            str(Path(cache_dir()) / "nbgrader"),
            *self.opt.hide,
        ]
        for e in self.opt.expose:
            inside = [p for p in private if layout.under(e, p)]
            if inside:
                raise ValueError(f"--expose {e}: it is inside {inside[0]}, which submissions must not see")
        keep = check_private(private, [*needed_paths(), cache_dir(), *self.opt.expose])
        return [*private, "/home", "/root", os.path.expanduser("~"), "/media", "/mnt"], keep

    def _collected_from(self) -> list[str]:
        path = layout.collect_path(self.root, self.week.name)
        try:
            return [s for s in layout.read_json(path).get("inputs", []) if os.path.exists(s)]
        except (OSError, ValueError):
            return []

    def stop(self) -> None:
        """Kill the running graders (Ctrl-C): their submissions stay ungraded, for the next run to resume."""
        self.stopping = True
        for pgid in list(self.children):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)

    def close(self) -> None:
        shutil.rmtree(self.sockets, ignore_errors=True)
        if not self.opt.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)

    def _child(self, argv: list[str], log: Path, env: dict, cwd: Path, limit: float) -> int | None:
        return _run_child(argv, log, env, cwd, limit, self.children)

    # ------------------------------------------------------------------------------------------- template

    def make_template(self) -> None:
        course = self.work / "template" / "course"
        shutil.copytree(
            self.week.folder,
            course / "source" / self.week.name,
            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"),
        )
        log = self.work / "template" / "generate.log"
        if self._child(["generate", str(course), self.week.name], log, self.env, course, limit=600) != 0:
            raise RuntimeError(f"nbgrader generate_assignment failed for {self.week.folder}:\n{_tail(log, 5000)}")
        self.template = course

    # ------------------------------------------------------------------------------------- one submission

    def needs_grading(self, student: str) -> tuple[bool, str]:
        path = layout.result_path(self.root, self.week.name, student)
        if self.opt.force or not path.exists():
            return True, ""
        try:
            old = layout.read_json(path)
        except (OSError, ValueError):
            return True, "the earlier result is unreadable"
        if old.get("submission_sha256") != layout.tree_sha256(layout.submitted(self.root, student, self.week.name)):
            return True, "the submission changed since it was graded"
        if old.get("source_sha256") != self.week.sha256:
            return True, "the solutions changed since it was graded"
        return False, f"already graded ({fmt(old['points'])}/{fmt(old['max_points'])}); --force grades it again"

    def grade(self, n: int, student: str) -> dict | None:
        """Grade one student's submission and publish the result, notebook, feedback page and log.

        None if the run was stopped meanwhile (nothing is recorded, so the next run grades it).
        """
        started = time.monotonic()
        sub = layout.submitted(self.root, student, self.week.name)
        job_dir = self.work / f"s{n:03d}"
        try:
            result, log = self._execute(job_dir, student, sub, self.use_bwrap)
        except Exception as e:  # a bug or a full disk: this submission is not graded, the batch goes on
            result, log = self._blank(student, sub, self.use_bwrap), traceback.format_exc()
            result["status"] = "error"
            result["summary"] = f"The grader failed on this submission ({type(e).__name__}: {e}); see its log."
        if self.stopping:
            return None
        result["events"] = self._collect_events(student) + result["events"]
        self._publish(result, log, job_dir)
        result["seconds"] = round(time.monotonic() - started, 2)
        layout.write_json(layout.result_path(self.root, self.week.name, student), result)
        if not self.opt.keep_work:
            shutil.rmtree(job_dir, ignore_errors=True)
        return result

    def check_solutions(self) -> dict:
        """Grade the solutions notebooks themselves, as a submission, outside the sandbox (they are the
        instructor's code). This builds any course artifact the week needs into the cache (COURSE_CACHE), which
        the sandboxed submissions then read but cannot change, and proves the solutions score full points here.
        """
        started = time.monotonic()
        result, log = self._execute(self.work / "solutions", "solutions", self.week.folder, use_bwrap=False)
        _settle(result)
        result["seconds"] = round(time.monotonic() - started, 2)
        path = layout.log_path(self.root, self.week.name, "_solutions")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(log, encoding="utf-8", errors="replace")
        return result

    def _execute(self, job_dir: Path, student: str, sub: Path, use_bwrap: bool) -> tuple[dict, str]:
        """Prepare ``sub`` in ``job_dir`` and run the grader on it; the result before publication, and the log."""
        week = self.week.name
        course = job_dir / "course"
        result = self._blank(student, sub, use_bwrap)
        shutil.copytree(self.template / "source", course / "source")
        shutil.copy2(self.template / "gradebook.db", course / "gradebook.db")
        dest = course / "submitted" / student / week
        dest.mkdir(parents=True)
        if not self._prepare(sub, dest, result):
            result["status"] = "error"
            result["summary"] = "No notebook of this week could be read, so nothing was run."
            return result, ""
        return result, self._run_grader(job_dir, course, student, result, use_bwrap)

    def _blank(self, student: str, sub: Path, use_bwrap: bool) -> dict:
        """A result with no points yet: every check "not run"."""
        return {
            "student": student,
            "week": self.week.name,
            "status": "ok",
            "points": 0.0,
            "max_points": self.week.max_points,
            "cells": [dict(c, points=0.0, status="not run", message="") for c in self.week.cells],
            "events": [],
            "submission_sha256": layout.tree_sha256(sub),
            "source_sha256": self.week.sha256,
            "sandbox": "bubblewrap" if use_bwrap else "none",
            "graded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _collect_events(self, student: str) -> list[dict]:
        try:
            info = layout.read_json(layout.collect_path(self.root, self.week.name))["students"][student]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return [{"kind": "collect", "message": m} for m in info.get("notes", [])]

    def _prepare(self, sub: Path, dest: Path, result: dict) -> int:
        """Copy the submission into the job, restoring deleted cells; return how many notebooks are readable."""
        readable = 0
        for f in sub.iterdir():
            if f.is_file() and not f.is_symlink() and f.suffix != ".ipynb":
                shutil.copy2(f, dest / f.name)
        for name in self.week.notebooks:
            path = sub / f"{name}.ipynb"
            if not path.is_file():
                result["events"].append(
                    {"kind": "missing", "message": f"no {name}.ipynb was submitted; its checks score 0"}
                )
                continue
            try:
                nb = read_notebook(str(path), shown_as=f"{name}.ipynb")
                source = read_notebook(str(self.week.folder / f"{name}.ipynb"))
                release_path = self.template / "release" / self.week.name / f"{name}.ipynb"
                release = read_notebook(str(release_path)) if release_path.exists() else None
                nb, notes = restore(nb, source, release)
            except SubmissionError as e:
                result["events"].append({"kind": "unreadable", "message": f"{e}; its checks score 0"})
                continue
            nbformat.write(nb, str(dest / f"{name}.ipynb"))
            result["events"] += [{"kind": "restored", "message": m} for m in notes]
            readable += 1
        return readable

    def _run_grader(self, job_dir: Path, course: Path, student: str, result: dict, use_bwrap: bool) -> str:
        box = Sandbox(
            private_dir=str(job_dir / "box"),
            run_dir=str(job_dir / "box" / "run"),
            runtime_dir=str(self.sockets / job_dir.name),
            hide=self.hide,
            keep=self.keep,
            limits=self.opt.limits,
            use_bwrap=use_bwrap,
        )
        job = {
            "course": str(course),
            "week": self.week.name,
            "student": student,
            "assignment": self.week.cells,
            "show_hidden_tests": self.opt.show_hidden_tests,
            "execute": {
                "timeout": self.opt.cell_timeout,
                "notebook_timeout": self.opt.notebook_timeout,
                "interrupt_on_timeout": True,
                "max_output_bytes": self.opt.max_output_mib * MIB,
                "report_path": str(job_dir / "events.json"),
                "sandbox": box.to_dict(),
            },
        }
        layout.write_json(job_dir / "job.json", job)
        env = dict(self.env, JUPYTER_RUNTIME_DIR=box.runtime_dir)
        limit = self.opt.notebook_timeout + 120
        log_file = job_dir / "grader.log"
        if self._child(["grade", str(job_dir / "job.json")], log_file, env, course, limit) is None:
            result["events"].append(
                {"kind": "timeout", "message": f"grading took longer than {limit} s and was stopped"}
            )
        log = _tail(log_file, 200_000)
        out_path = job_dir / "result.json"
        if not out_path.exists():
            result["status"] = "error"
            result["summary"] = "The grader stopped before it could record a grade: " + _last_line(log)
            return log
        got = layout.read_json(out_path)
        kernel_log = job_dir / "box" / "kernel.log"
        log += (
            "\n"
            + got.get("log", "")
            + ("\n[kernel process output]\n" + _tail(kernel_log, 20_000) if kernel_log.exists() else "")
        )
        result["cells"] = got["cells"]
        result["events"] += got["events"]
        if not got["autograde_ok"] and not any(e["kind"] == "died" for e in got["events"]):
            result["status"] = "error"
            result["summary"] = "nbgrader could not grade this submission: " + _nbgrader_error(got.get("log", ""))
        result["_autograded"], result["_feedback"] = got["autograded"], got["feedback"]
        result["timings"] = got.get("timings", {})
        result["errors"] = got.get("errors", [])
        return log

    def _publish(self, result: dict, log: str, job_dir: Path) -> None:
        """Copy the executed notebook, the feedback page and the log into the grading folder."""
        from .report import feedback_html, inject_summary

        _settle(result)
        student, week = result["student"], result["week"]
        for d in (layout.autograded_dir(self.root, student, week), layout.feedback_dir(self.root, student, week)):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        autograded, feedback = result.pop("_autograded", {}), result.pop("_feedback", {})
        for name, path in autograded.items():
            shutil.copyfile(path, layout.autograded_dir(self.root, student, week) / f"{name}.ipynb")
        result["feedback"] = []
        for name in self.week.notebooks:
            page = layout.feedback_dir(self.root, student, week) / f"{name}.html"
            if name in feedback:
                page.write_text(
                    inject_summary(Path(feedback[name]).read_text(encoding="utf-8"), result), encoding="utf-8"
                )
            else:
                page.write_text(feedback_html(result), encoding="utf-8")
            result["feedback"].append(str(page.relative_to(self.root)))
        path = layout.log_path(self.root, week, student)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(log, encoding="utf-8", errors="replace")


def _settle(result: dict) -> None:
    """Status, points and summary from the cells and events."""
    kinds = {e["kind"] for e in result["events"]}
    if result["status"] != "error":
        result["status"] = "died" if "died" in kinds else "timeout" if "timeout" in kinds else "ok"
    result["points"] = sum(c["points"] for c in result["cells"])
    result.setdefault("summary", _summary(result))


_FORKSERVER = None


def _run_child(argv: list[str], log: Path, env: dict, cwd: Path, limit: float, registry: set) -> int | None:
    """``python -m helpers.grading.runner ARGV`` as a process forked from a server that has nbgrader imported.

    Returns its exit code, or None when it ran past ``limit`` seconds and was killed with its process group
    (the sandboxed kernel goes with it: bubblewrap's --die-with-parent).
    """
    global _FORKSERVER
    if _FORKSERVER is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(runner.PRELOAD)
        _FORKSERVER = ctx
    proc = _FORKSERVER.Process(target=runner.child_main, args=(argv, str(log), env, str(cwd), os.getpid()))
    proc.start()
    registry.add(proc.pid)  # its process group: the child calls setsid() first thing
    try:
        proc.join(timeout=limit)
        if proc.is_alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.join()
            return None
        return proc.exitcode
    finally:
        registry.discard(proc.pid)


def _check_solutions(run: Run, say) -> None:
    ref = run.check_solutions()
    line = (
        f"solutions: {fmt(ref['points'])}/{fmt(ref['max_points'])} on this machine, outside the sandbox, "
        f"in {ref['seconds']:.1f} s"
    )
    errors = [f"cell {e['cell']} raised {e['error']}" for e in ref.get("errors", [])]
    if ref["points"] < ref["max_points"] or ref["status"] != "ok" or errors:
        failed = [f"{c['exercise']}: {c['message'] or c['status']}" for c in ref["cells"] if c["status"] != "passed"]
        line = (
            f"WARNING: {line}: {ref['summary']} {'; '.join(failed + errors)}. The solutions should run without "
            f"errors here, or submissions will fail the same way; see "
            f"{layout.log_path(run.root, run.week.name, '_solutions')}"
        )
        run.notes.append(line)
    say(line)


def _summary(result: dict) -> str:
    cells = result["cells"]
    passed = sum(c["status"] == "passed" for c in cells)
    events = result["events"]
    if result["status"] == "died":
        where = next(e["message"].split(":")[0] for e in events if e["kind"] == "died")
        return f"The kernel died in {where}; the cells after it were not run. {passed} of {len(cells)} checks passed."
    if result["status"] == "timeout":
        first = next(e["message"] for e in events if e["kind"] == "timeout")
        return f"Ran out of time: {first}. {passed} of {len(cells)} checks passed."
    if passed == len(cells):
        return "The notebook ran to the end and every check passed."
    return f"The notebook ran to the end; {passed} of {len(cells)} checks passed."


def _tail(path: Path, n: int) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - n))
        return f.read().decode("utf-8", errors="replace")


def _last_line(log: str) -> str:
    lines = [line for line in log.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else "(no output)"


def _nbgrader_error(log: str) -> str:
    errors = [line for line in log.splitlines() if "[ERROR]" in line or "Error" in line]
    return (errors[-1] if errors else _last_line(log))[:500]


def fmt(x: float) -> str:
    return f"{x:g}"


# ------------------------------------------------------------------------------------------------- the API


def autograde(
    root, week: str, *, source=None, students: list[str] | None = None, options: Options | None = None, say=print
) -> tuple[list[dict], list[str]]:
    """Grade ``week``'s submissions under ``root`` (the grading folder); return the results and the notes.

    Results already in ``root`` and still current are returned as they are (``"skipped": True``). Grading runs
    in processes started by multiprocessing's fork server: from a script, call this under
    ``if __name__ == "__main__":``.
    """
    options = options or Options()
    root = Path(root)
    wk = load_week(Path(source) if source else default_source(), week)
    available = find_students(root, week)
    if students:
        missing = sorted(set(students) - set(available))
        if missing:
            raise ValueError(f"{layout.submitted(root)}: no {week} submission for {', '.join(missing)}")
        available = [s for s in available if s in students]
    if not available:
        raise ValueError(
            f"{layout.submitted(root)}: no submissions for {week}; run `course-grade collect {week} ...` first"
        )
    run = Run(root, wk, options, say)
    try:
        for note in run.notes:
            say(f"note: {note}")
        if run.use_bwrap:
            say(run.sandbox_note)
        todo, results = [], {}
        for s in available:
            need, why = run.needs_grading(s)
            if need:
                todo.append(s)
                if why:
                    say(f"{s}: {why}; grading again")
            else:
                results[s] = dict(layout.read_json(layout.result_path(root, week, s)), skipped=True)
                say(f"{s}: {why}")
        if todo:
            with layout.locked(root):
                run.make_template()
                if options.check_solutions:
                    _check_solutions(run, say)
                say(
                    f"grading {len(todo)} submission(s) of {week} ({fmt(wk.max_points)} points), "
                    f"{options.jobs} at a time; cell timeout {options.cell_timeout} s, "
                    f"notebook {options.notebook_timeout} s"
                )

                def one(args):
                    i, s = args
                    r = run.grade(i, s)
                    if r is not None:
                        say(
                            f"{s}: {fmt(r['points'])}/{fmt(r['max_points'])} {r['status']} in {r['seconds']:.1f} s"
                            + ("" if r["status"] == "ok" else f" ({r['summary']})")
                        )
                    return s, r

                pool = ThreadPoolExecutor(max_workers=max(1, options.jobs))
                try:
                    for s, r in pool.map(one, enumerate(todo)):
                        results[s] = r
                except BaseException:
                    run.stop()
                    raise
                finally:
                    pool.shutdown(wait=True, cancel_futures=True)
    finally:
        run.close()
    return [results[s] for s in available], run.notes
