"""Read a submitted notebook and put back what a student deleted or disguised, before nbgrader sees it.

nbgrader already restores the *source* of an edited read-only cell (its checksum differs) and the hidden tests
(the gradebook holds the source version). It does not, by default, put back a test cell that was deleted: the
cell's points are then silently lost, and the option that does (``OverwriteCells.add_missing_cells``) places it
after the previous graded cell, failing when that one was deleted too, and leaves read-only setup cells out.
:func:`restore` fills that gap and records every change as a sentence for the feedback page:

- a test cell or read-only code cell that is missing is inserted after the nearest earlier cell of the
  assignment that is still there (or before the next one), as in the assignment;
- a cell that lost its nbgrader metadata (some editors drop it) but still holds a test verbatim gets it back;
- a cell claiming a grade id the assignment does not have loses that claim;
- edits to test cells, their points or their type are reported (nbgrader then overwrites them).
"""

from __future__ import annotations

import copy
import json
import re
import uuid

import nbformat
from nbformat.notebooknode import NotebookNode

_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class SubmissionError(ValueError):
    """A submitted file that cannot be graded, with a sentence for the student and the instructor."""


def read_notebook(path: str, shown_as: str | None = None) -> NotebookNode:
    """The notebook at ``path`` as nbformat v4, or :class:`SubmissionError` saying why it cannot be read."""
    name = shown_as or path
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise SubmissionError(f"{name}: not a notebook (the file is not UTF-8 text)") from None
    if not text.strip():
        raise SubmissionError(f"{name}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SubmissionError(f"{name}: not a notebook (invalid JSON at line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict) or "cells" not in data and "worksheets" not in data:
        raise SubmissionError(f"{name}: not a notebook (JSON without 'cells')")
    try:
        nb = nbformat.reads(text, as_version=4)
    except Exception as e:  # nbformat raises several kinds for malformed notebooks
        raise SubmissionError(f"{name}: not a readable notebook ({type(e).__name__}: {e})") from None
    return nb


def nbgrader_meta(cell: NotebookNode) -> dict:
    meta = cell.get("metadata", {}).get("nbgrader")
    return meta if isinstance(meta, dict) else {}


def grade_id(cell: NotebookNode) -> str | None:
    return nbgrader_meta(cell).get("grade_id")


def is_test(cell: NotebookNode) -> bool:
    m = nbgrader_meta(cell)
    return bool(m.get("grade")) and not m.get("solution")


def must_restore(cell: NotebookNode) -> bool:
    """Cells whose absence would change the grade: tests and read-only code (imports, helpers)."""
    m = nbgrader_meta(cell)
    return (
        bool(m.get("grade_id"))
        and not m.get("solution")
        and (is_test(cell) or (m.get("locked") and cell.cell_type == "code"))
    )


def graded_cells(nb: NotebookNode) -> list[tuple[str, float]]:
    """``(grade_id, points)`` of every graded cell, in order."""
    return [(grade_id(c), float(nbgrader_meta(c).get("points", 0))) for c in nb.cells if nbgrader_meta(c).get("grade")]


def _kind(cell: NotebookNode) -> str:
    return "test cell" if is_test(cell) else "read-only cell"


def restore(
    student: NotebookNode, source: NotebookNode, release: NotebookNode | None = None
) -> tuple[NotebookNode, list[str]]:
    """``student`` with the assignment's missing cells put back, and a sentence per change.

    ``source`` is the solutions notebook (full metadata); ``release`` the exercise notebook students received,
    used to tell an edited test cell from one that only lacks its hidden tests.
    """
    nb = copy.deepcopy(student)
    events: list[str] = []
    _give_ids(nb)
    src_ids = [grade_id(c) for c in source.cells if grade_id(c)]
    src_by_id = {grade_id(c): c for c in source.cells if grade_id(c)}
    rel_by_id = {grade_id(c): c for c in (release.cells if release else []) if grade_id(c)}

    # claims to grade ids the assignment does not have
    for i, cell in enumerate(nb.cells):
        gid = grade_id(cell)
        if gid is not None and gid not in src_by_id:
            del cell.metadata["nbgrader"]
            events.append(
                f"cell {i + 1} claimed the grade id {gid!r}, which this assignment does not have; "
                "it was run as an ordinary cell"
            )

    present = {}
    for i, cell in enumerate(nb.cells):
        gid = grade_id(cell)
        if gid is not None and gid not in present:
            present[gid] = i

    # tests that lost their metadata but are still there verbatim
    for gid in src_ids:
        src = src_by_id[gid]
        if gid in present or not must_restore(src):
            continue
        texts = {src.source.strip(), rel_by_id[gid].source.strip() if gid in rel_by_id else None}
        for i, cell in enumerate(nb.cells):
            if not nbgrader_meta(cell) and cell.cell_type == src.cell_type and cell.source.strip() in texts:
                cell.metadata["nbgrader"] = copy.deepcopy(nbgrader_meta(src))
                present[gid] = i
                events.append(f"the {_kind(src)} {gid!r} had lost its grading metadata; it was recognised and graded")
                break

    # edits to the tests that are there (nbgrader puts the originals back)
    for gid, i in present.items():
        cell, src = nb.cells[i], src_by_id[gid]
        if not is_test(src):
            continue
        if cell.cell_type != src.cell_type:
            events.append(f"the test cell {gid!r} was changed into a {cell.cell_type} cell; the original was used")
        elif cell.source.strip() not in {src.source.strip(), rel_by_id.get(gid, src).source.strip()}:
            events.append(f"the test cell {gid!r} was edited; the original test was used")
        points, orig = nbgrader_meta(cell).get("points"), nbgrader_meta(src).get("points")
        if points is not None and orig is not None and float(points) != float(orig):
            events.append(f"the points of {gid!r} were changed to {points}; the assignment's {orig} were used")

    # missing cells, in the assignment's order, each after the nearest earlier cell still there
    for k, gid in enumerate(src_ids):
        src = src_by_id[gid]
        if gid in present or not must_restore(src):
            continue
        new = copy.deepcopy(src)
        new["id"] = uuid.uuid4().hex[:8]
        if new.cell_type == "code":
            new.outputs, new.execution_count = [], None
        before = [present[g] for g in reversed(src_ids[:k]) if g in present]
        after = [present[g] for g in src_ids[k + 1 :] if g in present]
        at = before[0] + 1 if before else (after[0] if after else len(nb.cells))
        nb.cells.insert(at, new)
        present = {g: (i + 1 if i >= at else i) for g, i in present.items()}
        present[gid] = at
        events.append(f"the {_kind(src)} {gid!r} was missing; it was restored from the assignment")
    _validate(nb)
    return nb, events


def _validate(nb: NotebookNode) -> None:
    """Validate, clearing outputs (nbgrader clears them anyway) if that is what makes the notebook invalid."""
    try:
        nbformat.validate(nb)
        return
    except nbformat.ValidationError:
        pass
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        for key in [
            k
            for k in cell
            if k not in ("id", "cell_type", "source", "metadata", "outputs", "execution_count", "attachments")
        ]:
            del cell[key]
    try:
        nbformat.validate(nb)
    except nbformat.ValidationError as e:
        raise SubmissionError(f"not a valid notebook: {e.message}") from None


def _give_ids(nb: NotebookNode) -> None:
    """Upgrade to nbformat 4.5 (cell ids), which inserted cells need; Colab saves 4.0 without ids."""
    nb.nbformat, nb.nbformat_minor = 4, max(nb.get("nbformat_minor", 0), 5)
    seen = set()
    for cell in nb.cells:
        cid = cell.get("id")
        if not isinstance(cid, str) or not _ID.fullmatch(cid) or cid in seen:
            cid = uuid.uuid4().hex[:8]
            cell["id"] = cid
        seen.add(cid)
