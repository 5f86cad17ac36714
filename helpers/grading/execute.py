"""nbgrader's Execute preprocessor, made to survive hostile notebooks and to say what happened.

nbgrader executes a submission with nbclient and, when anything goes wrong beyond a cell raising an error,
fails the whole notebook: no grade at all. :class:`SandboxedExecute` changes four things:

- the kernel starts inside the submission's sandbox (:class:`~helpers.grading.sandbox.SandboxedKernelManager`);
- a dead kernel (``os._exit``, a crash, a resource limit) ends the run at that cell: the cell gets an error
  output saying so, every later code cell gets a "not run" error, and the cells before it keep their grades;
- besides nbgrader's per-cell timeout (the cell is interrupted and gets a ``CellTimeoutError``), a whole-notebook
  time budget: once used up, the remaining cells are not run;
- each cell's output is capped (``max_output_bytes``): the rest is dropped with a note, so a submission that
  prints gigabytes cannot exhaust the grader's memory.

What happened is written, one sentence per event, to ``report_path`` (JSON) for the feedback page.
"""

from __future__ import annotations

import json
import time

from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat.notebooknode import NotebookNode
from nbgrader.preprocessors import Execute
from traitlets import Dict, Integer, Unicode

from .sandbox import SandboxedKernelManager

MIB = 1024**2

KERNEL_DIED = (
    "the kernel died while running this cell: the code ended the Python process (os._exit, a signal), "
    "crashed it, or ran past a resource limit (CPU time, memory, file size)"
)


OUTPUT_LOST = "\n[course-grade: this cell's output was too large to receive and was dropped]\n"


def error_output(ename: str, evalue: str) -> NotebookNode:
    """An error output, as nbgrader counts it: the cell scores 0."""
    return NotebookNode(output_type="error", ename=ename, evalue=evalue, traceback=[f"{ename}: {evalue}"])


def cell_label(cell: NotebookNode, index: int) -> str:
    grade_id = cell.metadata.get("nbgrader", {}).get("grade_id")
    return f"cell {index + 1} ({grade_id})" if grade_id else f"cell {index + 1}"


class SandboxedExecute(Execute):
    """Execute a submission in its sandbox, within a time budget, reporting deaths, timeouts and floods."""

    sandbox = Dict(help="Sandbox.to_dict() for this submission").tag(config=True)
    notebook_timeout = Integer(600, help="Seconds for the whole notebook; later cells are not run").tag(config=True)
    max_output_bytes = Integer(16 * MIB, help="Output kept per cell; the rest is dropped").tag(config=True)
    report_path = Unicode("", help="JSON file the events are written to").tag(config=True)

    def create_kernel_manager(self):
        self.km = SandboxedKernelManager(kernel_name="python3", config=self.config, sandbox=self.sandbox)
        return self.km

    def preprocess(self, nb, resources=None, km=None):
        self._cell_timeout = self.timeout
        self._deadline = time.monotonic() + self.notebook_timeout
        self._stopped: str | None = None  # why the remaining cells are not run
        self._events: list[dict] = []
        try:
            return super().preprocess(nb, resources, km)
        finally:
            self.timeout = self._cell_timeout
            if self.report_path:
                with open(self.report_path, "w") as f:
                    json.dump(self._events, f, indent=1)

    def _event(self, kind: str, index: int, cell: NotebookNode, text: str) -> None:
        self._events.append(
            {
                "kind": kind,
                "cell": index,
                "grade_id": cell.metadata.get("nbgrader", {}).get("grade_id"),
                "message": f"{cell_label(cell, index)}: {text}",
            }
        )

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type != "code" or not cell.source.strip():
            return cell, resources
        if self._stopped:
            cell.outputs = [error_output("NotRun", self._stopped)]
            return cell, resources
        remaining = self._deadline - time.monotonic()
        if remaining < 1:
            self._stopped = f"not run: the notebook used up its time budget of {self.notebook_timeout} s"
            self._event(
                "timeout",
                index,
                cell,
                f"the notebook's time budget ({self.notebook_timeout} s) ran out here; "
                "this and later cells were not run",
            )
            cell.outputs = [error_output("NotRun", self._stopped)]
            return cell, resources
        self.timeout = max(1, int(min(self._cell_timeout or remaining, remaining)))
        self._output_bytes = 0
        self._output_capped = self._stderr_kept = False
        try:
            cell, resources = super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self._stopped = f"not run: the kernel died in {cell_label(cell, index)}"
            cell.outputs = list(cell.get("outputs", [])) + [error_output("KernelDied", KERNEL_DIED)]
            self._event("died", index, cell, KERNEL_DIED)
            return cell, resources
        except CellTimeoutError:
            # The reply came but the output did not: a single message over the client's size limit was dropped
            # (LimitedIOPubClient), which also drops the connection. Reconnect, so that later cells are graded.
            # A test whose output was lost cannot be checked (its error may have been in it): it scores 0.
            self._reconnect_iopub()
            lost = (
                error_output("OutputError", OUTPUT_LOST.strip() + "; a test whose output is lost scores 0")
                if cell.metadata.get("nbgrader", {}).get("grade")
                else NotebookNode(output_type="stream", name="stdout", text=OUTPUT_LOST)
            )
            cell.outputs = list(cell.get("outputs", [])) + [lost]
            self._event("output", index, cell, "its output was too large to receive and was dropped")
            return cell, resources
        if any(o.get("ename") == "CellTimeoutError" for o in cell.outputs if o.output_type == "error"):
            self._event("timeout", index, cell, f"ran longer than {self.timeout} s and was interrupted")
        if self._output_capped:
            self._event(
                "output", index, cell, f"printed more than {self.max_output_bytes // MIB} MiB; the rest was dropped"
            )
        return cell, resources

    def _reconnect_iopub(self) -> None:
        try:
            self.kc.iopub_channel.close()
        except Exception:  # already broken
            pass
        self.kc._iopub_channel = None
        self.kc.iopub_channel.start()  # the property connects a fresh socket
        time.sleep(0.5)  # let the new subscription reach the kernel before the next cell

    def output(self, outs, msg, display_id, cell_index):
        content = msg.get("content", {})
        size = len(content.get("text", "")) + sum(len(str(v)) for v in content.get("data", {}).values())
        size += sum(len(line) for line in content.get("traceback", []))
        self._output_bytes += size
        if self._output_bytes <= self.max_output_bytes or msg["msg_type"] == "error":
            return super().output(outs, msg, display_id, cell_index)
        # Past the cap: drop the output, but keep what nbgrader grades by: errors (above) and writes to stderr.
        if not self._output_capped:
            self._output_capped = True
            mib = self.max_output_bytes // MIB
            note = f"\n[course-grade: output truncated: this cell printed more than {mib} MiB]\n"
            outs.append(NotebookNode(output_type="stream", name="stdout", text=note))
        if msg["msg_type"] == "stream" and content.get("name") == "stderr" and not self._stderr_kept:
            self._stderr_kept = True
            outs.append(NotebookNode(output_type="stream", name="stderr", text=content.get("text", "")[:2000]))
        return None
