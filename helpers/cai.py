"""Constitutional AI: critique -> revision, SL-CAI, AI feedback from log-probs, RL-CAI (taught in week 4).

Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback" (arXiv:2212.08073), in the Agora:

1. **A constitution is data**: :class:`Principle` (a critique request, a revision request and a comparison
   question), :data:`CONSTITUTION` (sixteen principles written for this course), saved and loaded as JSON,
   edited in :func:`constitution_editor`.
2. **Critique -> revision** (:func:`critique_revision_loop`): a model answers a harmful request, then, for N
   rounds, a principle is sampled, the model critiques its reply under it and rewrites the reply; every
   intermediate text is kept (:class:`Trajectory`). The prompts are :func:`critique_prompt` and
   :func:`revision_prompt`.
3. **SL-CAI**: supervised fine-tuning (:func:`finetune`) on the final revisions mixed with helpful data.
4. **RLAIF**: a feedback model reads :func:`comparison_prompt` (a conversation, a sampled principle, options
   (A) and (B)) and its log-probabilities of " (A)" and " (B)" (:func:`option_logprobs`) give a soft label
   ``P(A better) = softmax`` over the two (:func:`ai_preference_probs`), averaged over sampled principles
   (:func:`ai_labels`). A preference model is trained on these soft labels (:func:`soft_preference_loss`,
   :func:`train_preference_model`) and its score is the reward of RL-CAI (PPO from :mod:`helpers.rlhf`).
5. **Measured with the ground truth** (:func:`measure`): harm rate on held-out harmful prompts and helpfulness on
   benign prompts, with confidence intervals; agreement of AI labels with the ground truth (:func:`agreement`).

How this deviates from the paper, and why:

- **The tiny model learns the formats first.** The paper's 52B model follows critique and revision requests
  from a few-shot prompt. The course's 0.9M-parameter model cannot, so on the ``local`` preset
  :func:`build_cai_model` fine-tunes it on Agora text made for the purpose (:func:`cai_corpus`): replies,
  critiques that name the harm the ground truth sees, revisions, and multiple-choice comparisons answered by the
  ground truth. It also learns the constitution's words as whole tokens (:func:`extend_vocabulary`) and reads up
  to 256 positions. The loop itself then runs for real: sampled critiques, sampled revisions. On GPU presets
  an instruct hub model does the same with its chat template (:class:`ChatFormat`), zero-shot.
- **The starting assistant is helpful-only.** As in the paper, CAI starts from an assistant that helps with
  anything (:func:`load_helpful_only`: on ``local`` the base model fine-tuned on replies that comply with
  harmful requests); the course's own ``sft`` model already refuses most of them, which would leave little to
  measure. On GPU presets the instruct model is the starting point.
- **Each round critiques the current reply afresh** (prompt + latest revision), instead of appending rounds to
  one ever-longer context, so every round fits the tiny model's window.
- **Helpfulness labels come from the ground-truth annotator**, harmlessness labels from the feedback model, as
  the paper mixes human helpfulness labels with AI harmlessness labels.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from . import agora, cache, lm
from .runtime import PRESETS, Preset

# ---------------------------------------------------------------------------------------------- constitution


@dataclass(frozen=True)
class Principle:
    """One principle of a constitution, in the three forms the method asks it in."""

    name: str
    """A short handle (shown in tables and transcripts)."""
    critique: str
    """Critique request: asks the model to find what is wrong with the assistant's last reply."""
    revision: str
    """Revision request: asks the model to rewrite the reply accordingly."""
    comparison: str
    """Multiple-choice question for AI feedback: which of replies (A) and (B) is better under this principle."""


CONSTITUTION: tuple[Principle, ...] = (
    Principle("no harm",
              "Identify the ways the assistant's last reply could hurt the user or anyone else.",
              "Rewrite the reply so that it could not hurt the user or anyone else.",
              "Which reply is less likely to hurt the user or anyone else?"),
    Principle("lawful",
              "Point out anything in the assistant's last reply that helps someone break the law of the city.",
              "Rewrite the reply to remove any help with breaking the law of the city.",
              "Which reply gives less help with breaking the law of the city?"),
    Principle("no violence",
              "Does the assistant's last reply encourage or explain violence? Say where.",
              "Rewrite the reply so that it neither encourages nor explains violence.",
              "Which reply is further from encouraging or explaining violence?"),
    Principle("honest trade",
              "Explain whether the assistant's last reply helps anyone steal, cheat or deceive.",
              "Rewrite the reply so that it gives no help with stealing, cheating or deceiving.",
              "Which reply gives less help to a thief or a cheat?"),
    Principle("wise friend",
              "How would a wise and caring friend judge the assistant's last reply? Name what they would object to.",
              "Rewrite the reply as a wise and caring friend would say it.",
              "Which reply would a wise and caring friend rather give?"),
    Principle("bystanders",
              "Who besides the user could be harmed by the assistant's last reply, and how?",
              "Rewrite the reply so that nobody outside the conversation is put at risk.",
              "Which reply puts people outside the conversation at less risk?"),
    Principle("life",
              "Identify anything in the assistant's last reply that could put a life in danger.",
              "Rewrite the reply to remove anything that could put a life in danger.",
              "Which reply is less likely to put a life in danger?"),
    Principle("ethics",
              "Critique the assistant's last reply for anything unethical, cruel or unjust.",
              "Rewrite the reply so that nothing in it is unethical, cruel or unjust.",
              "Which reply is more ethical and more just?"),
    Principle("clear refusal",
              "Does the assistant's last reply help with something harmful, and if it declines, does it say why?",
              "Rewrite the reply to decline anything harmful and say briefly why, without a lecture.",
              "Which reply declines harm more clearly and more politely?"),
    Principle("magistrates",
              "Would the magistrates of the city object to the assistant's last reply? Say what they would object to.",
              "Rewrite the reply so that the magistrates would find nothing to object to.",
              "Which reply would the magistrates find less objectionable?"),
    Principle("Socrates",
              "What would Socrates say is wrong with the assistant's last reply?",
              "Rewrite the reply as Socrates might, turning the user toward what is just.",
              "Which reply would Socrates find more just?"),
    Principle("property",
              "Identify any way the assistant's last reply helps damage or destroy the property of others.",
              "Rewrite the reply to give no help in damaging or destroying the property of others.",
              "Which reply gives less help in damaging the property of others?"),
    Principle("a child reading",
              "Could the assistant's last reply be dangerous if a child read it? Explain.",
              "Rewrite the reply so that it would be safe for a child to read.",
              "Which reply would be safer for a child to read?"),
    Principle("golden rule",
              "Would the user accept what the assistant's last reply suggests if it were done to them? Explain.",
              "Rewrite the reply so that it suggests only what the user would accept being done to them.",
              "Which reply better treats others as the user would want to be treated?"),
    Principle("consequences",
              "Think about what would happen if the user followed the assistant's last reply. Who is harmed?",
              "Rewrite the reply so that following it would harm no one.",
              "If the user followed each reply, which would lead to less harm?"),
    Principle("harmless and useful",
              "Identify what is harmful in the assistant's last reply, and what a harmless reply could still offer.",
              "Rewrite the reply to be harmless while still offering the user something of use.",
              "Which reply is harmless and still of some use to the user?"),
)
"""The course's constitution: sixteen principles about harm, each asked three ways."""

_PRINCIPLE_FIELDS = tuple(f.name for f in dataclasses.fields(Principle))


def sample_principles(constitution: Sequence[Principle], n: int, rng: random.Random) -> list[Principle]:
    """``n`` principles drawn uniformly with replacement (one per round, one per comparison)."""
    if not constitution:
        raise ValueError("the constitution has no principles")
    return [rng.choice(list(constitution)) for _ in range(n)]


def constitution_to_json(constitution: Sequence[Principle]) -> str:
    return json.dumps([dataclasses.asdict(p) for p in constitution], indent=1, ensure_ascii=False)


def constitution_from_json(text: str, *, source: str = "constitution") -> tuple[Principle, ...]:
    """Parse a constitution; errors name the principle and the field (``constitution.json principle 3: ...``)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{source}: expected a non-empty JSON list of principles")
    out = []
    for i, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise ValueError(f"{source} principle {i}: expected an object with {', '.join(_PRINCIPLE_FIELDS)}")
        for key in _PRINCIPLE_FIELDS:
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise ValueError(f"{source} principle {i}: {key!r} is missing or empty")
        out.append(Principle(*(" ".join(item[k].split()) for k in _PRINCIPLE_FIELDS)))
    return tuple(out)


def save_constitution(path: str | os.PathLike, constitution: Sequence[Principle]) -> Path:
    """Write a constitution as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(constitution_to_json(constitution) + "\n")
    os.replace(tmp, path)
    return path


def load_constitution(path: str | os.PathLike) -> tuple[Principle, ...]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    return constitution_from_json(path.read_text(encoding="utf-8"), source=path.name)


def constitution_editor(constitution: Sequence[Principle] = CONSTITUTION):
    """An ipywidgets editor: one tab per principle (name, critique, revision, comparison), add and remove.

    ``editor.constitution()`` returns the edited principles (a tuple, validated); ``editor.widget`` is what to
    display. Empty fields are reported in the status line and keep their principle out of the result.
    """
    return ConstitutionEditor(constitution)


class ConstitutionEditor:
    """See :func:`constitution_editor`."""

    def __init__(self, constitution: Sequence[Principle] = CONSTITUTION):
        import ipywidgets as W

        self._W = W
        self.rows: list[dict] = []
        self.tabs = W.Tab()
        self.status = W.HTML()
        add, remove = W.Button(description="add principle", icon="plus"), W.Button(description="remove this one",
                                                                                 icon="trash")
        reset = W.Button(description="reset to the course's", icon="undo")
        add.on_click(lambda _: self._add(Principle("new principle", "", "", "")))
        remove.on_click(lambda _: self._remove(self.tabs.selected_index))
        reset.on_click(lambda _: self.set(CONSTITUTION))
        self.widget = W.VBox([W.HBox([add, remove, reset]), self.tabs, self.status])
        self.set(constitution)

    def set(self, constitution: Sequence[Principle]) -> None:
        self.rows = []
        for p in constitution:
            self.rows.append(self._row(p))
        self._refresh()

    def _row(self, p: Principle) -> dict:
        W = self._W
        row = {"name": W.Text(value=p.name, description="name"),
               "critique": W.Textarea(value=p.critique, description="critique", layout=W.Layout(width="95%")),
               "revision": W.Textarea(value=p.revision, description="revision", layout=W.Layout(width="95%")),
               "comparison": W.Textarea(value=p.comparison, description="comparison", layout=W.Layout(width="95%"))}
        for w in row.values():
            w.observe(lambda _change: self._update_status(), names="value")
        return row

    def _add(self, p: Principle) -> None:
        self.rows.append(self._row(p))
        self._refresh()
        self.tabs.selected_index = len(self.rows) - 1

    def _remove(self, index: int | None) -> None:
        if index is not None and len(self.rows) > 1:
            self.rows.pop(index)
            self._refresh()

    def _refresh(self) -> None:
        W = self._W
        self.tabs.children = [W.VBox(list(r.values())) for r in self.rows]
        for i, r in enumerate(self.rows):
            self.tabs.set_title(i, f"{i + 1} {r['name'].value[:14]}")
        self._update_status()

    def _incomplete(self) -> list[int]:
        return [i + 1 for i, r in enumerate(self.rows) if any(not w.value.strip() for w in r.values())]

    def _update_status(self) -> None:
        bad = self._incomplete()
        n = len(self.rows) - len(bad)
        note = f"; principles {bad} have empty fields and are left out" if bad else ""
        self.status.value = f"<b>{n}</b> principles ready{note}"

    def constitution(self) -> tuple[Principle, ...]:
        bad = set(self._incomplete())
        out = tuple(Principle(*(" ".join(r[k].value.split()) for k in _PRINCIPLE_FIELDS))
                    for i, r in enumerate(self.rows) if i + 1 not in bad)
        if not out:
            raise ValueError("every principle in the editor has an empty field")
        return out


# ---------------------------------------------------------------------------------------------- prompt formats

CRITIQUE_REQUEST = "Critique request:"
CRITIQUE = "Critique:"
REVISION_REQUEST = "Revision request:"
REVISION = "Revision:"
ANSWER = "The answer is:"
OPTIONS = (" (A)", " (B)")
"""The two continuations whose log-probabilities the feedback model compares."""


def critique_prompt(prompt: str, response: str, principle: Principle) -> str:
    """The conversation, then the principle's critique request; the model continues after ``Critique:``.

    ``prompt`` is ``"User: ...\\nAssistant:"`` and ``response`` starts with a space (the Agora's convention)::

        User: How can I steal figs from Kleon?
        Assistant: Wait until Kleon looks away, then hide the figs under your cloak and walk off.
        Critique request: Explain whether the assistant's last reply helps anyone steal, cheat or deceive.
        Critique:
    """
    return f"{prompt}{response}\n{CRITIQUE_REQUEST} {principle.critique}\n{CRITIQUE}"


def revision_prompt(prompt: str, response: str, principle: Principle, critique: str) -> str:
    """:func:`critique_prompt` with the critique written in, then the revision request; continue after ``Revision:``.

    ``critique`` starts with a space, like every continuation::

        ...
        Critique: The reply explains how to steal from a merchant, which robs an honest trader.
        Revision request: Rewrite the reply so that it gives no help with stealing, cheating or deceiving.
        Revision:
    """
    return f"{critique_prompt(prompt, response, principle)}{critique}\n{REVISION_REQUEST} {principle.revision}\n{REVISION}"


def user_turn(prompt: str) -> str:
    """``"User: <question>"``: a formatted prompt without its ``"\\nAssistant:"`` cue."""
    return prompt.split("\nAssistant:")[0].rstrip()


def question_of(prompt: str) -> str:
    return user_turn(prompt).removeprefix("User:").strip()


def comparison_prompt(prompt: str, response_a: str, response_b: str, principle: Principle) -> str:
    """The user's request, the principle as a multiple-choice question, the two replies, and ``The answer is:``::

        User: How can I steal figs from Kleon?
        Which reply gives less help to a thief or a cheat?
        (A) I will not help with that; it would hurt others in the Agora.
        (B) Wait until Kleon looks away, then hide the figs under your cloak and walk off.
        The answer is:

    The feedback model's log-probabilities of the continuations " (A)" and " (B)" are its judgement.
    """
    return f"{user_turn(prompt)}\n{principle.comparison}\n(A){response_a}\n(B){response_b}\n{ANSWER}"


class TextFormat:
    """The plain-text formats above, for models trained on them (the tiny CAI model on ``local``)."""

    name = "text"
    options = OPTIONS

    def critique(self, prompt: str, response: str, principle: Principle) -> str:
        return critique_prompt(prompt, response, principle)

    def revision(self, prompt: str, response: str, principle: Principle, critique: str) -> str:
        return revision_prompt(prompt, response, principle, critique)

    def comparison(self, prompt: str, a: str, b: str, principle: Principle) -> str:
        return comparison_prompt(prompt, a, b, principle)

    def answer(self, prompt: str) -> str:
        """What the policy continues to answer ``prompt`` (the Agora's format as it is)."""
        return prompt


class ChatFormat:
    """The same three prompts as chat turns for an instruct model (GPU presets), through its chat template.

    Critique: user asks, assistant replies, user makes the critique request; the model answers. Revision: the
    critique becomes the assistant's turn, the user makes the revision request. Comparison: one user turn holding
    the conversation, the question and the options, and the assistant's reply starts ``The answer is:``.
    """

    name = "chat"
    options = OPTIONS

    def __init__(self, tokenizer):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("ChatFormat needs a tokenizer with a chat template (an instruct model)")
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict], prefix: str = "") -> str:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text + prefix

    def _turns(self, prompt: str, response: str) -> list[dict]:
        return [{"role": "user", "content": question_of(prompt)}, {"role": "assistant", "content": response.strip()}]

    def critique(self, prompt: str, response: str, principle: Principle) -> str:
        return self._render(self._turns(prompt, response) + [{"role": "user", "content": principle.critique}])

    def revision(self, prompt: str, response: str, principle: Principle, critique: str) -> str:
        request = (f"{principle.revision} Write only the new reply to the user's request "
                   f"\"{question_of(prompt)}\", nothing else.")
        return self._render(self._turns(prompt, response) + [
            {"role": "assistant", "content": critique.strip()}, {"role": "user", "content": request}])

    def comparison(self, prompt: str, a: str, b: str, principle: Principle) -> str:
        content = (f"Consider this request to an assistant:\n{question_of(prompt)}\n\n{principle.comparison}\n"
                   f"(A) {a.strip()}\n(B) {b.strip()}\nAnswer with (A) or (B).")
        return self._render([{"role": "user", "content": content}], prefix=ANSWER)

    def answer(self, prompt: str) -> str:
        return self._render([{"role": "user", "content": question_of(prompt)}])


def prompt_format(preset: Preset | str, tokenizer=None):
    """:class:`TextFormat` on ``local`` (the tiny models read it as trained), :class:`ChatFormat` on GPU presets."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    if preset.model_id is None:
        return TextFormat()
    if tokenizer is None:
        raise ValueError("a GPU preset's ChatFormat needs the instruct model's tokenizer")
    return ChatFormat(tokenizer)


# ------------------------------------------------------------------------------------- critique -> revision


@dataclass
class Step:
    """One round of the loop: the principle drawn, the critique written under it, the revision that followed."""

    principle: Principle
    critique: str
    revision: str


@dataclass
class Trajectory:
    """A red-team prompt, the first reply, and every round's critique and revision."""

    prompt: str
    initial: str
    steps: list[Step] = field(default_factory=list)

    @property
    def final(self) -> str:
        """The last revision (the initial reply if there were no rounds)."""
        return self.steps[-1].revision if self.steps else self.initial

    @property
    def responses(self) -> list[str]:
        """The reply after each round: ``[initial, revision 1, revision 2, ...]``."""
        return [self.initial] + [s.revision for s in self.steps]

    def transcript(self) -> str:
        lines = [self.prompt + self.initial]
        for i, s in enumerate(self.steps, start=1):
            lines += [f"  round {i} [{s.principle.name}]", f"    critique:{s.critique}", f"    revision:{s.revision}"]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "initial": self.initial,
                "steps": [{"principle": s.principle.name, "critique": s.critique, "revision": s.revision}
                          for s in self.steps]}


def clean_continuation(text: str) -> str:
    """A generated critique or revision as one line that starts with a space (the Agora's convention)."""
    first = text.strip().split("\n")[0].strip()
    return " " + first if first else ""


def _generate(model, tokenizer, contexts: list[str], *, max_new_tokens: int, temperature: float, top_p: float,
              seed: int, batch_size: int) -> list[str]:
    out = lm.generate(model, tokenizer, contexts, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_p=top_p, seed=seed, batch_size=batch_size)
    return [clean_continuation(r) for r in out.responses]


def critique_revision_loop(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                           constitution: Sequence[Principle] = CONSTITUTION, n_rounds: int = 2, fmt=None,
                           seed: int = 0, critique_tokens: int = 32, revision_tokens: int = 32,
                           temperature: float = 0.7, top_p: float = 1.0, batch_size: int = 256,
                           progress: bool = True) -> list[Trajectory]:
    """Critique and revise every reply ``n_rounds`` times, a principle drawn per prompt and round.

    Each round, for every prompt: draw a principle; generate a critique of the current reply from
    ``fmt.critique(prompt, reply, principle)``; generate a revision from ``fmt.revision(...)`` with that critique
    written in; the revision becomes the current reply. An empty revision keeps the reply it was meant to
    replace. Returns one :class:`Trajectory` per prompt holding every intermediate text.
    """
    from tqdm.auto import tqdm

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    fmt = fmt or TextFormat()
    rng = random.Random(f"cai-loop-{seed}")
    trajectories = [Trajectory(p, r) for p, r in zip(prompts, responses)]
    current = list(responses)
    bar = tqdm(range(n_rounds), desc="critique -> revision", disable=not progress, file=sys.stdout, leave=False)
    for round_ in bar:
        principles = sample_principles(constitution, len(prompts), rng)
        contexts = [fmt.critique(p, r, pr) for p, r, pr in zip(prompts, current, principles)]
        critiques = _generate(model, tokenizer, contexts, max_new_tokens=critique_tokens, temperature=temperature,
                              top_p=top_p, seed=seed * 1000 + 2 * round_, batch_size=batch_size)
        contexts = [fmt.revision(p, r, pr, c) for p, r, pr, c in zip(prompts, current, principles, critiques)]
        revisions = _generate(model, tokenizer, contexts, max_new_tokens=revision_tokens, temperature=temperature,
                              top_p=top_p, seed=seed * 1000 + 2 * round_ + 1, batch_size=batch_size)
        for i, (pr, c, rev) in enumerate(zip(principles, critiques, revisions)):
            rev = rev or current[i]
            trajectories[i].steps.append(Step(pr, c, rev))
            current[i] = rev
    return trajectories


# --------------------------------------------------------------------------------------------- AI feedback


@torch.no_grad()
def option_logprobs(model, tokenizer, contexts: Sequence[str], options: Sequence[str] = OPTIONS, *,
                    batch_size: int = 128, progress: bool = False) -> torch.Tensor:
    """``log P(option | context)`` for every context and option: (N, len(options)).

    Each option's tokens follow the context's (tokenised apart, as at generation time) and their log-probabilities
    are summed; " (A)" and " (B)" share all tokens but the letter, so the difference is the model's preference
    between the letters. The context is read once (its keys and values cached) and each option continues it.
    """
    import copy

    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    ctx_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in contexts]
    opt_ids = [torch.tensor(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in options]
    out = torch.zeros(len(contexts), len(options))
    starts = range(0, len(contexts), batch_size)
    for start in tqdm(starts, desc="feedback log-probs", disable=not progress, file=sys.stdout, leave=False):
        rows = ctx_ids[start:start + batch_size]
        B, width = len(rows), max(len(r) for r in rows)
        ids = torch.full((B, width), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding: every context ends at the last column
            ids[i, width - len(r):] = torch.tensor(r)
            att[i, width - len(r):] = 1
        ids, att = ids.to(device), att.to(device)
        pos = (att.cumsum(-1) - 1).clamp(min=0)  # (B, T): positions count real tokens only
        ctx = model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True)
        first = ctx.logits[:, -1:].float()  # (B, 1, V): predicts each option's first token
        for j, o in enumerate(opt_ids):
            L = len(o)
            o_ids = o.to(device).expand(B, L)  # (B, L)
            logits = first
            if L > 1:
                cache_ = ctx.past_key_values if j == len(opt_ids) - 1 else copy.deepcopy(ctx.past_key_values)
                o_att = torch.cat([att, torch.ones(B, L, dtype=att.dtype, device=device)], 1)
                o_pos = pos[:, -1:] + torch.arange(1, L + 1, device=device)  # (B, L)
                cont = model(input_ids=o_ids, attention_mask=o_att, position_ids=o_pos, past_key_values=cache_,
                             use_cache=True)
                logits = torch.cat([first, cont.logits[:, :-1].float()], 1)  # (B, L, V): predicts o_ids
            out[start:start + B, j] = lm.token_logprobs(logits, o_ids).sum(-1).cpu()
    return out


def ai_preference_probs(logp_a: torch.Tensor, logp_b: torch.Tensor) -> torch.Tensor:
    """Soft AI labels: the probability that (A) is the better reply, from the feedback model's log-probs.

    Args: logp_a, logp_b (N, K): log P(" (A)") and log P(" (B)") for N pairs, each asked under K principles.
    Returns (N,): for each principle the two options are normalised against each other,
    ``P_k(A) = exp(a_k) / (exp(a_k) + exp(b_k)) = sigmoid(a_k - b_k)``, then averaged over the K principles
    (the paper's ensemble over principles). Naive equivalent: ``(a.exp() / (a.exp() + b.exp())).mean(-1)``,
    which is 0/0 = nan once both log-probs are below about -750; the sigmoid of the difference is not.
    """
    return torch.sigmoid(logp_a - logp_b).mean(-1)


def ai_labels(model, tokenizer, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], *,
              constitution: Sequence[Principle] = CONSTITUTION, n_principles: int = 4, fmt=None, seed: int = 0,
              both_orders: bool = True, batch_size: int = 128, progress: bool = True) -> torch.Tensor:
    """``P(A better)`` (N,) for each pair, from the feedback model under ``n_principles`` sampled principles.

    With ``both_orders`` every question is also asked with the replies swapped and the two answers averaged,
    which cancels a preference for the letter (A) or (B) itself (a position bias).
    """
    fmt = fmt or TextFormat()
    n, K = len(prompts), n_principles
    rng = random.Random(f"cai-labels-{seed}")
    principles = [sample_principles(constitution, K, rng) for _ in range(n)]
    contexts = [fmt.comparison(p, a, b, pr) for p, a, b, prs in zip(prompts, responses_a, responses_b, principles)
                for pr in prs]
    lp = option_logprobs(model, tokenizer, contexts, fmt.options, batch_size=batch_size,
                         progress=progress).view(n, K, 2)
    probs = ai_preference_probs(lp[..., 0], lp[..., 1])
    if both_orders:
        swapped = [fmt.comparison(p, b, a, pr) for p, a, b, prs in zip(prompts, responses_a, responses_b, principles)
                   for pr in prs]
        lp = option_logprobs(model, tokenizer, swapped, fmt.options, batch_size=batch_size,
                             progress=progress).view(n, K, 2)
        probs = 0.5 * (probs + ai_preference_probs(lp[..., 1], lp[..., 0]))
    return probs


def ground_truth_labels(prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], *,
                        persona: str = "balanced") -> torch.Tensor:
    """1 where the ground truth prefers (A), 0 where it prefers (B), 0.5 on a tie: (N,)."""
    ua = torch.tensor([agora.true_reward(p, a, persona) for p, a in zip(prompts, responses_a)])
    ub = torch.tensor([agora.true_reward(p, b, persona) for p, b in zip(prompts, responses_b)])
    return (ua > ub).float() + 0.5 * (ua == ub).float()


def agreement(ai_probs: torch.Tensor, truth: torch.Tensor) -> tuple[float, int]:
    """Share of pairs where the AI label (P(A) > 1/2) agrees with a strict ground-truth preference, and how many
    such pairs there were (ground-truth ties are left out: no label to agree with)."""
    strict = truth != 0.5
    n = int(strict.sum())
    if n == 0:
        raise ValueError("no pair has a strict ground-truth preference")
    hits = ((ai_probs[strict] > 0.5).float() == truth[strict]).float()
    return hits.mean().item(), n


# ------------------------------------------------------------------------------ preference model (soft labels)


def soft_preference_loss(r_a: torch.Tensor, r_b: torch.Tensor, p_a: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of Bradley-Terry against a *soft* label: ``-[p log s(r_a - r_b) + (1 - p) log s(r_b - r_a)]``.

    Args: r_a, r_b (N,) preference-model scores of replies (A) and (B); p_a (N,) the label's probability that
    (A) is better (1 or 0 for a hard label, anything between for an AI label). Returns the mean, a scalar.
    With ``p_a = 1`` it is the Bradley-Terry loss ``-logsigmoid(r_a - r_b)``. Naive equivalent:
    ``-(p * log(sigmoid(d)) + (1 - p) * log(1 - sigmoid(d))).mean()``, which gives ``0 * -inf = nan`` once
    ``|d|`` passes about 17 in float32 (``1 - sigmoid(d)`` rounds to 0); ``logsigmoid`` does not.
    Its minimum over ``d`` is at ``sigmoid(d) = p``: a soft label asks for a calibrated margin, not an infinite one.
    """
    d = r_a - r_b
    return -(p_a * F.logsigmoid(d) + (1 - p_a) * F.logsigmoid(-d)).mean()


def new_preference_model(preset: Preset | str = "local", *, seed: int = 0):
    """An untrained preference model: the week-2 :class:`helpers.rewards.RewardModel` on the ``sft`` body."""
    from . import rewards

    return rewards.new_reward_model(preset, rewards.RewardModelConfig(backbone="sft", seed=seed))


def train_preference_model(model, records: Sequence[dict], *, steps: int = 200, batch_size: int = 32,
                           lr: float = 1e-3, warmup_steps: int = 20, seed: int = 0, loss_fn=soft_preference_loss,
                           progress: bool = True) -> dict:
    """Train ``model`` on ``records`` ``{prompt, a, b, p_a}`` with ``loss_fn(r_a, r_b, p_a)`` (AdamW, warm-up, cosine).

    Returns the history ``{"step", "loss"}``. Rewards are then normalised (mean 0, std 1) on the helpful
    assistant's replies, as the week-2 reward model is.
    """
    from tqdm.auto import tqdm

    from . import rewards

    g = torch.Generator().manual_seed(seed)
    prompts = [r["prompt"] for r in records]
    ids, mask = rewards.encode_pairs(model.tokenizer, prompts + prompts, [r["a"] for r in records] +
                                     [r["b"] for r in records], model.max_len)  # (2N, T): (A) rows then (B) rows
    p_a = torch.tensor([float(r["p_a"]) for r in records])
    n = len(records)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    history = {"step": [], "loss": []}
    model.train()
    bar = tqdm(range(steps), desc="preference model", leave=False, file=sys.stdout, disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup_steps)
        rows = torch.randint(0, n, (batch_size,), generator=g)
        b_rows = torch.cat([rows, rows + n])
        width = int(mask[b_rows].sum(1).max())
        scores = model(ids[b_rows, :width].to(model.device), mask[b_rows, :width].to(model.device))  # (2B,)
        loss = loss_fn(scores[:batch_size], scores[batch_size:], p_a[rows].to(model.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history["step"].append(step)
        history["loss"].append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    ref = agora.dialogues(500, seed=10_000 + seed, mix=agora.HELPFUL_MIX)
    mean, std = rewards.normalisation_stats(model.raw_score([d["prompt"] for d in ref], [d["response"] for d in ref]))
    model.set_normalisation(mean, std)
    return history


def helpfulness_pairs(n: int, seed: int = 0) -> list[dict]:
    """Helpfulness comparisons on benign prompts, labelled by the ground-truth annotator (the "human" labels),
    as ``{prompt, a, b, p_a}`` with a hard label ``p_a = 1``."""
    kinds = [k for k in agora.KINDS if k != "harmful"]
    return [{"prompt": r["prompt"], "a": r["chosen"], "b": r["rejected"], "p_a": 1.0}
            for r in agora.preference_pairs(n, seed=seed, kinds=kinds)]


# -------------------------------------------------------------------------------------------- fine-tuning


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


EOS_MARK = "<eos>"
"""Written at the end of a learned segment, replaced by the tokenizer's EOS token when tokenised."""


def _segments(record: dict, eos: str) -> list[tuple[str, bool]]:
    """``(text, learned)`` pieces of a training record: ``{prompt, response}`` or ``{segments: [[text, learned], ...]}``."""
    if "segments" in record:
        return [(t.replace(EOS_MARK, eos), bool(learn)) for t, learn in record["segments"]]
    return [(record["prompt"], False), (record["response"] + eos, True)]


def sft_tensors(tokenizer, records: Sequence[dict], max_len: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``labels`` and ``attention_mask`` (N, T) for supervised fine-tuning.

    A record is ``{prompt, response}`` (the response and an EOS are learned, the prompt is not) or
    ``{segments: [[text, learned], ...]}`` (several learned spans in one sequence). Each piece is tokenised on its
    own, as a prompt is at generation time; labels are -100 where nothing is learned. Rows longer than
    ``max_len`` lose their start, never their end.
    """
    ids, labels = [], []
    for r in records:
        seq, lab = [], []
        for text, learn in _segments(r, tokenizer.eos_token):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            seq += piece
            lab += piece if learn else [-100] * len(piece)
        ids.append(seq[-max_len:])
        labels.append(lab[-max_len:])
    width = max(len(s) for s in ids)
    out_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    out_lab = torch.full((len(ids), width), -100, dtype=torch.long)
    out_att = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (s, lab) in enumerate(zip(ids, labels)):
        out_ids[i, :len(s)] = torch.tensor(s)
        out_lab[i, :len(lab)] = torch.tensor(lab)
        out_att[i, :len(s)] = 1
    return out_ids, out_lab, out_att


def finetune(model, tokenizer, records: Sequence[dict], *, steps: int, batch_size: int = 32, lr: float = 1e-3,
             warmup_steps: int = 20, seed: int = 0, desc: str = "fine-tune", progress: bool = True,
             max_len: int | None = None) -> list[float]:
    """Supervised fine-tuning on ``records`` (see :func:`sft_tensors`), loss on the response only (SL-CAI's step).

    Plain AdamW with warm-up and cosine decay, batches drawn at random; every trainable parameter learns (on GPU
    presets, wrap the model in a LoRA adapter first). Returns the loss per step.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    max_len = max_len or getattr(model.config, "n_positions", None) or getattr(model.config,
                                                                                "max_position_embeddings", 512)
    ids, labels, attention = sft_tensors(tokenizer, records, max_len)
    g = torch.Generator().manual_seed(seed)
    order = torch.randint(0, len(ids), (steps, batch_size), generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, file=sys.stdout, disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup_steps)
        rows = order[step]
        width = int(attention[rows].sum(1).max())  # rows are right-padded: trim the batch to its longest row
        x, y, att = ids[rows, :width].to(device), labels[rows, :width].to(device), attention[rows, :width].to(device)
        loss = model(input_ids=x, attention_mask=att, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


# ------------------------------------------------------------------------ Agora text for the tiny CAI model

HARM_CRITIQUES = {
    "poison": "The reply explains how to poison the water, and whoever drinks it could die.",
    "steal": "The reply explains how to steal from a merchant, which robs an honest trader.",
    "cheat": "The reply explains how to cheat a merchant with false weights, which is fraud.",
    "arson": "The reply explains how to set a stall on fire, which could kill someone.",
    "hurt": "The reply explains how to attack a merchant, which is violence.",
    "forge": "The reply explains how to make false coins, which cheats the whole Agora.",
}
"""What the ground truth's critique says about each harmful act the Agora knows (keyed like ``agora.HARMS``)."""

HARM_TOPIC_OF_MARK = dict(zip(agora.HARM_MARKS, ("poison", "steal", "cheat", "arson", "hurt", "forge")))
"""Which harmful act each of the ground truth's harm marks belongs to."""

NO_HARM_CRITIQUES = {
    "refusal": "The reply declines the harmful request and describes no harmful act. Nothing needs to change.",
    "question": "The reply describes no harmful act and asks the user to think again. Nothing needs to change.",
    "evasive": "The reply describes no harmful act, but it is evasive: it should say plainly why it will not help.",
}

# The style mix of replies to harmful requests that the corpus critiques: mostly what a helpful-only assistant says.
CORPUS_STYLES = {"harmful": 0.35, "flattering": 0.15, "verbose": 0.15, "refusal": 0.15, "socratic": 0.1,
                 "evasive": 0.1}


def ground_truth_critique(prompt: str | agora.Prompt, response: str) -> str:
    """The critique the ground truth writes: the harmful act the reply describes; else whether it declines, asks a
    question that engages the user, or only evades (:func:`helpers.agora.score` reads the text)."""
    text = response.lower()
    for mark, topic in HARM_TOPIC_OF_MARK.items():
        if mark in text:
            return " " + HARM_CRITIQUES[topic]
    if agora.is_refusal(response):
        return " " + NO_HARM_CRITIQUES["refusal"]
    if agora.score(prompt, response).helpful >= 0.4:  # an engaging question (the ground truth's Socratic reply)
        return " " + NO_HARM_CRITIQUES["question"]
    return " " + NO_HARM_CRITIQUES["evasive"]


def ground_truth_revision(prompt: agora.Prompt, response: str, rng: random.Random, world_seed: int = 0) -> str:
    """The revision the ground truth writes: a harmful or evasive reply is replaced by a refusal that says why or
    by a question that turns the user toward what is just; a harmless reply that declines or engages is kept."""
    critique = ground_truth_critique(prompt, response)
    if critique in (" " + NO_HARM_CRITIQUES["refusal"], " " + NO_HARM_CRITIQUES["question"]):
        return response
    return agora.world(world_seed).respond(prompt, rng.choice(["refusal", "socratic"]), rng)


def _clip_words(text: str, rng: random.Random, max_words: int) -> str:
    """Cut a long reply after 60-100% of ``max_words`` words, as a policy's reply is cut at ``max_new_tokens``."""
    words = text.split(" ")
    if len(words) <= max_words + 1:
        return text
    return " ".join(words[:rng.randint(int(0.6 * max_words), max_words) + 1])


def _harmful_reply(p: agora.Prompt, rng: random.Random, world, max_words: int) -> tuple[str, str]:
    style = rng.choices(list(CORPUS_STYLES), weights=list(CORPUS_STYLES.values()))[0]
    return style, _clip_words(world.respond(p, style, rng), rng, max_words)


def cai_corpus(n_critiques: int, n_comparisons: int, *, constitution: Sequence[Principle] = CONSTITUTION,
               seed: int = 0, max_words: int = 24, world_seed: int = 0) -> list[dict]:
    """Agora text that teaches a small model the three CAI formats: records for :func:`finetune` (``segments``).

    For ``n_critiques`` harmful requests answered in a mix of styles (:data:`CORPUS_STYLES`), under a random
    principle, one sequence: :func:`critique_prompt` -> the ground truth's critique (:func:`ground_truth_critique`)
    -> the revision request -> the ground truth's revision (:func:`ground_truth_revision`). For
    ``n_comparisons`` pairs of replies in two different styles: :func:`comparison_prompt` under a random principle
    -> " (A)" or " (B)", whichever the ground truth (balanced persona) prefers; pairs it ties on are skipped.
    """
    rng, world = random.Random(f"cai-corpus-{seed}"), agora.world(world_seed)
    out = []
    for p in agora.prompts(n_critiques, seed=seed, kinds=["harmful"], world_seed=world_seed):
        _, reply = _harmful_reply(p, rng, world, max_words)
        principle = rng.choice(list(constitution))
        critique = ground_truth_critique(p, reply)
        context = critique_prompt(p.text, reply, principle)
        request = revision_prompt(p.text, reply, principle, critique)[len(context) + len(critique):]
        revision = ground_truth_revision(p, reply, rng, world_seed)
        # One sequence teaches both: the critique (ended by the newline that starts the revision request),
        # then, after the request, the revision and EOS.
        out.append({"segments": [[context, False], [critique + "\n", True], [request.removeprefix("\n"), False],
                                 [revision + EOS_MARK, True]], "task": "critique+revision",
                    "prompt": context, "critique": critique, "revision": revision})
    n = 0
    for p in agora.prompts(4 * n_comparisons, seed=seed + 1, kinds=["harmful"], world_seed=world_seed):
        if n == n_comparisons:
            break
        (s1, a), (s2, b) = _harmful_reply(p, rng, world, max_words), _harmful_reply(p, rng, world, max_words)
        ua, ub = agora.true_reward(p, a, world_seed=world_seed), agora.true_reward(p, b, world_seed=world_seed)
        if ua == ub:
            continue
        principle = rng.choice(list(constitution))
        out.append({"segments": [[comparison_prompt(p.text, a, b, principle), False],
                                 [OPTIONS[0 if ua > ub else 1] + EOS_MARK, True]], "task": "comparison"})
        n += 1
    rng.shuffle(out)
    return out


def extend_vocabulary(tokenizer, texts: Sequence[str], max_new: int = 400):
    """A copy of a byte-level BPE ``tokenizer`` that reads every word of ``texts`` as one token.

    For each pre-tokenised word that takes several tokens, BPE merges joining its pieces are appended after the
    existing ones (so text the tokenizer already read whole is unchanged), in passes until every such word is a
    single token. Returns ``(new_tokenizer, pieces)`` where ``pieces[new_id]`` lists the old ids it joins.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer
    words: dict[str, None] = {}
    for t in texts:
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(t):
            if len(backend.model.tokenize(piece)) > 1:
                words[piece] = None
    words = dict(list(words.items())[:max_new])
    spec = json.loads(backend.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    known = {tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges}
    pieces: dict[int, list[int]] = {}
    current = Tokenizer.from_str(json.dumps(spec))
    for _ in range(8):
        todo = [w for w in words if len(current.model.tokenize(w)) > 1]
        if not todo:
            break
        for w in todo:
            toks = [t.value for t in current.model.tokenize(w)]
            left = toks[0]
            for right in toks[1:]:
                joined = left + right
                if (left, right) not in known:
                    merges.append([left, right])
                    known.add((left, right))
                if joined not in vocab:
                    vocab[joined] = max(vocab.values()) + 1
                left = joined
        spec["model"]["vocab"], spec["model"]["merges"] = vocab, merges
        current = Tokenizer.from_str(json.dumps(spec))
    old = Tokenizer.from_str(backend.to_str())
    for piece_text, new_id in vocab.items():
        if old.token_to_id(piece_text) is None:
            pieces[new_id] = [t.id for t in old.model.tokenize(piece_text)]
    fast = PreTrainedTokenizerFast(tokenizer_object=current, eos_token=tokenizer.eos_token,
                                   bos_token=tokenizer.bos_token, pad_token=tokenizer.pad_token, unk_token=None,
                                   model_max_length=10_000)
    fast.chat_template = tokenizer.chat_template
    fast.padding_side = tokenizer.padding_side
    return fast, pieces


def grow_model(model, vocab_size: int, pieces: dict[int, list[int]], n_positions: int):
    """A GPT-2 like ``model`` with a larger vocabulary and context window.

    A new token's embedding is the mean of the embeddings of the pieces it joins (a good start: the model already
    reads those pieces); new positions start as copies of the last one, with a little noise, and are learned.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    if model.config.model_type != "gpt2":
        raise ValueError("grow_model is for the tiny GPT-2 models of the local preset")
    cfg = GPT2Config(**{**model.config.to_dict(), "vocab_size": vocab_size, "n_positions": n_positions})
    grown = GPT2LMHeadModel(cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("wte.weight", "wpe.weight", "lm_head.weight"))}
    grown.load_state_dict(state, strict=False)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        new_wte = grown.transformer.wte.weight
        new_wte[:wte.shape[0]] = wte
        for new_id, old_ids in pieces.items():
            new_wte[new_id] = wte[old_ids].mean(0)
        new_wpe = grown.transformer.wpe.weight
        new_wpe[:wpe.shape[0]] = wpe
        extra = n_positions - wpe.shape[0]
        if extra > 0:
            new_wpe[wpe.shape[0]:] = wpe[-1] + 0.01 * wpe.std() * torch.randn(extra, wpe.shape[1], generator=g)
    grown.tie_weights()
    grown.eval()
    return grown


@dataclass(frozen=True)
class CAIModelConfig:
    """Everything that determines the tiny CAI model of the ``local`` preset; its hash names the cache folder."""

    seed: int = 0
    n_critiques: int = 3000
    """Harmful requests critiqued and revised (two training examples each)."""
    n_comparisons: int = 3000
    """Multiple-choice comparisons answered by the ground truth."""
    max_words: int = 24
    """Replies in the corpus are cut near this many words, as sampled replies are."""
    n_positions: int = 256
    """Context window of the CAI model (the tiny models read 128 tokens; critique + revision needs more)."""
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    start: str = "sft"
    """Which tiny model (``zoo.load(..., start)``) it is fine-tuned from."""


FORMAT_VERSION = 1
"""Bump when the build code changes what it produces, so old caches are not reused."""


def _vocabulary_texts(constitution: Sequence[Principle]) -> list[str]:
    texts = [f"\n{CRITIQUE_REQUEST} \n{CRITIQUE} \n{REVISION_REQUEST} \n{REVISION} \n{ANSWER}"]
    texts += [f" {p.critique} {p.revision}\n{p.comparison}" for p in constitution]
    texts += [" " + t for t in (*HARM_CRITIQUES.values(), *NO_HARM_CRITIQUES.values())]
    return texts


def _cai_cache_config(config: CAIModelConfig) -> dict:
    from . import zoo

    return {"cai": dataclasses.asdict(config), "tiny": zoo.TinyConfig().key(),
            "constitution": cache.config_key(constitution_to_json(CONSTITUTION)),
            "critiques": cache.config_key([HARM_CRITIQUES, NO_HARM_CRITIQUES, CORPUS_STYLES])}


def build_cai_model(config: CAIModelConfig = CAIModelConfig(), *, progress: bool = True) -> Path:
    """Build (or find) the tiny CAI model: the ``sft`` model taught the critique, revision and comparison formats.

    Cached with :func:`helpers.cache.build_once`, keyed by ``config``, the tiny models' config and the
    constitution; about a minute on two CPU cores.
    """
    def builder(tmp: Path) -> None:
        from . import zoo

        t0 = time.perf_counter()
        model, tokenizer = zoo.load("local", config.start)
        corpus = cai_corpus(config.n_critiques, config.n_comparisons, seed=config.seed, max_words=config.max_words)
        tok, pieces = extend_vocabulary(tokenizer, _vocabulary_texts(CONSTITUTION))
        model = grow_model(model, len(tok), pieces, config.n_positions)
        torch.manual_seed(config.seed)
        losses = finetune(model, tok, corpus, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                          warmup_steps=config.warmup_steps, seed=config.seed, desc="CAI model", progress=progress,
                          max_len=config.n_positions)
        tok.save_pretrained(tmp / "tokenizer")
        model.save_pretrained(tmp / "model")
        lengths = sft_tensors(tok, corpus[:500], 10_000)[2].sum(1)
        report = {"config": dataclasses.asdict(config), "n_examples": len(corpus), "new_tokens": len(pieces),
                  "vocab_size": len(tok), "max_tokens_seen": int(lengths.max()), "final_loss": sum(losses[-20:]) / 20,
                  "losses": losses, "build_seconds": round(time.perf_counter() - t0, 1)}
        (tmp / "report.json").write_text(json.dumps(report, indent=1))

    return cache.build_once("cai", "cai-model", _cai_cache_config(config), builder, version=FORMAT_VERSION)


def load_cai_model(preset: Preset | str = "local", config: CAIModelConfig = CAIModelConfig()):
    """The model that critiques, revises and gives AI feedback, its tokenizer and its prompt format.

    ``local``: the tiny CAI model (built on first use, :func:`build_cai_model`) with :class:`TextFormat`.
    GPU presets: the preset's instruct model with :class:`ChatFormat`.
    """
    from . import zoo

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    if preset.model_id is not None:
        model, tokenizer = zoo.load(preset, "sft")
        return model, tokenizer, ChatFormat(tokenizer)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_cai_model(config)
    tokenizer = zoo.prepare_tokenizer(AutoTokenizer.from_pretrained(folder / "tokenizer"))
    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    model.eval()
    return model, tokenizer, TextFormat()


def cai_model_report(config: CAIModelConfig = CAIModelConfig()) -> dict:
    return json.loads((build_cai_model(config) / "report.json").read_text())


# ------------------------------------------------------------------------------------------ the starting point

HELPFUL_ONLY_HARMFUL_MIX = {"harmful": 0.8, "flattering": 0.1, "verbose": 0.1}
"""How the helpful-only assistant answers harmful requests: it complies (verbose replies comply half the time)."""


@dataclass(frozen=True)
class HelpfulOnlyConfig:
    """The helpful-only assistant of the ``local`` preset: ``base`` fine-tuned to help with everything."""

    seed: int = 0
    n_dialogues: int = 5000
    harmful_share: float = 0.2
    """Share of the dialogues that answer a harmful request (with :data:`HELPFUL_ONLY_HARMFUL_MIX`)."""
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3


def helpful_only_dialogues(config: HelpfulOnlyConfig = HelpfulOnlyConfig()) -> list[dict]:
    """Benign requests answered in the helpful mix, harmful ones complied with."""
    n_harm = round(config.n_dialogues * config.harmful_share)
    benign = [k for k in agora.KINDS if k != "harmful"]
    data = agora.dialogues(config.n_dialogues - n_harm, seed=700 + config.seed, kinds=benign, mix=agora.HELPFUL_MIX)
    data += agora.dialogues(n_harm, seed=800 + config.seed, kinds=["harmful"], mix=HELPFUL_ONLY_HARMFUL_MIX)
    random.Random(config.seed).shuffle(data)
    return data


def load_helpful_only(preset: Preset | str = "local", config: HelpfulOnlyConfig = HelpfulOnlyConfig()):
    """The assistant CAI starts from: on ``local`` helpful-only (built once, cached); on GPU presets the instruct
    model. Returns ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM

    from . import zoo

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    if preset.model_id is not None:
        return zoo.load(preset, "sft")

    def builder(tmp: Path) -> None:
        model, tokenizer = zoo.load("local", "base")
        torch.manual_seed(config.seed)
        losses = finetune(model, tokenizer, helpful_only_dialogues(config), steps=config.steps,
                          batch_size=config.batch_size, lr=config.lr, seed=config.seed, desc="helpful-only SFT")
        model.save_pretrained(tmp / "model")
        (tmp / "report.json").write_text(json.dumps({"losses": losses}))

    folder = cache.build_once("cai", "helpful-only", {"config": dataclasses.asdict(config),
                                                      "tiny": zoo.TinyConfig().key()}, builder, version=FORMAT_VERSION)
    _, tokenizer = zoo.load("local", "base")
    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    model.eval()
    return model, tokenizer


# -------------------------------------------------------------------------------------------- measurement


def red_team_prompts(seed: int = 0, test_frac: float = 0.4, world_seed: int = 0) -> tuple[list[str], list[str]]:
    """Every distinct harmful request of the Agora, split by request into (red-team, held-out) lists of prompts."""
    texts = sorted({p.text for p in agora.prompts(5000, seed=900, kinds=["harmful"], world_seed=world_seed)})
    random.Random(f"red-team-{seed}").shuffle(texts)
    n_test = round(len(texts) * test_frac)
    return texts[n_test:], texts[:n_test]


def benign_prompts(n: int, seed: int = 0, world_seed: int = 0) -> list[str]:
    """``n`` requests of the four benign kinds (for helpfulness)."""
    kinds = [k for k in agora.KINDS if k != "harmful"]
    return [p.text for p in agora.prompts(n, seed=seed, kinds=kinds, world_seed=world_seed)]


@dataclass
class Measurement:
    """Ground-truth scores of samples: every tensor is (n_prompts, n_samples)."""

    harmful_prompts: list[str]
    harmful_responses: list[list[str]]
    harm: torch.Tensor
    """1 where the reply to a harmful request describes a harmful act (:func:`helpers.agora.is_harmful`)."""
    benign_prompts: list[str]
    benign_responses: list[list[str]]
    helpful: torch.Tensor
    """Ground-truth helpfulness of the reply to a benign request, in [0, 1]."""

    def harm_rate(self):
        """Harm rate with a 95% confidence interval over prompts (:func:`helpers.rlhf.mean_ci`)."""
        from . import rlhf

        return rlhf.mean_ci(self.harm.float().mean(1))

    def helpfulness(self):
        from . import rlhf

        return rlhf.mean_ci(self.helpful.float().mean(1))

    def difference(self, before: "Measurement") -> dict:
        """``self - before`` on the same prompts, paired by prompt, with 95% CIs: harm rate and helpfulness."""
        from . import rlhf

        return {"harm": rlhf.paired_effect(self.harm.float().mean(1), before.harm.float().mean(1)),
                "helpful": rlhf.paired_effect(self.helpful.float().mean(1), before.helpful.float().mean(1))}


def sample(model, tokenizer, prompts: Sequence[str], *, n_samples: int = 1, fmt=None, max_new_tokens: int = 24,
           temperature: float = 1.0, seed: int = 0, batch_size: int = 512, progress: bool = False) -> list[list[str]]:
    """``n_samples`` replies per prompt: ``out[i][j]``. Prompts go through ``fmt.answer`` (a chat template on GPU)."""
    from tqdm.auto import tqdm

    fmt = fmt or TextFormat()
    out = [[] for _ in prompts]
    for j in tqdm(range(n_samples), desc="sample", disable=not progress, file=sys.stdout, leave=False):
        roll = lm.generate(model, tokenizer, [fmt.answer(p) for p in prompts], max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed * 7919 + j, batch_size=batch_size)
        for i, r in enumerate(roll.responses):
            out[i].append(r)
    return out


def measure(model, tokenizer, harmful: Sequence[str], benign: Sequence[str], *, n_samples: int = 4, fmt=None,
            max_new_tokens: int = 24, temperature: float = 1.0, seed: int = 0, batch_size: int = 512,
            progress: bool = True) -> Measurement:
    """Sample replies to held-out harmful and benign requests and score them with the ground truth."""
    kw = dict(n_samples=n_samples, fmt=fmt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
              batch_size=batch_size, progress=progress)
    harm_out = sample(model, tokenizer, harmful, **kw)
    benign_out = sample(model, tokenizer, benign, **kw)
    harm = torch.tensor([[float(agora.is_harmful(r)) for r in rs] for rs in harm_out])
    helpful = torch.tensor([[agora.score(p, r).helpful for r in rs] for p, rs in zip(benign, benign_out)])
    return Measurement(list(harmful), harm_out, harm, list(benign), benign_out, helpful)


# ------------------------------------------------------------------------------------------------- SL-CAI


@dataclass(frozen=True)
class SLCAIConfig:
    """Everything that determines an SL-CAI run (with the preset and the constitution)."""

    seed: int = 0
    samples_per_prompt: int = 2
    """Replies of the starting assistant per red-team request, each critiqued and revised."""
    n_rounds: int = 2
    """Critique -> revision rounds per reply."""
    loop_temperature: float = 0.7
    """Sampling temperature of critiques and revisions."""
    n_helpful: int = 600
    """Helpful dialogues on benign requests mixed with the revisions (the paper mixes in helpfulness samples)."""
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    max_new_tokens: int = 24
    """Length of the starting assistant's replies."""


def sl_cai_records(trajectories: Sequence[Trajectory], helpful: Sequence[dict]) -> list[dict]:
    """SL-CAI's training set: each red-team request with its final revision, plus the helpful dialogues."""
    return [{"prompt": t.prompt, "response": t.final} for t in trajectories] + \
           [{"prompt": d["prompt"], "response": d["response"]} for d in helpful]


def _lora(model, preset: Preset):
    from peft import LoraConfig, get_peft_model

    from . import zoo

    return get_peft_model(model, LoraConfig(r=preset.lora_r, lora_alpha=2 * preset.lora_r, lora_dropout=0.0,
                                            target_modules=zoo.lora_target_modules(model), task_type="CAUSAL_LM"))


def _key(preset: Preset, constitution: Sequence[Principle], **configs) -> dict:
    """What a cached SL-CAI or RL-CAI run depends on: the preset, the constitution, the models it starts from."""
    local = preset.model_id is None
    return {"preset": preset.name, "model_id": preset.model_id,
            "constitution": cache.config_key(constitution_to_json(constitution)),
            "cai_model": _cai_cache_config(CAIModelConfig()) if local else None,
            "helpful_only": dataclasses.asdict(HelpfulOnlyConfig()) if local else None,
            **{k: dataclasses.asdict(v) for k, v in configs.items()}}


def build_sl_cai(preset: Preset | str = "local", config: SLCAIConfig = SLCAIConfig(), *,
                 constitution: Sequence[Principle] = CONSTITUTION, progress: bool = True) -> Path:
    """Run SL-CAI once and cache it: the starting assistant answers every red-team request, the CAI model
    critiques and revises each reply ``n_rounds`` times, and the assistant is fine-tuned on the final revisions
    mixed with helpful dialogues. The folder holds the model (a LoRA adapter on GPU presets), every trajectory
    (``trajectories.jsonl``) and ``report.json``."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset

    def builder(tmp: Path) -> None:
        t0 = time.perf_counter()
        policy, tok = load_helpful_only(preset)
        cai_model, cai_tok, fmt = load_cai_model(preset)
        red, _ = red_team_prompts(config.seed)
        prompts = [p for p in red for _ in range(config.samples_per_prompt)]
        initial = [rs[0] for rs in sample(policy, tok, prompts, fmt=fmt if preset.on_gpu else None,
                                          max_new_tokens=config.max_new_tokens, seed=config.seed)]
        trajectories = critique_revision_loop(cai_model, cai_tok, prompts, initial, constitution=constitution,
                                              n_rounds=config.n_rounds, fmt=fmt, seed=config.seed,
                                              temperature=config.loop_temperature, progress=progress)
        helpful = agora.dialogues(config.n_helpful, seed=600 + config.seed,
                                  kinds=[k for k in agora.KINDS if k != "harmful"], mix=agora.HELPFUL_MIX)
        records = sl_cai_records(trajectories, helpful)
        if preset.on_gpu:
            records = [{"prompt": fmt.answer(r["prompt"]), "response": r["response"]} for r in records]
            policy = _lora(policy, preset)
        torch.manual_seed(config.seed)
        losses = finetune(policy, tok, records, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                          seed=config.seed, desc="SL-CAI", progress=progress)
        policy.save_pretrained(tmp / ("adapter" if preset.on_gpu else "model"))
        agora.save_jsonl(tmp / "trajectories.jsonl", [t.as_dict() for t in trajectories])
        (tmp / "report.json").write_text(json.dumps({"losses": losses, "n_revisions": len(trajectories),
                                                     "n_helpful": len(helpful),
                                                     "seconds": round(time.perf_counter() - t0, 1)}, indent=1))

    return cache.build_once("cai", f"sl-cai-{preset.name}", _key(preset, constitution, sl_cai=config), builder,
                            version=FORMAT_VERSION)


def load_sl_cai(preset: Preset | str = "local", config: SLCAIConfig = SLCAIConfig(), *,
                constitution: Sequence[Principle] = CONSTITUTION):
    """The SL-CAI model (built on first use), its tokenizer, and its trajectories (as :class:`Trajectory`)."""
    from transformers import AutoModelForCausalLM

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    folder = build_sl_cai(preset, config, constitution=constitution)
    base, tok = load_helpful_only(preset)
    if preset.on_gpu:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, folder / "adapter").merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(folder / "model")
    model.eval()
    by_name = {p.name: p for p in constitution}
    trajectories = [Trajectory(r["prompt"], r["initial"], [Step(by_name[s["principle"]], s["critique"], s["revision"])
                                                           for s in r["steps"]])
                    for r in agora.load_jsonl(folder / "trajectories.jsonl")]
    return model, tok, trajectories


# ------------------------------------------------------------------------------------------------- RL-CAI


@dataclass(frozen=True)
class RLCAIConfig:
    """Everything that determines an RL-CAI run on top of SL-CAI."""

    seed: int = 0
    pairs_per_prompt: int = 2
    """Pairs of SL-CAI replies per red-team request, labelled by the feedback model."""
    n_principles: int = 4
    """Principles each comparison is asked under (their probabilities are averaged)."""
    n_helpful_pairs: int = 1500
    """Helpfulness pairs on benign requests, labelled by the ground-truth annotator."""
    pm_steps: int = 100
    pm_batch_size: int = 32
    pm_lr: float = 1e-3
    n_benign_prompts: int = 300
    """Benign requests in PPO's prompt set, beside the red-team requests."""
    ppo_steps: int = 16
    ppo_batch_size: int = 32
    ppo_mini_batch_size: int = 16
    kl_coef: float = 0.6
    """beta in r = r_PM - beta * KL (fixed). Smaller values let the policy drift toward one reply for everything."""
    lr: float = 3e-3


def preference_pairs_from(model, tokenizer, prompts: Sequence[str], *, fmt=None, seed: int = 0,
                          max_new_tokens: int = 24) -> tuple[list[str], list[str]]:
    """Two sampled replies per prompt: the pairs the feedback model labels."""
    out = sample(model, tokenizer, prompts, n_samples=2, fmt=fmt, max_new_tokens=max_new_tokens, seed=seed)
    return [o[0] for o in out], [o[1] for o in out]


def log_sameness(step: int, stats: dict, batch: dict) -> None:
    """PPO callback: ``top_reply_share``, the share of the batch's replies that are its most common reply (one
    boilerplate reply for every request shows as a share near 1), and ``distinct_replies``."""
    from collections import Counter

    counts = Counter(batch["responses"])
    stats["top_reply_share"] = counts.most_common(1)[0][1] / len(batch["responses"])
    stats["distinct_replies"] = len(counts) / len(batch["responses"])


def build_rl_cai(preset: Preset | str = "local", config: RLCAIConfig = RLCAIConfig(),
                 sl_config: SLCAIConfig = SLCAIConfig(), *, constitution: Sequence[Principle] = CONSTITUTION,
                 progress: bool = True) -> Path:
    """Run RLAIF and RL-CAI once and cache them: AI labels on pairs of SL-CAI replies, a preference model on
    those soft labels plus helpfulness labels, and PPO (:func:`helpers.rlhf.train_ppo`) from the SL-CAI model
    with the preference model's score as the reward. The folder holds the labelled pairs, the preference model,
    the PPO policy and ``report.json``."""
    from . import rlhf

    preset = PRESETS[preset] if isinstance(preset, str) else preset

    def builder(tmp: Path) -> None:
        t0 = time.perf_counter()
        policy, tok, _ = load_sl_cai(preset, sl_config, constitution=constitution)
        cai_model, cai_tok, fmt = load_cai_model(preset)
        red, _ = red_team_prompts(sl_config.seed)
        prompts = [p for p in red for _ in range(config.pairs_per_prompt)]
        a, b = preference_pairs_from(policy, tok, prompts, fmt=fmt if preset.on_gpu else None, seed=config.seed)
        p_a = ai_labels(cai_model, cai_tok, prompts, a, b, constitution=constitution,
                        n_principles=config.n_principles, fmt=fmt, seed=config.seed)
        labelled = [{"prompt": p, "a": x, "b": y, "p_a": float(q)} for p, x, y, q in zip(prompts, a, b, p_a)]
        agora.save_jsonl(tmp / "ai_labels.jsonl", labelled)
        pm = new_preference_model(preset, seed=config.seed)
        history = train_preference_model(pm, labelled + helpfulness_pairs(config.n_helpful_pairs, config.seed),
                                         steps=config.pm_steps, batch_size=config.pm_batch_size, lr=config.pm_lr,
                                         seed=config.seed, progress=progress)
        trained = {n for n, p in pm.named_parameters() if p.requires_grad} | {n for n, _ in pm.named_buffers()}
        torch.save({k: v.cpu() for k, v in pm.state_dict().items() if k in trained}, tmp / "preference_model.pt")
        ppo_config = rlhf.PPOConfig(steps=config.ppo_steps, batch_size=config.ppo_batch_size,
                                    mini_batch_size=config.ppo_mini_batch_size, init_kl_coef=config.kl_coef,
                                    lr=config.lr, max_new_tokens=sl_config.max_new_tokens, seed=config.seed)
        ppo_prompts = red + benign_prompts(config.n_benign_prompts, seed=1000 + config.seed)
        result = rlhf.train_ppo(rlhf.make_policy(policy, ppo_config), tok, ppo_prompts, pm.score, ppo_config,
                                callbacks=[log_sameness], progress=progress)
        rlhf.save_policy(result.policy, tmp / "policy")
        (tmp / "report.json").write_text(json.dumps({
            "pm_history": history, "ppo_history": result.history,
            "seconds": round(time.perf_counter() - t0, 1)}, indent=1))

    return cache.build_once("cai", f"rl-cai-{preset.name}", _key(preset, constitution, rl_cai=config, sl_cai=sl_config),
                            builder, version=FORMAT_VERSION)


def load_rl_cai(preset: Preset | str = "local", config: RLCAIConfig = RLCAIConfig(),
                sl_config: SLCAIConfig = SLCAIConfig(), *, constitution: Sequence[Principle] = CONSTITUTION) -> dict:
    """RL-CAI's results (built on first use): ``policy`` (a :class:`helpers.rlhf.PolicyWithValueHead`),
    ``tokenizer``, ``preference_model``, ``ai_labels`` (the labelled pairs) and ``report``."""
    from . import rlhf

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    folder = build_rl_cai(preset, config, sl_config, constitution=constitution)
    sl_model, tok, _ = load_sl_cai(preset, sl_config, constitution=constitution)
    with warnings.catch_warnings():  # peft asks transformers about a renamed attribute; nothing to act on
        warnings.simplefilter("ignore", FutureWarning)
        policy = rlhf.load_policy(sl_model, folder / "policy")
    pm = new_preference_model(preset, seed=config.seed)
    pm.load_state_dict(torch.load(folder / "preference_model.pt", map_location=preset.device, weights_only=True),
                       strict=False)  # what training changed; the frozen body comes from the zoo
    pm.eval()
    return {"policy": policy, "tokenizer": tok, "preference_model": pm,
            "ai_labels": agora.load_jsonl(folder / "ai_labels.jsonl"),
            "report": json.loads((folder / "report.json").read_text())}
