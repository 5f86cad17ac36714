"""The grading subprocess: nbgrader on one private course folder, outside the sandbox.

``python -m helpers.grading.runner generate COURSE WEEK``: ``nbgrader generate_assignment`` into a fresh
gradebook, once per run (the template every submission's gradebook is copied from).

``python -m helpers.grading.runner grade JOB.json``: ``nbgrader autograde`` + ``generate_feedback`` for one
student, then ``result.json`` beside the job: each graded cell's points, max points, status and message.

Each call is its own process, so the parent can stop it on a wall-clock limit and one submission's trouble
(a flood of output, an nbgrader crash) cannot take the batch down.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
import traceback

from traitlets.config import Config

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
SYNTHETIC = {"NotRun", "KernelDied", "CellTimeoutError", "OutputError"}
"""Error names the grader itself writes into cells (see execute.py); reported as events, not as the code's errors."""


def _short_tracebacks_class():
    from nbgrader.preprocessors import NbGraderPreprocessor

    class ShortTracebacksInHiddenTests(NbGraderPreprocessor):
        """Feedback: in a test cell with hidden tests, show an error as its last line only.

        ClearHiddenTests removes the hidden tests from the cell's code, but the traceback still quotes the lines
        around the failing one; ``AssertionError: softmax overflows ...`` is what the student needs.
        """

        def preprocess_cell(self, cell, resources, index):
            if "BEGIN HIDDEN TESTS" in cell.get("source", ""):
                for out in cell.get("outputs", []):
                    if out.get("output_type") == "error":
                        out["traceback"] = [f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"]
            return cell, resources

    return ShortTracebacksInHiddenTests


def nbgrader_config(course: str, *, execute: dict | None = None, show_hidden_tests: bool = False) -> Config:
    """nbgrader settings for a private course folder (nothing read from the instructor's own config files)."""
    from nbconvert.preprocessors import CSSHTMLHeaderPreprocessor
    from nbgrader.converters import Autograde
    from nbgrader.preprocessors import ClearHiddenTests, Execute, GetGrades

    from .execute import SandboxedExecute

    ShortTracebacksInHiddenTests = _short_tracebacks_class()

    c = Config()
    c.CourseDirectory.root = course
    c.CourseDirectory.db_url = "sqlite:///" + os.path.join(course, "gradebook.db")
    c.CourseDirectory.source_directory = "source"
    c.CourseDirectory.release_directory = "release"
    c.Autograde.autograde_preprocessors = [
        SandboxedExecute if p is Execute else p for p in Autograde.class_traits()["autograde_preprocessors"].default()
    ]
    for key, value in (execute or {}).items():
        c.SandboxedExecute[key] = value
    if execute and "max_output_bytes" in execute:
        # one message may hold a few cells' worth of output; a larger one is dropped (and the cell told so)
        c.LimitedIOPubClient.max_message_bytes = max(4 * execute["max_output_bytes"], 1024**2)
    hide = [] if show_hidden_tests else [ShortTracebacksInHiddenTests, ClearHiddenTests]
    c.GenerateFeedback.preprocessors = [*hide, GetGrades, CSSHTMLHeaderPreprocessor]
    c.HTMLExporter.sanitize_html = True  # a submission's HTML output must not run scripts in the reader's browser
    return c


def _api(config: Config):
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    return NbGraderAPI(coursedir=CourseDirectory(config=config), config=config)


def generate(course: str, week: str) -> int:
    r = _api(nbgrader_config(course)).generate_assignment(week, force=True, create=True)
    if not r["success"]:
        print(r["log"], r.get("error") or "", file=sys.stderr)
        return 1
    return 0


def cell_outcome(cell) -> tuple[str, str]:
    """``(status, message)`` of an executed graded cell: what a student should read first."""
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            ename, evalue = out.get("ename", "Error"), ANSI.sub("", str(out.get("evalue", ""))).strip()
            status = {"NotRun": "not run", "KernelDied": "kernel died", "CellTimeoutError": "timed out"}.get(
                ename, "failed"
            )
            if ename == "CellTimeoutError":
                evalue = evalue or "the cell ran too long and was interrupted"
            if ename == "NotRun":
                return status, evalue
            return status, f"{ename}: {evalue}" if evalue else ename
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream" and out.get("name") == "stderr":
            first = ANSI.sub("", out.get("text", "")).strip().splitlines()[:1]
            return "failed", "wrote to stderr, which nbgrader scores as a failure: " + (first[0][:300] if first else "")
    return "passed", ""


def grade(job_path: str) -> int:
    import nbformat
    from nbgrader.api import Gradebook, MissingEntry

    with open(job_path) as f:
        job = json.load(f)
    course, week, student = job["course"], job["week"], job["student"]
    config = nbgrader_config(course, execute=job["execute"], show_hidden_tests=job.get("show_hidden_tests", False))
    api = _api(config)
    result = {
        "autograde_ok": False,
        "log": "",
        "cells": [],
        "events": [],
        "feedback": {},
        "autograded": {},
        "timings": {},
        "errors": [],
    }
    started = time.monotonic()
    out_path = os.path.join(os.path.dirname(job_path), "result.json")
    try:
        r = api.autograde(week, student, force=True, create=True)
        result["timings"]["autograde"] = round(time.monotonic() - started, 2)
        result["autograde_ok"] = bool(r["success"])
        result["log"] = (r.get("log") or "")[-20000:] + (r.get("error") or "")[-5000:]
        report = job["execute"].get("report_path")
        if report and os.path.exists(report):
            with open(report) as f:
                result["events"] = json.load(f)
        autograded = os.path.join(course, "autograded", student, week)
        notebooks = sorted({cell["notebook"] for cell in job["assignment"]})
        with Gradebook(config.CourseDirectory.db_url) as gb:
            scores = {}
            for name in notebooks:
                try:
                    scores[name] = {g.name: g.score for g in gb.find_submission_notebook(name, week, student).grades}
                except MissingEntry:
                    scores[name] = {}
        executed = {}
        for name in notebooks:
            path = os.path.join(autograded, name + ".ipynb")
            if os.path.exists(path):
                result["autograded"][name] = path
                nb = nbformat.read(path, as_version=4)
                executed[name] = {c.metadata.get("nbgrader", {}).get("grade_id"): c for c in nb.cells}
                for i, c in enumerate(nb.cells):
                    for out in c.get("outputs", []):
                        if out.get("output_type") == "error" and out.get("ename") not in SYNTHETIC:
                            text = ANSI.sub("", f"{out.get('ename', 'Error')}: {out.get('evalue', '')}")[:300]
                            gid = c.metadata.get("nbgrader", {}).get("grade_id")
                            result["errors"].append({"notebook": name, "cell": i + 1, "grade_id": gid, "error": text})
        for cell in job["assignment"]:
            name, gid = cell["notebook"], cell["exercise"]
            ran = executed.get(name, {}).get(gid)
            status, message = cell_outcome(ran) if ran is not None else ("not run", "")
            result["cells"].append(
                {**cell, "points": float(scores.get(name, {}).get(gid) or 0), "status": status, "message": message}
            )
        if result["autograded"]:
            started = time.monotonic()
            fb = api.generate_feedback(week, student, force=True)
            result["timings"]["feedback"] = round(time.monotonic() - started, 2)
            if not fb["success"]:
                result["log"] += "\n[generate_feedback]\n" + (fb.get("log") or "")[-5000:]
            for name in notebooks:
                path = os.path.join(course, "feedback", student, week, name + ".html")
                if os.path.exists(path):
                    result["feedback"][name] = path
    except Exception:
        result["log"] += "\n" + traceback.format_exc()
    with open(out_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out_path + ".tmp", out_path)
    return 0


PRELOAD = [
    "nbgrader.apps",
    "nbgrader.api",
    "nbgrader.converters",
    "nbgrader.preprocessors",
    "nbconvert",
    "nbclient",
    "jupyter_client",
    "helpers.grading.execute",
    "helpers.grading.runner",
]
"""Modules the fork server imports once, so that grading a submission does not pay for them (seconds)."""


def child_main(argv: list[str], log_path: str, env: dict, cwd: str, parent: int) -> None:
    """Run :func:`main` in a process forked from the preloaded server: own session, log, environment, folder.

    It ends itself (and its process group: nbgrader, the sandboxed kernel) if ``parent``, the course-grade
    process, is gone: killed, its terminal closed.
    """
    os.setsid()  # so that the parent can kill the whole group on its wall-clock limit
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        code = main(argv)
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_with(parent: int) -> None:
    while True:
        time.sleep(2)
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            os.killpg(0, signal.SIGKILL)
        except PermissionError:
            pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"] and len(argv) == 3:
        return generate(argv[1], argv[2])
    if argv[:1] == ["grade"] and len(argv) == 2:
        return grade(argv[1])
    print("usage: python -m helpers.grading.runner generate COURSE WEEK | grade JOB.json", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
