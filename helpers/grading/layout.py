"""Where everything lives in the instructor's grading folder (nbgrader's layout, plus results and logs).

::

    GRADING/
      submitted/STUDENT/WEEK/NOTEBOOK.ipynb     collect: the upload chosen for grading (+ timestamp.txt)
      collect/WEEK.json                         collect: where each submission came from, duplicates, skipped files
      results/WEEK/STUDENT.json                 autograde: points per check, what happened, hashes for resuming
      autograded/STUDENT/WEEK/NOTEBOOK.ipynb    autograde: the executed notebook
      feedback/STUDENT/WEEK/NOTEBOOK.html       autograde: the feedback page for that notebook
      feedback/STUDENT/index.html               report: the student's page, every week and check
      logs/WEEK/STUDENT.log                     autograde: nbgrader's log for that submission
      grades.csv, summary.csv, summary.html     report
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

WEEK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_week(week: str) -> str:
    if not WEEK.fullmatch(week):
        raise ValueError(f"{week!r} is not a week name; use the folder name under solutions/, e.g. week00")
    return week


def submitted(root: Path, student: str | None = None, week: str | None = None) -> Path:
    p = Path(root) / "submitted"
    return p if student is None else p / student / week if week else p / student


def result_path(root: Path, week: str, student: str) -> Path:
    return Path(root) / "results" / week / f"{student}.json"


def feedback_dir(root: Path, student: str, week: str) -> Path:
    return Path(root) / "feedback" / student / week


def autograded_dir(root: Path, student: str, week: str) -> Path:
    return Path(root) / "autograded" / student / week


def log_path(root: Path, week: str, student: str) -> Path:
    return Path(root) / "logs" / week / f"{student}.log"


def collect_path(root: Path, week: str) -> Path:
    return Path(root) / "collect" / f"{week}.json"


def tree_sha256(folder: Path) -> str:
    """One hash of every regular file under ``folder`` (names and bytes), to notice a changed submission."""
    h = hashlib.sha256()
    folder = Path(folder)
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink() and ".ipynb_checkpoints" not in p.parts:
            h.update(str(p.relative_to(folder)).encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def under(path, parent) -> bool:
    """True when ``path`` is ``parent`` or inside it (symbolic links resolved)."""
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


@contextlib.contextmanager
def locked(root: Path):
    """Hold the grading folder's lock: two ``autograde`` runs on one folder would grade everything twice."""
    Path(root).mkdir(parents=True, exist_ok=True)
    with open(Path(root) / ".course-grade.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"{root}: another `course-grade autograde` is grading this folder; wait for it"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json(path: Path, data) -> None:
    """Write atomically: a reader (or a rerun after Ctrl-C) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False))
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())
