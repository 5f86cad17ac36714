"""``course-grade``: collect, autograde and report on students' notebooks (docs/instructors.md).

Exit codes: 0 all went well; 1 a submission failed to run (died, ran out of time, could not be graded) or an
upload could not be attributed to a student; 2 the command itself could not run (a message says why).
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
import threading
from pathlib import Path

from . import layout

SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?$", re.IGNORECASE)


def size(text: str) -> int:
    """``"4G"`` -> 4 GiB in bytes."""
    m = SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 4G, 512M")
    return int(float(m.group(1)) * 1024 ** "bkmgt".index((m.group(2) or "b").lower()))


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive whole number")
    return value


def parser() -> argparse.ArgumentParser:
    from .autograde import Options
    from .sandbox import Limits

    o, lim = Options(), Limits()
    p = argparse.ArgumentParser(
        prog="course-grade",
        description="Grade the course's notebooks with nbgrader: "
        "collect submissions, autograde them in a sandbox, report grades and feedback.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        type=Path,
        default=Path("grading"),
        help="the grading folder (default: ./grading; keep it out of git, it holds students' work)",
    )

    c = sub.add_parser("collect", parents=[common], help="put submissions (folders, LMS zips) into submitted/")
    c.add_argument("week", help="the week, as named under solutions/ (e.g. week00)")
    c.add_argument("inputs", nargs="+", help="folders, .zip files or notebooks holding the submissions")
    c.add_argument("--to", dest="dir", type=Path, help="the grading folder (same as --dir)")
    c.add_argument("--source", type=Path, help="the solutions folder (default: the repository's solutions/)")
    c.add_argument(
        "--pattern",
        help="regular expression on each file's path with a group named student, "
        "e.g. '^(?P<student>[^_]+)_' (default: recognise Moodle, Canvas, Blackboard, one folder per student)",
    )

    a = sub.add_parser("autograde", parents=[common], help="grade submitted notebooks, each in its own sandbox")
    a.add_argument("weeks", nargs="+", metavar="week", help="the week(s) to grade (e.g. week00)")
    a.add_argument("--source", type=Path, help="the solutions folder (default: the repository's solutions/)")
    a.add_argument("--student", action="append", help="grade only this student (repeatable)")
    a.add_argument("--force", action="store_true", help="grade again submissions already graded")
    a.add_argument(
        "--cell-timeout", type=positive, default=o.cell_timeout, help=f"seconds per cell (default {o.cell_timeout})"
    )
    a.add_argument(
        "--notebook-timeout",
        type=positive,
        default=o.notebook_timeout,
        help=f"seconds per notebook (default {o.notebook_timeout})",
    )
    a.add_argument("--memory", type=size, default=lim.memory_bytes, help="address space per process (default 4G)")
    a.add_argument(
        "--cpu-time", type=positive, default=None, help="CPU seconds per process (default: the notebook timeout)"
    )
    a.add_argument(
        "--max-file", type=size, default=lim.file_bytes, help="largest file a submission may write (default 256M)"
    )
    a.add_argument(
        "--max-processes", type=positive, default=lim.processes, help=f"processes and threads (default {lim.processes})"
    )
    a.add_argument(
        "--max-output",
        type=positive,
        default=o.max_output_mib,
        help=f"MiB of output kept per cell (default {o.max_output_mib})",
    )
    a.add_argument("--jobs", "-j", type=positive, default=o.jobs, help="submissions graded at once (default 1)")
    a.add_argument(
        "--sandbox",
        choices=["auto", "require", "none"],
        default="auto",
        help="auto: bubblewrap if it works, else grade without and say so; require: refuse without it",
    )
    a.add_argument("--hide", action="append", default=[], help="another path submissions must not see (repeatable)")
    a.add_argument(
        "--expose",
        action="append",
        default=[],
        help="a folder under a hidden one (e.g. a model cache in $HOME) submissions may read (repeatable)",
    )
    a.add_argument(
        "--no-check-solutions",
        dest="check_solutions",
        action="store_false",
        help="skip grading the solutions first (which builds the model cache and checks they get full points)",
    )
    a.add_argument("--show-hidden-tests", action="store_true", help="show hidden tests' code on the feedback pages")
    a.add_argument("--work-dir", help="where the private work folder is made (default: the temporary folder)")
    a.add_argument("--keep-work", action="store_true", help="keep the work folder (for debugging)")

    r = sub.add_parser("report", parents=[common], help="write grades.csv, the summary and each student's page")
    r.add_argument("--week", action="append", help="only this week (repeatable)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # stop as on Ctrl-C: graders killed, nothing half-recorded
    try:
        if args.command == "collect":
            return _collect(args)
        if args.command == "autograde":
            return _autograde(args)
        return _report(args)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"course-grade {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"course-grade {args.command}: interrupted; run it again to resume", file=sys.stderr)
        return 130


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _source(args) -> Path:
    from .autograde import default_source

    source = args.source or default_source()
    if not Path(source).is_dir():
        raise ValueError(f"{source}: no solutions folder; pass --source")
    return Path(source)


def _collect(args) -> int:
    from .collect import collect

    r = collect(args.week, args.inputs, args.dir, _source(args), args.pattern)
    print(
        f"{args.week}: {r['students']} student(s), {r['collected']} notebook(s) collected into "
        f"{layout.submitted(args.dir)}"
        + (f", {r['duplicates']} duplicate upload(s) ignored" if r["duplicates"] else "")
    )
    for student, notes in sorted(r["notes"].items()):
        for note in notes:
            print(f"  {student}: {note}")
    for s in r["skipped"]:
        print(f"  skipped {s['file']}: {s['reason']}")
    for s in r["unattributed"]:
        print(f"  NOT COLLECTED {s['file']}: {s['reason']}")
    print(f"record: {r['record']}")
    return 1 if r["unattributed"] else 0


def _autograde(args) -> int:
    from .autograde import Options, autograde
    from .report import text_table
    from .sandbox import Limits

    limits = Limits(
        cpu_seconds=args.cpu_time or args.notebook_timeout,
        memory_bytes=args.memory,
        file_bytes=args.max_file,
        processes=args.max_processes,
    )
    options = Options(
        cell_timeout=args.cell_timeout,
        notebook_timeout=args.notebook_timeout,
        limits=limits,
        max_output_mib=args.max_output,
        jobs=args.jobs,
        force=args.force,
        sandbox=args.sandbox,
        hide=args.hide,
        expose=args.expose,
        show_hidden_tests=args.show_hidden_tests,
        work_dir=args.work_dir,
        keep_work=args.keep_work,
        check_solutions=args.check_solutions,
    )
    source = _source(args)
    failed = []
    for week in args.weeks:
        results, _ = autograde(
            args.dir, week, source=source, students=args.student, options=options, say=lambda m: print(m, flush=True)
        )
        print(text_table(results))
        failed += [r for r in results if r["status"] != "ok"]
    if failed:
        print(
            f"{len(failed)} submission(s) failed to run: "
            + ", ".join(f"{r['student']}/{r['week']} ({r['status']})" for r in failed)
            + f"; their feedback pages say what happened (logs in {Path(args.dir) / 'logs'})"
        )
        return 1
    return 0


def _report(args) -> int:
    from .report import text_table, write_report

    r = write_report(args.dir, args.week)
    print(text_table(r["results"]))
    print(
        f"wrote {Path(args.dir) / 'grades.csv'}, summary.csv, summary.html and {len(r['files']) - 3} student page(s) "
        f"under {Path(args.dir) / 'feedback'}"
    )
    if r["ungraded"]:
        print(f"not graded yet: {', '.join(r['ungraded'])}")
    return 0
