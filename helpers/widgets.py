"""Interactive tools for the notebooks: a pair-labelling widget (week 2), with an automatic fallback.

:class:`PairLabeller` shows a prompt and two replies with buttons ("A is better", "B is better", "skip"); each
click records a label and moves on. A notebook reads the labels in a *later* cell with :meth:`PairLabeller.records`,
which fills every pair you did not label with the Agora annotator's label, so the notebook always runs end to end:

- interactively (Jupyter, Colab), you label as many pairs as you like, then run the next cell;
- non-interactively (papermill, nbval under CI, nbgrader's autograder, a plain Python process), no one clicks:
  :func:`interactive` is False, no widget is drawn, and the annotator answers every pair.

Set ``COURSE_NONINTERACTIVE=1`` to force the annotator everywhere.
"""

from __future__ import annotations

import html
import os
import random
from dataclasses import dataclass, field
from typing import Sequence

from . import agora


def interactive() -> bool:
    """True when a person can click widgets: an IPython kernel, not under CI, nbgrader or ``COURSE_NONINTERACTIVE``."""
    for flag in ("CI", "NBGRADER_EXECUTION", "COURSE_NONINTERACTIVE", "PAPERMILL_EXECUTION"):
        if os.environ.get(flag, "").lower() not in ("", "0", "false"):
            return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return False
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class PairLabeller:
    """Label pairs of replies yourself; the Agora ``annotator`` answers the pairs you leave.

    ``records`` are ``{prompt, a, b}`` dicts (plus anything else, kept). ``labels[i]`` is ``"a"``, ``"b"``, ``"skip"``
    or ``None`` (not yet seen). Reply order is shuffled per pair by ``seed`` so position tells nothing.
    """

    pairs: Sequence[dict]
    annotator: agora.Annotator = field(default_factory=agora.Annotator)
    seed: int = 0
    labels: list = field(init=False)
    _view: object = field(default=None, init=False, repr=False)

    def __post_init__(self):
        for i, r in enumerate(self.pairs):
            for key in ("prompt", "a", "b"):
                if key not in r:
                    raise ValueError(f"pair {i}: {key!r} is missing (each pair needs 'prompt', 'a' and 'b')")
        self.labels = [None] * len(self.pairs)
        self._position = 0

    @classmethod
    def from_preferences(cls, records: Sequence[dict], annotator: agora.Annotator | None = None, seed: int = 0):
        """From ``prompt/chosen/rejected`` records: the label is hidden by showing the two replies in random order."""
        rng = random.Random(f"labeller-{seed}")
        pairs = []
        for r in records:
            a, b = (r["chosen"], r["rejected"]) if rng.random() < 0.5 else (r["rejected"], r["chosen"])
            pairs.append({**r, "a": a, "b": b})
        return cls(pairs, annotator or agora.Annotator(), seed)

    # ---------------------------------------------------------------------------- labelling

    def label(self, i: int, choice: str) -> None:
        """Record ``choice`` (``"a"``, ``"b"`` or ``"skip"``) for pair ``i`` (what the buttons call)."""
        if choice not in ("a", "b", "skip"):
            raise ValueError(f"a label is 'a', 'b' or 'skip', got {choice!r}")
        self.labels[i] = choice

    @property
    def n_labelled(self) -> int:
        """How many pairs you labelled (skips not counted)."""
        return sum(lab in ("a", "b") for lab in self.labels)

    def records(self) -> list[dict]:
        """Every pair as ``prompt/chosen/rejected``, with ``labeller``: ``"you"`` or ``"annotator"``.

        Pairs you did not label (or skipped) get the annotator's label, drawn with a fixed seed per pair.
        """
        out = []
        for i, (r, lab) in enumerate(zip(self.pairs, self.labels)):
            who = "you"
            if lab not in ("a", "b"):
                rng = random.Random(f"labeller-{self.seed}-{i}")
                lab = "a" if self.annotator.prefers(r["prompt"], r["a"], r["b"], rng) else "b"
                who = "annotator"
            chosen, rejected = (r["a"], r["b"]) if lab == "a" else (r["b"], r["a"])
            rest = {k: v for k, v in r.items() if k not in ("a", "b", "chosen", "rejected")}
            out.append({**rest, "chosen": chosen, "rejected": rejected, "labeller": who})
        return out

    def summary(self) -> str:
        n = len(self.pairs)
        return (f"{self.n_labelled} of {n} pairs labelled by you; the Agora annotator labels the other "
                f"{n - self.n_labelled}.")

    # -------------------------------------------------------------------------------- widget

    def show(self):
        """Draw the labelling tool (interactive sessions), or say that the annotator will answer (otherwise)."""
        if not interactive():
            print(f"No one to click here (non-interactive run): the Agora annotator labels all {len(self.pairs)} "
                  "pairs.")
            return None
        from IPython.display import display

        self._view = self._build()
        display(self._view)
        return self._view

    def _build(self):
        import ipywidgets as w

        header = w.HTML()
        body = w.HTML()
        status = w.HTML()
        buttons = {
            "a": w.Button(description="A is better", button_style="success", icon="arrow-left"),
            "b": w.Button(description="B is better", button_style="success", icon="arrow-right"),
            "skip": w.Button(description="skip", button_style=""),
        }
        back = w.Button(description="back", button_style="")

        def render():
            n = len(self.pairs)
            if self._position >= n:
                header.value = "<b>All pairs seen.</b> Run the next cell to use your labels."
                body.value = ""
                for b in buttons.values():
                    b.disabled = True
            else:
                r = self.pairs[self._position]
                question = html.escape(r["prompt"].removeprefix("User:").split("\nAssistant:")[0].strip())
                header.value = f"<b>Pair {self._position + 1} of {n}</b>: which reply is better?"
                body.value = (f"<p><b>User:</b> {question}</p>"
                              f"<table style='width:100%'><tr>"
                              f"<td style='width:50%;vertical-align:top;padding:6px;border:1px solid #ccc'>"
                              f"<b>A</b>: {html.escape(r['a'].strip())}</td>"
                              f"<td style='width:50%;vertical-align:top;padding:6px;border:1px solid #ccc'>"
                              f"<b>B</b>: {html.escape(r['b'].strip())}</td></tr></table>")
                for b in buttons.values():
                    b.disabled = False
            status.value = f"<i>{self.summary()}</i>"

        def on_click(choice):
            def handler(_):
                if self._position < len(self.pairs):
                    self.label(self._position, choice)
                    self._position += 1
                render()
            return handler

        def on_back(_):
            self._position = max(0, self._position - 1)
            render()

        for choice, b in buttons.items():
            b.on_click(on_click(choice))
        back.on_click(on_back)
        render()
        return w.VBox([header, body, w.HBox([buttons["a"], buttons["b"], buttons["skip"], back]), status])


def agreement(records: Sequence[dict], annotator: agora.Annotator) -> float:
    """Share of ``records`` whose chosen reply has the higher true utility for ``annotator`` (ties count 1/2)."""
    return agora.noise_ceiling(records, annotator)
