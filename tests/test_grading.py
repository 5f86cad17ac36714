"""The instructor's grading tool, end to end: ``course-grade collect / autograde / report``.

One module-scoped batch builds, from the fixture assignment in ``tests/fixtures/grading/solutions/week00`` (3
exercises, 7 points, one hidden test, plain Python), a submission of every kind a course meets: correct, partial,
empty; a syntax error, an exception, an infinite loop, ``sys.exit``, ``os._exit``; a flood of output (many
messages, and one message too large to receive, also used to try to hide a failing test), a memory bomb, a huge
file, a loop that ignores interrupts (the notebook's time budget); deleted and edited test cells; attempts to write
outside its folder, to read another student's work and to open network connections; a Colab download renamed and
stripped of its metadata, a duplicate upload, a file that is not a notebook. They arrive as a folder and as an LMS
(Canvas-style) zip, are graded in ONE ``autograde`` run, and every case is then checked: the batch completed, the
submission got a grade and a feedback page saying what happened, no submission changed another's grade or the
grades file, the uploads and ``submitted/`` are byte-for-byte unchanged, and the correct submission scores the
points of the solutions.

Hostile submissions prove an attack failed through their grade where possible: the "reader" defines a
correct ``mean`` only if it manages to read another submission, so its score shows the attack did not work.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import nbformat
import pytest

from helpers.cache import cache_root
from helpers.grading import cli
from helpers.grading.collect import Upload, attribute, slug, strip_copy_marks
from helpers.grading.restore import SubmissionError, read_notebook, restore
from helpers.grading.sandbox import Limits, Sandbox, find_bwrap

REPO = Path(__file__).resolve().parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "grading" / "solutions"
WEEK = "week00"
CELL_TIMEOUT = 10
NOTEBOOK_TIMEOUT = 45

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_bubblewrap_is_available():
    """The sandbox tests need bubblewrap; CI installs it (apt-get install bubblewrap). Fail, never skip."""
    ok, why = find_bwrap()
    assert ok, f"{why}\nThe grading tests need a working bubblewrap: sudo apt-get install -y bubblewrap"


# ------------------------------------------------------------------------------------------ building blocks


def run_cli(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli.main([str(a) for a in args])
    return rc, out.getvalue()


def make_release(tmp: Path) -> nbformat.NotebookNode:
    """The exercise notebook students receive, made by nbgrader from the fixture's solutions."""
    course = tmp / "release-course"
    shutil.copytree(FIXTURE, course / "source")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    r = subprocess.run(
        [sys.executable, "-m", "helpers.grading.runner", "generate", str(course), WEEK],
        env=env,
        capture_output=True,
        text=True,
        cwd=course,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return nbformat.read(course / "release" / WEEK / f"{WEEK}.ipynb", as_version=4)


def gid(cell) -> str | None:
    return cell.metadata.get("nbgrader", {}).get("grade_id")


def solutions_points() -> float:
    nb = nbformat.read(FIXTURE / WEEK / f"{WEEK}.ipynb", as_version=4)
    return sum(c.metadata.nbgrader.get("points", 0) for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade"))


SOLUTIONS = {
    "mean": "def mean(xs):\n    return sum(xs) / len(xs)",
    "softmax": (
        "def softmax(xs):\n    m = max(xs)\n    e = [math.exp(x - m) for x in xs]\n    return [v / sum(e) for v in e]"
    ),
    "clip": "def clip(x, lo, hi):\n    return max(lo, min(x, hi))",
}
FLOOD = "for i in range(200):\n    print('x' * 100_000, flush=True)\n"  # 20 MB in 200 messages
ONE_HUGE_PRINT = "print('y' * (20 * 2**20))\n"  # one 20 MB message: over the 8 MiB a message may have here
HIDE_FAILURE = "def mean(xs):\n    print('y' * (20 * 2**20))\n    return 0\n"  # its test's error goes with it
MEMORY_BOMB = "def bomb():\n    hoard = []\n    while True:\n        hoard.append(bytearray(50 * 2**20))\nbomb()\n"
BIG_FILE = "with open('big.bin', 'wb') as f:\n    for _ in range(100):\n        f.write(bytes(2**20))\n"
STUBBORN_LOOP = (
    "import time\nwhile True:\n    try:\n        time.sleep(0.1)\n    except KeyboardInterrupt:\n        pass\n"
)
NAIVE_SOFTMAX = "def softmax(xs):\n    e = [math.exp(x) for x in xs]\n    return [v / sum(e) for v in e]"


def answer(release, answers: dict[str, str], *, extra_first: str | None = None):
    """The release with solution cells replaced by ``answers`` (unanswered ones stay as released)."""
    nb = copy.deepcopy(release)
    for cell in nb.cells:
        if gid(cell) in answers:
            cell.source = answers[gid(cell)]
    if extra_first:
        nb.cells.insert(3, nbformat.v4.new_code_cell(extra_first, id="hostile"))
    return nb


def colab_download(nb) -> bytes:
    """What Colab's File > Download .ipynb gives: nbformat 4.0, no cell ids, Colab metadata, no nbgrader metadata."""
    d = json.loads(nbformat.writes(nb))
    d["nbformat_minor"] = 0
    d["metadata"] = {
        "colab": {"provenance": [], "name": "Copy of week00.ipynb"},
        "kernelspec": {"name": "python3", "display_name": "Python 3"},
        "language_info": {"name": "python"},
        "accelerator": "GPU",
    }
    for i, cell in enumerate(d["cells"]):
        cell.pop("id", None)
        cell["metadata"] = {"id": f"Xq{i}Colab"}
        if cell["cell_type"] == "code":
            cell["metadata"]["colab"] = {"base_uri": "https://localhost:8080/"}
            cell["metadata"]["outputId"] = f"out{i}"
    return json.dumps(d, indent=2).encode()


def reader_code(grading: Path, uploads: Path, work: Path) -> str:
    targets = [
        grading / "submitted" / "correct" / WEEK / f"{WEEK}.ipynb",
        uploads / "correct" / f"{WEEK}.ipynb",
        FIXTURE / WEEK / f"{WEEK}.ipynb",
    ]
    return f'''import glob, json, os
def mean(xs):
    return 0
paths = {[str(t) for t in targets]!r} + ["../../correct/{WEEK}/{WEEK}.ipynb"]
paths += glob.glob("{work}/cg-*/s*/course/submitted/*/{WEEK}/{WEEK}.ipynb")
paths += glob.glob("/tmp/**/correct/**/*.ipynb", recursive=True)
for p in paths:
    try:
        cells = json.load(open(p))["cells"]
    except Exception as e:
        print("ATTACK read", p, "BLOCKED", type(e).__name__)
        continue
    for c in cells:
        src = "".join(c["source"])
        if src.startswith("def mean") and "return sum(xs)" in src:
            exec(src)
            print("ATTACK read", p, "SUCCEEDED")
for d in {[str(REPO / ".git"), str(cache_root() / "nbgrader")]!r}:
    try:
        found = os.listdir(d)
    except OSError as e:
        found = []
    print("ATTACK list", d, "SUCCEEDED" if found else "BLOCKED (nothing there)")
'''


def writer_code(grading: Path, uploads: Path, escape: Path) -> str:
    targets = [
        grading / "grades.csv",
        grading / "submitted" / "correct" / WEEK / f"{WEEK}.ipynb",
        grading / "results" / WEEK / "correct.json",
        uploads / "correct" / f"{WEEK}.ipynb",
    ]
    return f'''import os
# /tmp is the sandbox's own: this write succeeds there and must not reach the host's /tmp
open({str(escape)!r}, "w").write("private")
for t in {[str(t) for t in targets]!r}:
    try:
        with open(t, "a") as f:
            f.write("HACKED")
        print("ATTACK write", t, "SUCCEEDED")
    except Exception as e:
        print("ATTACK write", t, "BLOCKED", type(e).__name__)
    try:
        os.remove(t)
        print("ATTACK delete", t, "SUCCEEDED")
    except Exception as e:
        print("ATTACK delete", t, "BLOCKED", type(e).__name__)
# links in its own folder, for nbgrader to write through afterwards
links = [("{WEEK}.ipynb", {str(grading / "grades.csv")!r}),
         ("timestamp.txt", {str(grading / "submitted" / "correct" / WEEK / f"{WEEK}.ipynb")!r})]
for name, target in links:
    try:
        if os.path.lexists(name):
            os.remove(name)
        os.symlink(target, name)
    except Exception as e:
        print("link", name, type(e).__name__)
'''


def network_code(port: int, host_ip: str) -> str:
    return f"""import socket
def mean(xs):
    return 0
for host, port in [("127.0.0.1", {port}), ({host_ip!r}, {port}), ("1.1.1.1", 53)]:
    try:
        socket.create_connection((host, port), timeout=2).close()
        print("ATTACK connect", host, "SUCCEEDED")
        def mean(xs):
            return sum(xs) / len(xs)
    except OSError as e:
        print("ATTACK connect", host, "BLOCKED", type(e).__name__)
try:
    socket.getaddrinfo("example.com", 80)
    print("ATTACK dns SUCCEEDED")
except OSError as e:
    print("ATTACK dns BLOCKED", type(e).__name__)
"""


class Listener:
    """A TCP server on the host that counts the connections it receives (there must be none)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen()
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
                self.connections += 1
                conn.close()
            except OSError:
                pass

    def close(self):
        self.stop = True
        self.thread.join()
        self.sock.close()


def host_ip() -> str:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("10.255.255.255", 1))
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


def tree_hashes(*roots: Path) -> dict[str, str]:
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -------------------------------------------------------------------------------------------------- batch

# student -> (expected points, expected status, phrase its feedback page must contain)
EXPECTED = {
    "correct": (7, "ok", "every check passed"),
    "partial": (4, "ok", "softmax overflows for large inputs"),
    "empty": (0, "ok", "NotImplementedError"),
    "syntax-error": (5, "ok", "cell 5 (mean) raised <code>SyntaxError"),
    "exception": (4, "ok", "NameError: name &#x27;softmax&#x27; is not defined"),
    "infinite-loop": (5, "timeout", f"ran longer than {CELL_TIMEOUT} s and was interrupted"),
    "sys-exit": (5, "ok", "SystemExit"),
    "os-exit": (2, "died", "the kernel died"),
    "huge-output": (7, "ok", "too large to receive and was dropped"),
    "flood-hides-failure": (5, "ok", "a test whose output is lost scores 0"),
    "memory-bomb": (5, "ok", "MemoryError"),
    "big-file": (5, "ok", "File too large"),
    "stubborn-loop": (0, "timeout", f"time budget ({NOTEBOOK_TIMEOUT} s) ran out"),
    "deleted-tests": (7, "ok", "was missing; it was restored from the assignment"),
    "edited-tests": (5, "ok", "was edited; the original test was used"),
    "writer": (7, "ok", "ATTACK write"),
    "reader": (5, "ok", "ATTACK read"),
    "network": (5, "ok", "ATTACK connect"),
    "colab": (7, "ok", "had lost its grading metadata"),
    "dupe": (7, "ok", "2 uploads of week00"),
    "not-a-notebook": (0, "error", "not a notebook"),
}


@pytest.fixture(scope="module")
def batch():
    # Outside /tmp (which every sandbox replaces by its own), as an instructor's ~/grading would be, so that
    # what hides the grading folder, the uploads and the work folder from the kernel is what is tested.
    tmp = Path(
        tempfile.mkdtemp(prefix="course-grade-test-", dir="/var/tmp" if os.access("/var/tmp", os.W_OK) else None)
    )
    assert not str(tmp).startswith("/tmp/"), "the batch must live outside /tmp to test hiding"
    grading, uploads, lms, work = tmp / "grading", tmp / "uploads", tmp / "lms.zip", tmp / "work"
    work.mkdir()
    escape = Path("/tmp") / f"course-grade-escape-{os.getpid()}"
    release = make_release(tmp)
    listener = Listener()
    good = dict(SOLUTIONS)

    folder_subs = {
        "correct": answer(release, good),
        "partial": answer(release, dict(good, softmax=NAIVE_SOFTMAX)),
        "empty": answer(release, {}),
        "syntax-error": answer(release, dict(good, mean="def mean(xs)\n    return sum(xs) / len(xs)")),
        "exception": answer(release, dict(good, softmax='raise RuntimeError("boom")\n' + good["softmax"])),
        "infinite-loop": answer(release, dict(good, clip="while True:\n    pass\n" + good["clip"])),
        "sys-exit": answer(release, dict(good, mean="import sys\nsys.exit(3)\n" + good["mean"])),
        "os-exit": answer(release, dict(good, softmax="import os\nos._exit(1)\n" + good["softmax"])),
        "huge-output": answer(release, dict(good, mean=FLOOD + good["mean"], softmax=ONE_HUGE_PRINT + good["softmax"])),
        "flood-hides-failure": answer(release, dict(good, mean=HIDE_FAILURE)),
        "memory-bomb": answer(release, dict(good, mean=MEMORY_BOMB + good["mean"])),
        "big-file": answer(release, dict(good, mean=BIG_FILE + good["mean"])),
        "stubborn-loop": answer(release, dict(good, mean=STUBBORN_LOOP)),
        "writer": answer(release, good, extra_first=writer_code(grading, uploads, escape)),
        "reader": answer(release, dict(good, mean=reader_code(grading, uploads, work))),
        "network": answer(release, dict(good, mean=network_code(listener.port, host_ip()))),
    }
    deleted = answer(release, good)
    deleted.cells = [c for c in deleted.cells if gid(c) not in ("test_softmax", "test_clip", "setup")]
    folder_subs["deleted-tests"] = deleted
    edited = answer(release, dict(good, mean="def mean(xs):\n    return 0"))
    for cell in edited.cells:
        if gid(cell) == "test_mean":
            cell.source = "pass  # all good"
            cell.metadata.nbgrader["points"] = 100
    folder_subs["edited-tests"] = edited
    for student, nb in folder_subs.items():
        (uploads / student).mkdir(parents=True)
        nbformat.write(nb, uploads / student / f"{WEEK}.ipynb")

    # the LMS zip (Canvas names): a renamed Colab download, a duplicate upload, a file that is not a notebook
    with zipfile.ZipFile(lms, "w") as z:
        z.writestr(
            zipfile.ZipInfo("colab_1001_2001_Copy of week00.ipynb", (2024, 5, 1, 9, 0, 0)),
            colab_download(answer(release, good)),
        )
        z.writestr(
            zipfile.ZipInfo("dupe_1002_2002_week00.ipynb", (2024, 5, 1, 9, 0, 0)), nbformat.writes(answer(release, {}))
        )
        z.writestr(
            zipfile.ZipInfo("dupe_1002_2003_week00-1.ipynb", (2024, 5, 2, 9, 0, 0)),
            nbformat.writes(answer(release, good)),
        )
        z.writestr(
            zipfile.ZipInfo("not-a-notebook_1003_2004_week00.ipynb", (2024, 5, 1, 9, 0, 0)),
            b"\x89PNG this is an image, renamed",
        )
        z.writestr("readme.txt", "instructions")

    uploads_before = tree_hashes(uploads, lms)
    rc_collect, out_collect = run_cli("collect", WEEK, uploads, lms, "--to", grading, "--source", FIXTURE)
    submitted_before = tree_hashes(grading / "submitted")
    (grading / "grades.csv").write_text("student,week,exercise,points,max_points\nsentinel,week00,x,1,1\n")
    sentinel_before = tree_hashes(grading / "grades.csv")

    started = time.monotonic()
    rc, out = run_cli(
        "autograde",
        WEEK,
        "--dir",
        grading,
        "--source",
        FIXTURE,
        "--cell-timeout",
        CELL_TIMEOUT,
        "--notebook-timeout",
        NOTEBOOK_TIMEOUT,
        "--memory",
        "1G",
        "--cpu-time",
        60,
        "--max-file",
        "64M",
        "--max-output",
        2,
        "--jobs",
        2,
        "--sandbox",
        "require",
        "--work-dir",
        work,
    )
    seconds = time.monotonic() - started
    sentinel_after = tree_hashes(grading / "grades.csv")
    listener.close()
    results = {p.stem: json.loads(p.read_text()) for p in (grading / "results" / WEEK).glob("*.json")}
    yield dict(
        tmp=tmp,
        grading=grading,
        uploads=uploads,
        lms=lms,
        escape=escape,
        rc=rc,
        out=out,
        seconds=seconds,
        rc_collect=rc_collect,
        out_collect=out_collect,
        uploads_before=uploads_before,
        submitted_before=submitted_before,
        sentinel_before=sentinel_before,
        sentinel_after=sentinel_after,
        listener=listener,
        results=results,
    )
    escape.unlink(missing_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)


def feedback_page(batch, student) -> str:
    return (batch["grading"] / "feedback" / student / WEEK / f"{WEEK}.html").read_text()


def autograded_text(batch, student) -> str:
    return (batch["grading"] / "autograded" / student / WEEK / f"{WEEK}.ipynb").read_text()


def printed(batch, student) -> str:
    """Everything the submission's cells printed."""
    nb = nbformat.read(batch["grading"] / "autograded" / student / WEEK / f"{WEEK}.ipynb", as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_collect_reports_renames_duplicates_and_skips(batch):
    out = batch["out_collect"]
    assert batch["rc_collect"] == 0, out
    assert f"{len(EXPECTED)} student(s)" in out
    assert "1 duplicate upload(s) ignored" in out
    assert "dupe_1002_2002_week00.ipynb" in out and "graded the latest" in out
    assert "'colab_1001_2001_Copy of week00.ipynb' was graded as week00.ipynb" in out
    assert "skipped lms.zip/readme.txt: not a notebook" in out


def test_batch_completes_and_every_submission_is_graded(batch):
    print(batch["out"])
    assert set(batch["results"]) == set(EXPECTED), batch["out"]
    assert batch["rc"] == 1, "failed submissions (timeout, died, error) must make the exit code 1"
    for student in EXPECTED:
        assert f"{student}: " in batch["out"]


@pytest.mark.parametrize("student", sorted(EXPECTED))
def test_each_case_gets_its_grade_and_a_feedback_page_saying_what_happened(batch, student):
    points, status, phrase = EXPECTED[student]
    r = batch["results"][student]
    assert (r["points"], r["status"]) == (points, status), json.dumps(r, indent=1)
    assert r["max_points"] == solutions_points()
    page = feedback_page(batch, student)
    assert "course-grade-summary" in page
    assert phrase in page, f"{student}: the feedback page should say {phrase!r}"
    assert f"{points:g} / 7 points" in page


def test_correct_submission_scores_the_solutions_points(batch):
    r = batch["results"]["correct"]
    assert r["points"] == solutions_points() == 7
    assert all(c["status"] == "passed" for c in r["cells"])
    print(
        f"\ntime to grade one submission of the fixture week: {r['seconds']:.1f} s "
        f"(whole batch of {len(EXPECTED)} with 2 jobs: {batch['seconds']:.0f} s)"
    )


def test_hidden_tests_are_restored_and_not_shown(batch):
    r = batch["results"]["partial"]
    softmax = next(c for c in r["cells"] if c["exercise"] == "test_softmax")
    assert softmax["points"] == 0 and "subtract max(xs)" in softmax["message"]
    assert "BEGIN HIDDEN TESTS" not in feedback_page(batch, "partial")
    assert "BEGIN HIDDEN TESTS" in autograded_text(batch, "partial")


def test_deleted_and_edited_test_cells(batch):
    events = " ".join(e["message"] for e in batch["results"]["deleted-tests"]["events"])
    assert (
        "'test_softmax' was missing" in events
        and "'test_clip' was missing" in events
        and "'setup' was missing" in events
    )
    r = batch["results"]["edited-tests"]
    mean = next(c for c in r["cells"] if c["exercise"] == "test_mean")
    assert (mean["points"], mean["max_points"]) == (0, 2)
    assert "mean([1, 2, 3]) should be 2" in mean["message"]
    assert any("points of 'test_mean' were changed to 100" in e["message"] for e in r["events"])


def test_dead_kernel_keeps_earlier_grades_and_says_so(batch):
    r = batch["results"]["os-exit"]
    by = {c["exercise"]: c for c in r["cells"]}
    assert by["test_mean"]["status"] == "passed"
    assert by["test_softmax"]["status"] == by["test_clip"]["status"] == "not run"
    assert "kernel died in cell" in r["summary"]


def test_output_flood_is_capped(batch):
    nb = batch["grading"] / "autograded" / "huge-output" / WEEK / f"{WEEK}.ipynb"
    assert nb.stat().st_size < 5 * 2**20
    events = " ".join(e["message"] for e in batch["results"]["huge-output"]["events"])
    assert "printed more than 2 MiB; the rest was dropped" in events  # many messages: capped
    assert "too large to receive and was dropped" in events  # one message over the limit: dropped, reconnected
    cells = {c["exercise"]: c for c in batch["results"]["flood-hides-failure"]["cells"]}
    assert cells["test_mean"]["points"] == 0 and "output is lost" in cells["test_mean"]["message"]
    assert cells["test_clip"]["status"] == "passed"


def test_no_submission_escapes_its_sandbox(batch):
    for student in ("writer", "reader", "network"):
        text = printed(batch, student)
        print(f"--- {student}\n" + "\n".join(line for line in text.splitlines() if "ATTACK" in line))
        assert "ATTACK" in text and "BLOCKED" in text, student
        assert "SUCCEEDED" not in text, f"{student}: an attack succeeded:\n{text}"
    assert batch["listener"].connections == 0, "a submission reached the host's network"
    assert not batch["escape"].exists(), "a submission wrote into the host's /tmp"
    assert batch["sentinel_after"] == batch["sentinel_before"], "the grades file was changed during grading"


def test_originals_are_byte_for_byte_unchanged(batch):
    assert tree_hashes(batch["uploads"], batch["lms"]) == batch["uploads_before"]
    assert tree_hashes(batch["grading"] / "submitted") == batch["submitted_before"]


def test_report_writes_grades_csv_summary_and_student_pages(batch):
    grading = batch["grading"]
    rc, out = run_cli("report", "--dir", grading)
    assert rc == 0, out
    rows = [line.split(",") for line in (grading / "grades.csv").read_text().strip().splitlines()]
    assert rows[0] == ["student", "week", "exercise", "points", "max_points"]
    totals = {}
    for student, week, exercise, points, _max_points in rows[1:]:
        assert week == WEEK and exercise in ("test_mean", "test_softmax", "test_clip")
        totals[student] = totals.get(student, 0) + float(points)
    assert totals == {s: e[0] for s, e in EXPECTED.items()}
    assert "sentinel" not in (grading / "grades.csv").read_text()
    summary = (grading / "summary.html").read_text()
    assert "os-exit" in summary and "(died)" in summary
    page = (grading / "feedback" / "partial" / "index.html").read_text()
    assert "softmax overflows for large inputs" in page and "week00/week00.html" in page
    assert "os-exit" in out and "died" in out


def test_second_run_resumes_and_force_regrades(batch):
    grading = batch["grading"]
    before = tree_hashes(grading / "results")
    rc, out = run_cli("autograde", WEEK, "--dir", grading, "--source", FIXTURE)
    assert rc == 1, out  # the failed submissions still count
    assert out.count("already graded") == len(EXPECTED), out
    assert tree_hashes(grading / "results") == before
    rc, out = run_cli(
        "autograde",
        WEEK,
        "--dir",
        grading,
        "--source",
        FIXTURE,
        "--student",
        "correct",
        "--force",
        "--sandbox",
        "require",
    )
    assert rc == 0, out
    assert "correct: 7/7 ok" in out


def test_interrupted_run_records_nothing_half_done_and_resumes(tmp_path):
    """SIGTERM (or Ctrl-C) mid-batch: graders killed, finished results kept, the next run grades the rest."""
    for student in ("ann", "ben", "cat"):
        (tmp_path / "up" / student).mkdir(parents=True)
        shutil.copy(FIXTURE / WEEK / f"{WEEK}.ipynb", tmp_path / "up" / student / f"{WEEK}.ipynb")
    grading, work = tmp_path / "g", tmp_path / "work"
    assert run_cli("collect", WEEK, tmp_path / "up", "--to", grading, "--source", FIXTURE)[0] == 0
    cmd = [
        sys.executable,
        "-m",
        "helpers.grading",
        "autograde",
        WEEK,
        "--dir",
        str(grading),
        "--source",
        str(FIXTURE),
        "--no-check-solutions",
        "--work-dir",
        str(work),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    results = grading / "results" / WEEK
    deadline = time.monotonic() + 240
    while not (results.is_dir() and any(results.glob("*.json"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.terminate()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted; run it again to resume" in out, out
    done = {p.stem for p in results.glob("*.json")}
    assert 1 <= len(done) < 3, out
    assert list(work.iterdir()) == [], "the work folder is removed"
    rc, out = run_cli("autograde", WEEK, "--dir", grading, "--source", FIXTURE, "--no-check-solutions")
    assert rc == 0, out
    assert out.count("already graded") == len(done)
    assert {p.stem for p in results.glob("*.json")} == {"ann", "ben", "cat"}


def test_console_script_is_declared():
    from importlib import import_module

    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["course-grade"].partition(":")
    assert getattr(import_module(module), func) is cli.main


# ----------------------------------------------------------------------------------------------- small parts


def test_without_bubblewrap_it_says_so(tmp_path, monkeypatch):
    (tmp_path / "up" / "solo").mkdir(parents=True)
    shutil.copy(FIXTURE / WEEK / f"{WEEK}.ipynb", tmp_path / "up" / "solo" / f"{WEEK}.ipynb")
    grading = tmp_path / "g"
    assert run_cli("collect", WEEK, tmp_path / "up", "--to", grading, "--source", FIXTURE)[0] == 0
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "bwrap" else which(name, *a, **k))
    rc, out = run_cli("autograde", WEEK, "--dir", grading, "--source", FIXTURE, "--sandbox", "require")
    assert rc == 2 and "bubblewrap is not installed" in out and "apt-get install bubblewrap" in out
    rc, out = run_cli("autograde", WEEK, "--dir", grading, "--source", FIXTURE, "--no-check-solutions")
    assert rc == 0, out
    assert "submissions run WITHOUT a sandbox" in out
    result = json.loads((grading / "results" / WEEK / "solo.json").read_text())
    assert (result["points"], result["sandbox"]) == (7, "none")
    assert "sandbox: none" in (grading / "feedback" / "solo" / WEEK / f"{WEEK}.html").read_text()


def test_collect_says_when_a_zip_has_no_notebook(tmp_path):
    with zipfile.ZipFile(tmp_path / "submissions.zip", "w") as z:
        z.writestr("notes.txt", "hello")
    rc, out = run_cli("collect", WEEK, tmp_path / "submissions.zip", "--to", tmp_path / "g", "--source", FIXTURE)
    assert rc == 2
    assert "submissions.zip: no .ipynb inside" in out


def test_collect_refuses_a_notebook_it_cannot_attribute(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "week00.ipynb").write_text("{}")
    rc, out = run_cli("collect", WEEK, tmp_path / "in", "--to", tmp_path / "g", "--source", FIXTURE)
    assert rc == 1 and "NOT COLLECTED in/week00.ipynb: cannot tell whose it is" in out


@pytest.mark.parametrize(
    "rel, student, copy",
    [
        ("alice/Copy of week00.ipynb", "alice", 0),
        ("alice/week00 (2).ipynb", "alice", 2),
        ("Ana María Pérez_4242_assignsubmission_file_/week00.ipynb", "ana-maria-perez", 0),
        ("smithjane_12345_678901_week00-1.ipynb", "smithjane", 1),
        ("smithjane_LATE_12345_678902_week00.ipynb", "smithjane", 0),
        ("Week 0_jdoe_attempt_2024-05-01-10-00-00_week00.ipynb", "jdoe", 0),
        ("bob_week00.ipynb", "bob", 0),
        ("week00 - bob (1).ipynb", "bob", 1),
    ],
)
def test_collect_recognises_lms_names(rel, student, copy):
    from datetime import datetime

    up = Upload(rel, rel, b"", datetime(2024, 1, 1))
    assert attribute(up, ["week00"], "week00", None) is None
    assert (up.student, up.copy) == (student, copy)


def test_slug_and_copy_marks():
    assert slug("  O'Brien, Seán ") == "o-brien-sean"
    assert strip_copy_marks("Copy of week00 (3)") == ("week00", 3)


def test_restore_puts_missing_cells_back_in_place():
    source = nbformat.read(FIXTURE / WEEK / f"{WEEK}.ipynb", as_version=4)
    student = copy.deepcopy(source)
    student.cells = [c for c in student.cells if gid(c) not in ("test_mean", "mean")]
    fixed, events = restore(student, source)
    ids = [gid(c) for c in fixed.cells]
    assert ids.index("test_mean") == ids.index("setup") + 1  # the nearest earlier cell still there
    assert "mean" not in ids  # a deleted answer stays deleted
    assert events == ["the test cell 'test_mean' was missing; it was restored from the assignment"]


def test_restore_drops_claims_to_unknown_grade_ids():
    source = nbformat.read(FIXTURE / WEEK / f"{WEEK}.ipynb", as_version=4)
    student = copy.deepcopy(source)
    student.cells[5].metadata.nbgrader["grade_id"] = "free_points"
    fixed, events = restore(student, source)
    assert "free_points" not in [gid(c) for c in fixed.cells]
    assert any("free_points" in e for e in events)


def test_unreadable_notebooks_are_explained(tmp_path):
    (tmp_path / "a.ipynb").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "b.ipynb").write_text('{"cells": [')
    with pytest.raises(SubmissionError, match="a.ipynb: not a notebook"):
        read_notebook(str(tmp_path / "a.ipynb"))
    with pytest.raises(SubmissionError, match=r"b.ipynb: not a notebook \(invalid JSON at line 1"):
        read_notebook(str(tmp_path / "b.ipynb"))


def test_limits_without_prlimit(monkeypatch):
    """Where util-linux's prlimit is missing (macOS), a few lines of Python set the same limits."""
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    code = "import resource; print(resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(resource.RLIMIT_FSIZE))"
    cmd = Limits(memory_bytes=2**30, file_bytes=2**20).wrap([sys.executable, "-c", code])
    assert cmd[0] == sys.executable
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["(1073741824,", "1073741824)", "(1048576,", "1048576)"]


def test_sandbox_hides_then_exposes_from_the_outside_in(tmp_path):
    """Hide the folder holding the interpreter, keep the interpreter, hide a folder inside it again: it runs."""
    base = Path(sys.base_prefix).resolve()
    inner = next(p for p in (base / "include", base / "share", base / "bin") if p.is_dir())
    for d in ("p/tmp", "p/run", "p/rt", "c"):
        (tmp_path / d).mkdir(parents=True)
    box = Sandbox(
        private_dir=str(tmp_path / "p"),
        run_dir=str(tmp_path / "p" / "run"),
        runtime_dir=str(tmp_path / "p" / "rt"),
        hide=[str(base.parent), str(inner)],
        keep=[str(base), *map(str, {Path(sys.prefix), Path(sys.executable).parent.parent})],
    )
    code = (
        f"import os; print(repr((sorted(os.listdir({str(base.parent)!r})), os.listdir({str(inner)!r}), "
        "open('/proc/self/limits').read().count('unlimited') < 16, os.getcwd())))"
    )
    argv = box.wrap([sys.executable, "-c", code], cwd=str(tmp_path / "c"))
    assert argv.index("--tmpfs") < argv.index("--remount-ro") and "--unshare-all" in argv and "--clearenv" in argv
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    listed, inside, limited, cwd = eval(r.stdout)
    assert listed == [base.name] and inside == [] and limited and cwd == str(tmp_path / "c")
