"""Instructor tools: collect students' notebooks, autograde them in a sandbox, report grades and feedback.

Built on nbgrader (its gradebook, ``autograde`` and ``generate_feedback``); this package adds only what nbgrader
lacks for this course:

=====================  =====================================================================================
module                 what it adds
=====================  =====================================================================================
:mod:`.collect`        LMS zips and folders -> ``submitted/``: who, which notebook (renamed), latest of many
:mod:`.restore`        deleted test cells and read-only cells put back before nbgrader runs
:mod:`.sandbox`        the kernel in bubblewrap (read-only system, private folder, no network) + rlimits
:mod:`.execute`        nbgrader's Execute surviving a dead kernel, a notebook time budget, output floods
:mod:`.runner`         the grading subprocess: nbgrader on one private course folder per submission
:mod:`.autograde`      a run: private work folder, resumable, results per submission, exit status
:mod:`.report`         ``grades.csv``, summary table, per-student feedback pages
:mod:`.layout`         where everything lives in the grading folder
:mod:`.cli`            the ``course-grade`` command
=====================  =====================================================================================

The instructor's guide is docs/instructors.md; the folder layout is in :mod:`.layout`. From Python:
``from helpers.grading.autograde import autograde, Options``, ``from helpers.grading.collect import collect``,
``from helpers.grading.report import write_report``.
"""
