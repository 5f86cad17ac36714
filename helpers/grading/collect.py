"""Collect submissions (folders of notebooks, LMS zips) into nbgrader's ``submitted/STUDENT/WEEK/`` layout.

nbgrader's own ``zip_collect`` needs a regular expression per LMS and stops at the first surprise; uploads
are messier. :func:`collect` accepts, for one week, any mix of folders and ``.zip`` files (a zip inside a
zip is opened too) and decides for every ``.ipynb`` found:

- *whose* it is, from the first rule that applies to its path:
  ``--pattern`` (a regular expression with a ``student`` group) if given; Moodle's
  ``Full Name_123_assignsubmission_file_/`` folders; Canvas's ``name_123_456_file.ipynb`` and
  ``name_LATE_123_456_...``; Blackboard's ``Week_name_attempt_2024-05-01-10-00-00_file.ipynb``;
  else the first folder (``alice/anything.ipynb``); else the file name without the week's notebook name and
  copy markers (``alice_week00 (1).ipynb`` is alice's);
- *which notebook* of the week it is, whatever it was renamed to ("Copy of week00.ipynb", "Untitled3.ipynb"):
  by name, else by the grade ids of the cells it contains;
- and, when a student uploaded several, which one *wins*: the latest (time in the LMS's file name, else the
  file's time, else the higher copy number); the others are reported.

It copies the winner byte for byte to ``submitted/STUDENT/WEEK/NOTEBOOK.ipynb`` with ``timestamp.txt``, and
writes ``collect/WEEK.json`` (sources, duplicates, skipped files). The uploads are only read. Collecting again
(late submissions) replaces a student's notebook only with a newer one.
"""

from __future__ import annotations

import io
import json
import os
import re
import unicodedata
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from . import layout
from .restore import nbgrader_meta

MAX_NOTEBOOK_BYTES = 100 * 1024**2
MAX_NESTED_ZIP_BYTES = 2 * 1024**3

MOODLE = re.compile(r"^(?P<student>.+?)_\d+_assignsubmission_[a-z]+_?$")
CANVAS = re.compile(r"^(?P<student>[A-Za-z0-9-]+?)_(?:LATE_)?\d+_\d+_(?P<name>.+)$")
BLACKBOARD = re.compile(r"^.+?_(?P<student>[^_]+)_attempt_(?P<time>\d{4}-\d\d-\d\d-\d\d-\d\d-\d\d)(?:_(?P<name>.+))?$")
COPY_MARK = re.compile(r"(?:^copy of |^kopie van |^copie de | - copy$| copy$|\s*\((\d+)\)$|-(\d+)$)", re.IGNORECASE)
IGNORED = ("__MACOSX/", ".ipynb_checkpoints/")


@dataclass
class Upload:
    """One ``.ipynb`` found in the inputs."""

    shown: str
    """Where it was found, for people: ``submissions.zip/alice/week00.ipynb``."""
    rel: str
    """Path inside its input (folder or zip), POSIX."""
    data: bytes
    time: datetime
    student: str = ""
    notebook: str = ""
    copy: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def key(self):
        return (self.time, self.copy, self.shown)


def slug(name: str) -> str:
    """A student id safe as a folder name: ``"Ana María Pérez"`` -> ``"ana-maria-perez"``."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9._-]+", "-", ascii_name.lower()).strip("-._")


def strip_copy_marks(stem: str) -> tuple[str, int]:
    """``"Copy of week00 (2)"`` -> ``("week00", 2)``."""
    copy, prev = 0, None
    while prev != stem:
        prev = stem
        m = COPY_MARK.search(stem)
        if m:
            copy = max(copy, int(m.group(1) or m.group(2) or 0))
            stem = (stem[: m.start()] + stem[m.end() :]).strip()
    return stem, copy


# ------------------------------------------------------------------------------------------------ reading


def read_inputs(inputs: list[str]) -> tuple[list[Upload], list[dict]]:
    """Every notebook in ``inputs`` (folders, zips, single notebooks), and the files skipped with the reason."""
    uploads, skipped = [], []
    for item in inputs:
        p = Path(item)
        if not p.exists():
            raise ValueError(f"{item}: no such file or folder")
        if p.is_dir():
            found = _read_folder(p, uploads, skipped)
        elif p.suffix.lower() == ".zip":
            try:
                with zipfile.ZipFile(p) as z:
                    found = _read_zip(z, p.name, uploads, skipped)
            except zipfile.BadZipFile as e:
                raise ValueError(f"{item}: not a readable zip file ({e})") from None
        elif p.suffix.lower() == ".ipynb":
            uploads.append(Upload(p.name, p.name, p.read_bytes(), datetime.fromtimestamp(p.stat().st_mtime)))
            found = 1
        else:
            raise ValueError(f"{item}: expected a folder, a .zip or an .ipynb file")
        if not found:
            raise ValueError(
                f"{item}: no .ipynb inside"
                + (f" (skipped: {', '.join(s['file'] for s in skipped[-5:])})" if skipped else "")
            )
    return uploads, skipped


def _read_folder(folder: Path, uploads: list, skipped: list) -> int:
    found = 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        shown = f"{folder.name}/{rel}"
        if path.is_dir() or any(part in rel + "/" for part in IGNORED) or path.name.startswith("."):
            continue
        if path.is_symlink():
            skipped.append({"file": shown, "reason": "a symbolic link"})
        elif path.suffix.lower() == ".zip":
            try:
                with zipfile.ZipFile(path) as z:
                    found += _read_zip(z, shown, uploads, skipped, prefix=str(PurePosixPath(rel).parent))
            except zipfile.BadZipFile as e:
                skipped.append({"file": shown, "reason": f"not a readable zip ({e})"})
        elif path.suffix.lower() != ".ipynb":
            skipped.append({"file": shown, "reason": "not a notebook"})
        elif path.stat().st_size > MAX_NOTEBOOK_BYTES:
            skipped.append({"file": shown, "reason": f"larger than {MAX_NOTEBOOK_BYTES // 1024**2} MiB"})
        else:
            uploads.append(Upload(shown, rel, path.read_bytes(), datetime.fromtimestamp(path.stat().st_mtime)))
            found += 1
    return found


def _read_zip(
    z: zipfile.ZipFile, shown_zip: str, uploads: list, skipped: list, prefix: str = "", depth: int = 0
) -> int:
    found = 0
    for info in z.infolist():
        name = info.filename
        shown = f"{shown_zip}/{name}"
        base = PurePosixPath(name).name
        if info.is_dir() or any(part in name + "/" for part in IGNORED) or base.startswith("."):
            continue
        rel = str(PurePosixPath(prefix) / name) if prefix not in ("", ".") else name
        if info.flag_bits & 0x1:
            skipped.append({"file": shown, "reason": "encrypted"})
        elif base.lower().endswith(".zip") and depth == 0:
            if info.file_size > MAX_NESTED_ZIP_BYTES:
                skipped.append({"file": shown, "reason": "nested zip too large"})
                continue
            try:
                with zipfile.ZipFile(io.BytesIO(z.read(info))) as inner:
                    found += _read_zip(inner, shown, uploads, skipped, prefix=str(PurePosixPath(rel).parent), depth=1)
            except zipfile.BadZipFile as e:
                skipped.append({"file": shown, "reason": f"not a readable zip ({e})"})
        elif not base.lower().endswith(".ipynb"):
            skipped.append({"file": shown, "reason": "not a notebook"})
        elif info.file_size > MAX_NOTEBOOK_BYTES:
            skipped.append({"file": shown, "reason": f"larger than {MAX_NOTEBOOK_BYTES // 1024**2} MiB"})
        else:
            uploads.append(Upload(shown, rel, z.read(info), datetime(*info.date_time)))
            found += 1
    return found


# ------------------------------------------------------------------------------------------- attribution


def attribute(up: Upload, notebooks: list[str], week: str, pattern: re.Pattern | None) -> str | None:
    """Set ``up.student`` (and the copy number); return why it could not be done, or None."""
    parts = PurePosixPath(up.rel).parts
    stem = PurePosixPath(up.rel).stem
    if pattern is not None:
        m = pattern.search(up.rel)
        if not m or not m.groupdict().get("student"):
            return f"--pattern {pattern.pattern!r} does not match it"
        up.student = slug(m.group("student"))
    elif len(parts) > 1 and (m := MOODLE.match(parts[-2])):
        up.student = slug(m.group("student"))
    elif m := BLACKBOARD.match(stem):
        up.student = slug(m.group("student"))
        up.time = datetime.strptime(m.group("time"), "%Y-%m-%d-%H-%M-%S")
    elif m := CANVAS.match(stem):
        up.student = slug(m.group("student"))
        _, up.copy = strip_copy_marks(m.group("name"))
    elif len(parts) > 1:
        up.student = slug(parts[0])
    else:
        rest, up.copy = strip_copy_marks(stem)
        for word in sorted({*notebooks, week}, key=len, reverse=True):
            rest = re.sub(re.escape(word), " ", rest, flags=re.IGNORECASE)
        rest, more = strip_copy_marks(rest.strip(" _-."))
        up.copy = max(up.copy, more)
        up.student = slug(rest)
    if not up.student:
        return "cannot tell whose it is; put each student's notebooks in a folder named after them, or use --pattern"
    if len(parts) > 1 or pattern is not None:
        _, copy = strip_copy_marks(stem)
        up.copy = max(up.copy, copy)
    return None


def grade_ids(data: bytes) -> set[str]:
    try:
        nb = json.loads(data)
        return {nbgrader_meta(c).get("grade_id") for c in nb.get("cells", []) if isinstance(c, dict)} - {None}
    except (ValueError, AttributeError, TypeError):
        return set()


def match_notebook(up: Upload, source_ids: dict[str, set[str]]) -> str:
    """Which of the week's notebooks ``up`` is, whatever it was renamed to."""
    names = list(source_ids)
    if len(names) == 1:
        return names[0]
    stem, _ = strip_copy_marks(PurePosixPath(up.rel).stem.lower())
    for name in sorted(names, key=len, reverse=True):
        if name.lower() in stem:
            return name
    ids = grade_ids(up.data)
    best = max(names, key=lambda n: len(ids & source_ids[n]))
    return best if ids & source_ids[best] else names[0]


# ---------------------------------------------------------------------------------------------- collecting


def collect(week: str, inputs: list[str], root, source, pattern: str | None = None, say=print) -> dict:
    """Collect ``week``'s submissions from ``inputs`` into the grading folder ``root``; return the record."""
    layout.check_week(week)
    root = Path(root)
    week_dir = Path(source) / week
    notebooks = sorted(p for p in week_dir.glob("*.ipynb")) if week_dir.is_dir() else []
    if not notebooks:
        raise ValueError(f"{week_dir}: no notebooks for {week} (pass the solutions folder with --source)")
    source_ids = {p.stem: grade_ids(p.read_bytes()) for p in notebooks}
    try:
        regex = re.compile(pattern) if pattern else None
    except re.error as e:
        raise ValueError(f"--pattern {pattern!r}: not a regular expression ({e})") from None
    if regex is not None and "student" not in regex.groupindex:
        raise ValueError(f"--pattern {pattern!r}: it needs a group named student, e.g. '^(?P<student>[^/]+)/'")
    uploads, skipped = read_inputs(inputs)
    unattributed = []
    chosen: dict[tuple[str, str], list[Upload]] = {}
    for up in uploads:
        why = attribute(up, list(source_ids), week, regex)
        if why:
            unattributed.append({"file": up.shown, "reason": why})
            continue
        up.notebook = match_notebook(up, source_ids)
        chosen.setdefault((up.student, up.notebook), []).append(up)

    record_path = layout.collect_path(root, week)
    try:
        record = layout.read_json(record_path)
    except (OSError, ValueError):
        record = {"week": week, "inputs": [], "students": {}}
    record["inputs"] = sorted({*record.get("inputs", []), *(str(Path(i).resolve()) for i in inputs)})
    record["skipped"] = skipped + unattributed
    collected, duplicates = 0, 0
    notes_now: dict[str, list[str]] = {}  # this collection's notes per student, over all the week's notebooks
    for (student, nb_name), ups in sorted(chosen.items()):
        ups.sort(key=lambda u: u.key, reverse=True)
        win = ups[0]
        notes = []
        if PurePosixPath(win.rel).name != f"{nb_name}.ipynb":
            notes.append(f"your upload {PurePosixPath(win.rel).name!r} was graded as {nb_name}.ipynb")
        if len(ups) > 1:
            duplicates += len(ups) - 1
            notes.append(
                f"{len(ups)} uploads of {nb_name}: graded the latest, {win.shown} ({win.time:%Y-%m-%d %H:%M}); "
                "ignored " + "; ".join(f"{u.shown} ({u.time:%Y-%m-%d %H:%M})" for u in ups[1:])
            )
        dest = layout.submitted(root, student, week)
        target = dest / f"{nb_name}.ipynb"
        stamp = dest / "timestamp.txt"
        if target.exists():
            old_time = _read_stamp(stamp)
            if target.read_bytes() == win.data:
                continue
            if old_time is not None and old_time > win.time:
                say(
                    f"{student}: kept the submission collected earlier ({old_time:%Y-%m-%d %H:%M}), "
                    f"newer than {win.shown}"
                )
                continue
            notes.append("replaced the submission collected earlier")
        dest.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(win.data)
        os.replace(tmp, target)
        stamp.write_text(win.time.strftime("%Y-%m-%d %H:%M:%S.%f"))
        entry = record["students"].setdefault(student, {"files": {}, "notes": []})
        entry["files"][nb_name] = {
            "from": win.shown,
            "time": win.time.isoformat(),
            "ignored": [u.shown for u in ups[1:]],
        }
        entry["notes"] = notes_now.setdefault(student, [])
        entry["notes"] += notes
        collected += 1
    layout.write_json(record_path, record)
    return {
        "collected": collected,
        "students": len({s for s, _ in chosen}),
        "duplicates": duplicates,
        "skipped": skipped,
        "unattributed": unattributed,
        "record": record_path,
        "notes": {s: record["students"][s]["notes"] for s, _ in chosen if s in record["students"]},
    }


def _read_stamp(path: Path) -> datetime | None:
    try:
        return datetime.strptime(path.read_text().strip(), "%Y-%m-%d %H:%M:%S.%f")
    except (OSError, ValueError):
        return None
