"""nbgrader settings for the course (read by every `nbgrader ...` command run from the repository root).

Assignments are the week folders: nbgrader's source notebooks are solutions/weekNN/*.ipynb (answers, graded
test cells, hidden tests) and its release folder is exercises/weekNN/ (answers stripped, hidden tests removed):

    nbgrader generate_assignment week00 --force      # what `make exercises` runs, for every week

`make exercises` (tools/generate_exercises.py) is the usual way: it runs the same step in a scratch folder so the
output is identical on every machine. The gradebook lives outside the repository, in the course's cache folder
(COURSE_CACHE, default ~/.cache/agora-course), so no run ever leaves a database in the working tree.
"""

import os
from pathlib import Path

c = get_config()  # noqa: F821 - provided by nbgrader when it loads this file

ROOT = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("COURSE_CACHE") or Path.home() / ".cache" / "agora-course")

c.CourseDirectory.course_id = "align-course"
c.CourseDirectory.root = str(ROOT)
c.CourseDirectory.source_directory = "solutions"
c.CourseDirectory.release_directory = "exercises"

(CACHE / "nbgrader").mkdir(parents=True, exist_ok=True)
c.CourseDirectory.db_url = f"sqlite:///{CACHE / 'nbgrader' / 'gradebook.db'}"

# Notebook files copied along with each assignment leave these out.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", ".*"]
