"""Grades and feedback from the results: ``grades.csv``, a summary table, one page per student.

- ``grades.csv``: one row per student, week and graded check: ``student, week, exercise, points, max_points``
  (what an LMS gradebook import or a spreadsheet wants);
- ``summary.csv`` and ``summary.html``: one row per student and week: points, status and what happened;
- ``feedback/STUDENT/index.html``: every week's checks with their points and messages, and links to the
  notebook feedback pages (nbgrader's rendering of the executed notebook, with the same summary on top).

Everything a submission wrote (messages, outputs) is HTML-escaped; nbgrader's pages are rendered with
nbconvert's ``sanitize_html``.
"""

from __future__ import annotations

import csv
import html
import re
from collections import defaultdict
from pathlib import Path

from . import layout

COLORS = {"ok": "#1a7f37", "timeout": "#9a6700", "died": "#cf222e", "error": "#cf222e"}
STATUS_WORDS = {"ok": "ran to the end", "timeout": "ran out of time", "died": "kernel died", "error": "not graded"}
CELL_COLORS = {"passed": "#1a7f37"}

CSS = """
.cg { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 1em auto; padding: 1em 1.2em;
      border: 1px solid #d0d7de; border-radius: 8px; background: #fff; color: #1f2328; }
.cg h1, .cg h2 { margin: 0.2em 0 0.4em; }
.cg table { border-collapse: collapse; width: 100%; margin: 0.6em 0; }
.cg th, .cg td { border-bottom: 1px solid #d0d7de; padding: 0.35em 0.6em; text-align: left; vertical-align: top; }
.cg td.num, .cg th.num { text-align: right; white-space: nowrap; }
.cg .msg { white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; }
.cg .status { font-weight: 600; }
.cg ul { margin: 0.3em 0 0.6em 1.2em; padding: 0; }
"""


def fmt(x: float) -> str:
    return f"{x:g}"


def summary_section(result: dict, *, heading: str = "h2") -> str:
    """The block every feedback page starts with: total, what happened, each check's points and message."""
    e = html.escape
    color = COLORS.get(result["status"], "#1f2328")
    multi = len({c["notebook"] for c in result["cells"]}) > 1
    rows = []
    for c in result["cells"]:
        name = f"{c['notebook']} / {c['exercise']}" if multi else c["exercise"]
        cc = CELL_COLORS.get(c["status"], "#cf222e")
        rows.append(
            f"<tr><td>{e(name)}</td><td class='num'>{fmt(c['points'])} / {fmt(c['max_points'])}</td>"
            f"<td class='status' style='color:{cc}'>{e(c['status'])}</td><td class='msg'>{e(c['message'])}</td></tr>"
        )
    events = "".join(f"<li>{e(ev['message'])}</li>" for ev in result["events"])
    graded = {c["exercise"] for c in result["cells"]}
    raised = [err for err in result.get("errors", []) if err.get("grade_id") not in graded]
    events += "".join(
        f"<li>cell {err['cell']}{' (' + e(err['grade_id']) + ')' if err.get('grade_id') else ''} raised "
        f"<code>{e(err['error'])}</code></li>"
        for err in raised[:10]
    )
    return (
        f"<section class='cg' id='course-grade-summary'><style>{CSS}</style>"
        f"<{heading}>{e(result['student'])}, {e(result['week'])}: {fmt(result['points'])} / "
        f"{fmt(result['max_points'])} points</{heading}>"
        + (
            f"<p>{e(result.get('summary', ''))}</p>"
            if result["status"] == "ok"
            else f"<p><span class='status' style='color:{color}'>{e(STATUS_WORDS.get(result['status'], ''))}</span>: "
            f"{e(result.get('summary', ''))}</p>"
        )
        + (f"<p>What happened:</p><ul>{events}</ul>" if events else "")
        + "<table><tr><th>check</th><th class='num'>points</th><th>result</th><th>message</th></tr>"
        + "".join(rows)
        + "</table>"
        f"<p style='color:#59636e;font-size:13px'>Graded {e(result.get('graded_at', ''))}; sandbox: "
        f"{e(result.get('sandbox', ''))}.</p></section>"
    )


def page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"</head><body>{body}</body></html>\n"
    )


def feedback_html(result: dict) -> str:
    """A feedback page when there is no executed notebook to show (the submission could not be run)."""
    return page(f"{result['student']} {result['week']} feedback", summary_section(result, heading="h1"))


_BODY = re.compile(r"<body[^>]*>", re.IGNORECASE)


def inject_summary(feedback: str, result: dict) -> str:
    """nbgrader's feedback page with the summary at the top."""
    m = _BODY.search(feedback)
    if not m:
        return feedback_html(result)
    return feedback[: m.end()] + summary_section(result) + feedback[m.end() :]


# --------------------------------------------------------------------------------------------------- report


def load_results(root: Path, weeks: list[str] | None = None) -> list[dict]:
    results = []
    for path in sorted((Path(root) / "results").glob("*/*.json")):
        if weeks and path.parent.name not in weeks:
            continue
        try:
            results.append(layout.read_json(path))
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: unreadable result ({err}); grade it again with --force") from None
    return results


def ungraded(root: Path, results: list[dict]) -> list[str]:
    """``student/week`` submitted but without a result."""
    done = {(r["student"], r["week"]) for r in results}
    base = layout.submitted(root)
    subs = sorted(f"{p.parent.name}/{p.name}" for p in base.glob("*/*") if p.is_dir()) if base.is_dir() else []
    return [s for s in subs if tuple(s.split("/")) not in done]


def write_report(root, weeks: list[str] | None = None) -> dict:
    """Write grades.csv, summary.csv, summary.html and the students' pages; return what was written."""
    root = Path(root)
    results = load_results(root, weeks)
    if not results:
        raise ValueError(f"{root / 'results'}: no graded submissions yet; run `course-grade autograde WEEK` first")
    results.sort(key=lambda r: (r["student"], r["week"]))
    with open(root / "grades.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "week", "exercise", "points", "max_points"])
        for r in results:
            for c in r["cells"]:
                exercise = c["exercise"] if c["notebook"] == r["week"] else f"{c['notebook']}/{c['exercise']}"
                w.writerow([r["student"], r["week"], exercise, fmt(c["points"]), fmt(c["max_points"])])
    with open(root / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student", "week", "points", "max_points", "status", "summary"])
        for r in results:
            w.writerow(
                [r["student"], r["week"], fmt(r["points"]), fmt(r["max_points"]), r["status"], r.get("summary", "")]
            )
    by_student = defaultdict(list)
    for r in results:
        by_student[r["student"]].append(r)
    for student, rs in by_student.items():
        links = "".join(
            f"<p>{html.escape(r['week'])}: "
            + ", ".join(
                f"<a href='{html.escape(Path(p).relative_to(Path('feedback') / student).as_posix())}'>"
                f"{html.escape(Path(p).name)}</a>"
                for p in r.get("feedback", [])
            )
            + "</p>"
            for r in rs
        )
        body = (
            f"<section class='cg'><style>{CSS}</style><h1>Feedback for {html.escape(student)}</h1>"
            f"<p>Total: {fmt(sum(r['points'] for r in rs))} / {fmt(sum(r['max_points'] for r in rs))} points. "
            f"The executed notebooks, with each check's output:</p>{links}</section>"
            + "".join(summary_section(r) for r in rs)
        )
        out = root / "feedback" / student / "index.html"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page(f"Feedback for {student}", body), encoding="utf-8")
    week_names = sorted({r["week"] for r in results})
    table = {(r["student"], r["week"]): r for r in results}
    head = "".join(f"<th class='num'>{html.escape(w)}</th>" for w in week_names)
    rows = []
    for student in sorted(by_student):
        cells = []
        for w in week_names:
            r = table.get((student, w))
            if r is None:
                cells.append("<td class='num'>-</td>")
                continue
            color = COLORS.get(r["status"], "#1f2328")
            note = "" if r["status"] == "ok" else f" <span style='color:{color}'>({html.escape(r['status'])})</span>"
            link = html.escape(r["feedback"][0]) if r.get("feedback") else "#"
            cells.append(
                f"<td class='num' title='{html.escape(r.get('summary', ''))}'><a href='{link}'>"
                f"{fmt(r['points'])}/{fmt(r['max_points'])}</a>{note}</td>"
            )
        total = sum(r["points"] for r in by_student[student])
        rows.append(
            f"<tr><td><a href='feedback/{html.escape(student)}/index.html'>{html.escape(student)}</a></td>"
            + "".join(cells)
            + f"<td class='num'>{fmt(total)}</td></tr>"
        )
    failed = [r for r in results if r["status"] != "ok"]
    missing = ungraded(root, results)
    body = (
        f"<section class='cg'><style>{CSS}</style><h1>Grades</h1>"
        f"<p>{len(by_student)} students, {len(results)} graded submissions"
        + (f", {len(failed)} that failed to run" if failed else "")
        + (f"; not graded yet: {html.escape(', '.join(missing))}" if missing else "")
        + ".</p>"
        f"<table><tr><th>student</th>{head}<th class='num'>total</th></tr>{''.join(rows)}</table></section>"
    )
    (root / "summary.html").write_text(page("Grades", body), encoding="utf-8")
    return {
        "results": results,
        "failed": failed,
        "ungraded": missing,
        "files": [
            root / "grades.csv",
            root / "summary.csv",
            root / "summary.html",
            *[root / "feedback" / s / "index.html" for s in by_student],
        ],
    }


def text_table(results: list[dict]) -> str:
    """The summary table for the terminal."""
    rows = [("student", "week", "points", "status", "what happened")]
    for r in results:
        rows.append(
            (
                r["student"],
                r["week"],
                f"{fmt(r['points'])}/{fmt(r['max_points'])}",
                r["status"],
                "" if r["status"] == "ok" else r.get("summary", "")[:90],
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)) + "  " + row[4] for row in rows
    ).rstrip()
