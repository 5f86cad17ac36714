"""Alignment in simulated societies, part 1: the Stable Alignment sandbox and its rating-margin loss (week 7).

Stable Alignment (Liu et al. 2023, "Training Socially Aligned Language Models in Simulated Human Society",
https://arxiv.org/abs/2305.16960) aligns a model on data recorded in a simulated society instead of training a
reward model. This module has the two halves:

1. **The sandbox.** Agents stand on a grid; each is ``good`` or ``bad`` (settings: ``all_good``, ``all_bad``,
   ``half_half`` (the upper triangle good), ``mixed`` (half good, placed at random)). In each round every agent
   answers an Agora question (a draft, recalled from its memory of similar earlier questions when it has one),
   sends the draft to neighbours within a radius (*back-scatter*), receives a 1-7 rating with reasons from
   each, and revises. An observer scores the alignment of the draft and of the revision. The run logs the three
   kinds of alignment data: **imitation** (question -> revised answer), **self-critique** (question + answer ->
   rating and reasons) and **realignment** (question + draft + feedback -> revision).
2. **The loss.** For one question with responses ``y_1..y_K`` rated ``r_1..r_K`` and per-token NLLs ``l_k``,
   with ``b`` the best-rated response::

       loss = l_b + ratio * max(0, mean_{k != b} [ l_b - l_k + margin * (r_b - r_k) / rating_scale ])

   (``max_flow=True`` takes the max over comparisons instead of the mean). The NLL of the best response is
   SFT; the hinge pushes every worse response's NLL above the best's by a margin that grows with the rating gap.

How this differs from the paper and its code (github.com/agi-templar/Stable-Alignment), and why:

- Agents are not language models. An agent answers in the Agora's response *styles* (good agents: correct,
  refusal, Socratic; bad agents: harmful, wrong, flattering, evasive); ratings come from an Agora
  :class:`~helpers.agora.Persona` (good raters are ``balanced``, bad raters ``helpful_only``, which does not
  mind harm) and reasons from the ground-truth scores; revision moves toward the styles of neighbours whose own
  answers were rated well (their *reputation*), with a little exploration. This keeps the simulation to pure
  Python (a second per run) while the data it writes trains a real language model.
- The observer is the Agora's ground truth (the ``balanced`` persona) on the 1-7 scale, to one decimal (the
  paper's observer is a second LLM giving whole numbers; ties between a plain and a flattering correct answer
  would make flattery "best" half of the time).
- The reference loss (``AlignmentTrainer.stable_alignment``) works for a batch of one question only (its
  collator keeps only the last question's responses, its ratings are squeezed across the batch) and, in the
  margin, indexes the *sorted* ratings with an *unsorted* index. :func:`stable_alignment_loss` takes any batch
  of questions, each with its own number of responses (a mask), uses each response's own rating, and averages
  the per-question losses. Like the reference, it clamps the aggregate (``max(0, mean)``), not each term.
- Each training batch holds the best-rated response of every question and up to ``num_comp - 1`` others at
  random (the reference samples all ``num_comp`` at random), so that the SFT baseline (``ratio = 0``) is plain
  imitation of the best-rated answers and the two runs differ only by the hinge.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import agora, cache, lm

SETTINGS = ("all_good", "all_bad", "half_half", "mixed")
"""How the grid is populated (the paper's ``all_good``, ``all_bad``, ``half_half``, ``mixed_half_half``)."""

GOOD_STYLES = {"correct": 0.75, "socratic": 0.2, "refusal": 0.05}
"""A good agent's styles; on harmful questions ``correct`` does not apply and becomes ``refusal``."""
BAD_STYLES = {"harmful": 0.35, "wrong": 0.3, "flattering": 0.2, "evasive": 0.15}
"""A bad agent's styles; on harmless questions ``harmful`` does not apply and the rest share its weight."""
RATER_PERSONA = {"good": "balanced", "bad": "helpful_only"}
"""Whose values an agent rates with: bad agents value helpfulness and do not mind harm."""
OBSERVER_PERSONA = "balanced"
RATING_SCALE = 7


# ------------------------------------------------------------------------------------------------- ratings


def persona_range(persona: agora.Persona) -> tuple[float, float]:
    """The utilities that map to the bottom and top of a persona's scale.

    Bottom: a reply that is harmless but neither helpful nor honest (all the persona gets is its harmlessness
    weight). Top: helpful, harmless, honest and Socratic at once. Length is not part of the range.
    """
    lo = persona.harmless
    hi = persona.helpful + persona.harmless + persona.honest + persona.socratic
    return lo, hi


def rating_value(persona: agora.Persona | str, prompt: agora.Prompt | str, response: str) -> float:
    """``persona``'s utility of ``response`` placed on the 1-7 scale by :func:`persona_range` (clipped)."""
    persona = agora.PERSONAS[persona] if isinstance(persona, str) else persona
    lo, hi = persona_range(persona)
    u = persona.utility(agora.score(prompt, response))
    return min(float(RATING_SCALE), max(1.0, 1 + (RATING_SCALE - 1) * (u - lo) / (hi - lo)))


def rating_of(persona: agora.Persona | str, prompt: agora.Prompt | str, response: str, *,
              noise: float = 0.0, rng: random.Random | None = None) -> int:
    """A neighbour's whole-number 1-7 rating of ``response``: :func:`rating_value` plus noise, rounded."""
    x = rating_value(persona, prompt, response)
    if noise > 0:
        x += (rng or random).gauss(0.0, noise)
    return int(min(RATING_SCALE, max(1, round(x))))


def observer_rating(prompt: agora.Prompt | str, response: str) -> float:
    """The observer's 1-7 alignment rating: the ground truth (``balanced`` persona), no noise, to 0.1.

    Finer than the paper's whole numbers, so that a flattering correct answer (5.5) does not tie with a plain
    correct one (6.3) and become the "best" answer half of the time.
    """
    return round(rating_value(OBSERVER_PERSONA, prompt, response), 1)


def reasons(persona: agora.Persona | str, prompt: agora.Prompt | str, response: str, k: int = 2) -> str:
    """Why ``persona`` rates ``response`` as it does: the ``k`` observations that move its utility most."""
    persona = agora.PERSONAS[persona] if isinstance(persona, str) else persona
    p = prompt if isinstance(prompt, agora.Prompt) else agora.world(0).parse(prompt)
    s = agora.score(p, response)
    text = response.lower()
    seen = []  # (phrase, signed effect on this persona's utility)
    if s.harmless == 0:
        seen.append(("it explains how to hurt someone", -persona.harmless))
    if agora.is_refusal(response):
        if p.kind == "harmful":
            seen.append(("it declines to help with harm", 0.7 * persona.harmless - 0.7 * persona.helpful))
        else:
            seen.append(("it refuses a harmless question", -persona.helpful))
    elif s.helpful >= 0.8:
        seen.append(("it answers what was asked", persona.helpful * s.helpful))
    elif s.helpful <= 0.1:
        seen.append(("it does not answer the question", -persona.helpful))
    if s.honest <= 0.2:
        seen.append(("it says something false", -persona.honest))
    if any(m in text for m in agora.FLATTERY_MARKS):
        seen.append(("it flatters instead of informing", -0.3 * persona.honest))
    if s.socratic >= 0.5:
        seen.append(("it makes the asker think with questions", persona.socratic * s.socratic))
    seen = [x for x in seen if abs(x[1]) > 1e-9]
    seen.sort(key=lambda x: -abs(x[1]))
    return "; ".join(phrase for phrase, _ in seen[:k]) or "nothing stands out"


# -------------------------------------------------------------------------------------------- back-scatter


def neighbour_mask(locations: torch.Tensor, center: int, radius: float,
                   active: torch.Tensor | None = None) -> torch.Tensor:
    """Which agents can give feedback to agent ``center``: (N, 2) grid locations -> (N,) bool.

    An agent is a neighbour when its Euclidean distance to ``center``'s location is at most ``radius``, it is
    active, and it is not ``center`` itself (as ``World._search_for_neighbors`` in the reference).
    """
    loc = locations.double()
    dist = (loc - loc[center]).pow(2).sum(-1).sqrt()  # (N,)
    mask = dist <= radius + 1e-9
    mask[center] = False
    if active is not None:
        mask &= active.bool()
    return mask


def back_scatter_targets(mask: torch.Tensor, n_targets: int, rng: random.Random) -> list[int]:
    """``n_targets`` neighbours drawn without replacement from ``mask`` (all of them when there are fewer)."""
    candidates = torch.nonzero(mask).flatten().tolist()
    if len(candidates) <= n_targets:
        return candidates
    return sorted(rng.sample(candidates, n_targets))


# ------------------------------------------------------------------------------------------------- sandbox


def pick_style(kind: str, weights: dict[str, float], rng: random.Random) -> str:
    """A style for a ``kind`` question from ``weights``, restricted to the styles that apply to that kind.

    On harmful questions ``correct`` means refusing. When no weighted style applies, any allowed style is drawn.
    """
    allowed = agora.STYLES_FOR_KIND[kind]
    w = dict(weights)
    if kind == "harmful":
        w["refusal"] = w.get("refusal", 0.0) + w.pop("correct", 0.0)
    mass = [max(0.0, w.get(s, 0.0)) for s in allowed]
    if sum(mass) <= 0:
        return rng.choice(allowed)
    return rng.choices(allowed, weights=mass)[0]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[\w']+", text.lower()))


def similarity(a: str, b: str) -> float:
    """Word-set Jaccard similarity of two questions (the sandbox's stand-in for embedding distance)."""
    wa, wb = _words(a), _words(b)
    return len(wa & wb) / max(1, len(wa | wb))


@dataclass
class Memory:
    """One remembered exchange: the question, and the (revised) answer the agent settled on."""

    question: str
    kind: str
    style: str
    answer: str


@dataclass(eq=False)
class Agent:
    """A member of the society: where it stands, what it values, how it tends to answer, what it remembers."""

    id: int
    location: tuple[int, int]
    label: str
    """``"good"`` or ``"bad"``: sets the initial styles and the persona it rates others with."""
    style_weights: dict[str, float]
    persona: agora.Persona
    memory: list[Memory] = field(default_factory=list)
    reputation: float = 4.0
    """Mean rating its latest draft received from its neighbours (starts at the middle of the scale)."""
    active: bool = True

    def recall(self, question: str, threshold: float) -> Memory | None:
        """The most similar earlier question (the latest among equals), if at least ``threshold`` similar."""
        best, best_sim = None, threshold
        for m in self.memory:
            sim = similarity(question, m.question)
            if sim >= best_sim:
                best, best_sim = m, sim
        return best


@dataclass(frozen=True)
class SandboxConfig:
    """One simulated society. Every field changes the run; the run is deterministic given them."""

    setting: str = "mixed"
    """``all_good``, ``all_bad``, ``half_half`` or ``mixed``."""
    grid_size: int = 8
    """Agents stand on a ``grid_size x grid_size`` grid, one per cell."""
    rounds: int = 6
    radius: float = 2.0
    """Back-scatter radius (Euclidean, in cells): who can be asked for feedback."""
    n_raters: int = 4
    """How many neighbours rate each draft (all of them when fewer are in reach)."""
    rater_noise: float = 0.5
    """Standard deviation of the noise on a rater's 1-7 scale before rounding."""
    keep_threshold: float = 5.0
    """A draft whose mean rating reaches this is kept as the revision."""
    imitation_temperature: float = 1.0
    """Softmax temperature over neighbours' reputations when choosing whose style to adopt."""
    explore: float = 0.1
    """Probability that a revision tries a random style instead (how a society can find what none of it does)."""
    learning_rate: float = 0.3
    """How far an agent's style weights move toward the style of its revision."""
    recall_threshold: float = 0.4
    """Word-overlap similarity above which an earlier question is recalled from memory."""
    memory_weight: float = 0.8
    """Probability of answering in the recalled answer's style when a similar question is remembered."""
    seed: int = 0
    world_seed: int = 0


@dataclass
class Feedback:
    rater: int
    rater_label: str
    rating: int
    reason: str


@dataclass
class Interaction:
    """One agent's turn in one round: the draft, the back-scattered feedback, the revision, the observer."""

    round: int
    agent: int
    label: str
    prompt: str
    kind: str
    draft: str
    draft_style: str
    recalled: str | None
    feedback: list[Feedback]
    revised: str
    revised_style: str
    observer_before: float
    observer_after: float

    @property
    def mean_rating(self) -> float:
        return sum(f.rating for f in self.feedback) / max(1, len(self.feedback))


def initial_labels(setting: str, grid_size: int, rng: random.Random) -> list[str]:
    """Labels in row-major order for a ``setting`` (as ``World._set_up_layout`` in the reference)."""
    n = grid_size * grid_size
    if setting == "all_good":
        return ["good"] * n
    if setting == "all_bad":
        return ["bad"] * n
    if setting == "half_half":  # the upper triangle (row <= col) good, up to half of the agents
        labels, good = [], 0
        for row in range(grid_size):
            for col in range(grid_size):
                is_good = row <= col and good < n // 2
                good += is_good
                labels.append("good" if is_good else "bad")
        return labels
    if setting == "mixed":
        labels = ["good"] * (n // 2) + ["bad"] * (n - n // 2)
        rng.shuffle(labels)
        return labels
    raise ValueError(f"unknown setting {setting!r}; choose one of {', '.join(SETTINGS)}")


NeighbourFn = Callable[[torch.Tensor, int, float, torch.Tensor], torch.Tensor]


class Sandbox:
    """A society on a grid that answers, rates, revises and remembers; see the module docstring."""

    def __init__(self, config: SandboxConfig = SandboxConfig(), *, neighbour_fn: NeighbourFn | None = None):
        if config.setting not in SETTINGS:
            raise ValueError(f"unknown setting {config.setting!r}; choose one of {', '.join(SETTINGS)}")
        self.config = config
        self.world = agora.world(config.world_seed)
        self.neighbour_fn = neighbour_fn or neighbour_mask
        self.rng = random.Random(f"sandbox-{config.setting}-{config.seed}")
        labels = initial_labels(config.setting, config.grid_size, self.rng)
        self.agents = []
        for i, label in enumerate(labels):
            row, col = divmod(i, config.grid_size)
            styles = GOOD_STYLES if label == "good" else BAD_STYLES
            self.agents.append(Agent(i, (row, col), label, dict(styles), agora.PERSONAS[RATER_PERSONA[label]]))
        self.locations = torch.tensor([a.location for a in self.agents])  # (N, 2)
        self.log: list[Interaction] = []
        self.rounds_done = 0

    # -- one interaction, step by step

    def neighbour_mask(self, agent: Agent) -> torch.Tensor:
        """(N,) bool: who is in reach of ``agent`` (by ``neighbour_fn``, :func:`neighbour_mask` by default)."""
        active = torch.tensor([a.active for a in self.agents])
        mask = self.neighbour_fn(self.locations.clone(), agent.id, float(self.config.radius), active.clone())
        if not isinstance(mask, torch.Tensor) or mask.shape != (len(self.agents),):
            raise ValueError(f"the neighbour function must return a ({len(self.agents)},) bool tensor")
        return mask.bool()

    def neighbours(self, agent: Agent) -> list[Agent]:
        return [self.agents[i] for i in torch.nonzero(self.neighbour_mask(agent)).flatten().tolist()]

    def draft(self, agent: Agent, prompt: agora.Prompt, rng: random.Random) -> tuple[str, str, str | None]:
        """The agent's first answer: in a remembered answer's style when it recalls a similar question."""
        memory = agent.recall(prompt.question, self.config.recall_threshold)
        if (memory is not None and memory.style in agora.STYLES_FOR_KIND[prompt.kind]
                and rng.random() < self.config.memory_weight):
            style = memory.style
        else:
            style = pick_style(prompt.kind, agent.style_weights, rng)
        return style, self.world.respond(prompt, style, rng), memory.question if memory else None

    def feedback(self, rater: Agent, prompt: agora.Prompt, answer: str, rng: random.Random) -> Feedback:
        """A neighbour's rating (1-7, with noise) and its reasons, by the values of its own persona."""
        rating = rating_of(rater.persona, prompt, answer, noise=self.config.rater_noise, rng=rng)
        return Feedback(rater.id, rater.label, rating, reasons(rater.persona, prompt, answer))

    def revise(self, agent: Agent, prompt: agora.Prompt, style: str, answer: str, feedback: list[Feedback],
               rng: random.Random) -> tuple[str, str]:
        """Keep a well-rated draft; otherwise answer again in the style of a well-regarded neighbour.

        The neighbour is drawn with probability ``softmax(reputation / temperature)`` among those who gave
        feedback, and it answers as it would itself; with probability ``explore`` a random style is tried.
        """
        c = self.config
        if not feedback:
            return style, answer
        mean = sum(f.rating for f in feedback) / len(feedback)
        if mean >= c.keep_threshold:
            return style, answer
        if rng.random() < c.explore:
            new_style = rng.choice(agora.STYLES_FOR_KIND[prompt.kind])
        else:
            raters = [self.agents[f.rater] for f in feedback]
            logits = [r.reputation / c.imitation_temperature for r in raters]
            top = max(logits)
            weights = [math.exp(x - top) for x in logits]
            model = rng.choices(raters, weights=weights)[0]
            new_style = pick_style(prompt.kind, model.style_weights, rng)
        return new_style, self.world.respond(prompt, new_style, rng)

    def interact(self, agent: Agent, prompt: agora.Prompt, round_: int, rng: random.Random) -> Interaction:
        """Draft, back-scatter, revise, observe, remember (one agent, one question)."""
        c = self.config
        style, draft, recalled = self.draft(agent, prompt, rng)
        targets = back_scatter_targets(self.neighbour_mask(agent), c.n_raters, rng)
        feedback = [self.feedback(self.agents[t], prompt, draft, rng) for t in targets]
        new_style, revised = self.revise(agent, prompt, style, draft, feedback, rng)
        if feedback:
            agent.reputation = sum(f.rating for f in feedback) / len(feedback)
        # The agent leans toward the style it settled on, and remembers the exchange. Refusing a harmful
        # request counts as "correct" (doing the right thing), so it does not teach refusing harmless ones.
        for s in agent.style_weights:
            agent.style_weights[s] *= 1 - c.learning_rate
        key = "correct" if (new_style == "refusal" and prompt.kind == "harmful") else new_style
        agent.style_weights[key] = agent.style_weights.get(key, 0.0) + c.learning_rate
        agent.memory.append(Memory(prompt.question, prompt.kind, new_style, revised))
        return Interaction(round_, agent.id, agent.label, prompt.text, prompt.kind, draft, style, recalled, feedback,
                           revised, new_style, observer_rating(prompt, draft), observer_rating(prompt, revised))

    def run_round(self) -> list[Interaction]:
        """Every active agent, in random order, answers one fresh question."""
        r = self.rounds_done
        rng = random.Random(f"sandbox-round-{self.config.setting}-{self.config.seed}-{r}")
        order = [a for a in self.agents if a.active]
        rng.shuffle(order)
        out = [self.interact(a, self.world.sample_prompt(rng), r, rng) for a in order]
        self.log.extend(out)
        self.rounds_done += 1
        return out

    def run(self, rounds: int | None = None, *, progress: bool = False) -> list[Interaction]:
        from tqdm.auto import tqdm

        n = self.config.rounds if rounds is None else rounds
        for _ in tqdm(range(n), desc=f"sandbox {self.config.setting}", disable=not progress, leave=False,
                      file=sys.stdout):
            self.run_round()
        return self.log


def alignment_by_round(log: Sequence[Interaction]) -> dict[str, list[float]]:
    """Mean observer rating of drafts (``before``) and revisions (``after``) per round."""
    rounds = sorted({x.round for x in log})
    before = [sum(x.observer_before for x in log if x.round == r) / sum(1 for x in log if x.round == r)
              for r in rounds]
    after = [sum(x.observer_after for x in log if x.round == r) / sum(1 for x in log if x.round == r)
             for r in rounds]
    return {"round": rounds, "before": before, "after": after}


def format_feedback(feedback: Sequence[Feedback]) -> str:
    return " | ".join(f"Rating: {f.rating}. Reason: {f.reason}." for f in feedback)


def alignment_data(log: Sequence[Interaction]) -> dict[str, list[dict]]:
    """The three kinds of alignment data a run records (Stable Alignment section 3.2).

    - ``imitation``: the question and the answer the society settled on (``prompt``, ``response``), with the
      observer's rating of it;
    - ``self_critique``: the question and a draft (``prompt``, ``response``) and one neighbour's ``critique``
      ("Rating: 3. Reason: ..."), one record per rating;
    - ``realignment``: the question, the draft, the feedback it drew, and the ``revised`` answer; only when the
      revision changed the draft.
    """
    imitation, critique, realign = [], [], []
    for x in log:
        imitation.append({"prompt": x.prompt, "response": x.revised, "rating": x.observer_after,
                          "kind": x.kind, "style": x.revised_style})
        for f in x.feedback:
            critique.append({"prompt": x.prompt, "response": x.draft,
                             "critique": f"Rating: {f.rating}. Reason: {f.reason}.", "rating": f.rating})
        if x.revised != x.draft:
            realign.append({"prompt": x.prompt, "draft": x.draft, "feedback": format_feedback(x.feedback),
                            "revised": x.revised, "rating_before": x.observer_before,
                            "rating_after": x.observer_after})
    return {"imitation": imitation, "self_critique": critique, "realignment": realign}


def realignment_text(record: dict) -> str:
    """A realignment record as one training dialogue: draft, feedback, then the revision to learn."""
    question = record["prompt"].removeprefix("User:").split("\nAssistant:")[0].strip()
    return (f"User: {question}\nAssistant:{record['draft']}\nUser: Feedback: {record['feedback']} "
            f"Please revise your answer.\nAssistant:{record['revised']}")


def comparison_groups(log: Sequence[Interaction], *, exclude_prompts: Sequence[str] = ()) -> list[dict]:
    """Every distinct answer a question received (drafts and revisions) with its observer rating.

    Returns ``[{prompt, responses, ratings}]``, one per question, sorted by prompt; questions in
    ``exclude_prompts`` (held-out evaluation prompts) are left out.
    """
    exclude = set(exclude_prompts)
    by: dict[str, dict[str, float]] = {}
    for x in log:
        if x.prompt in exclude:
            continue
        seen = by.setdefault(x.prompt, {})
        seen[x.draft] = x.observer_before
        seen[x.revised] = x.observer_after
    return [{"prompt": p, "responses": list(r), "ratings": [float(v) for v in r.values()]}
            for p, r in sorted(by.items())]


HELDOUT_KINDS = ("arithmetic", "fact", "harmful")
"""Kinds with enough distinct questions to hold some out. The Agora asks only 8 advice and 7 philosophy
questions, and a society meets them all; holding one out would test a topic the model never saw answered."""


def heldout_questions(log: Sequence[Interaction], *, test_frac: float = 0.25, seed: int = 0,
                      kinds: Sequence[str] = HELDOUT_KINDS) -> set[str]:
    """Prompts to keep out of training: a ``test_frac`` share of the distinct questions of each of ``kinds``."""
    by_kind: dict[str, list[str]] = {}
    for x in log:
        if x.kind in kinds:
            by_kind.setdefault(x.kind, [])
            if x.prompt not in by_kind[x.kind]:
                by_kind[x.kind].append(x.prompt)
    rng = random.Random(f"heldout-{seed}")
    out = set()
    for kind in sorted(by_kind):
        texts = sorted(by_kind[kind])
        rng.shuffle(texts)
        out.update(texts[:math.ceil(test_frac * len(texts))] if len(texts) > 1 else [])
    return out


def eval_prompts(heldout: set[str], n: int, *, seed: int = 0, world_seed: int = 0) -> list[agora.Prompt]:
    """``n`` Agora prompts, kinds uniform as usual; questions of a kind that has held-out questions are drawn
    only among those, other kinds (advice, philosophy) from all of theirs."""
    w, rng = agora.world(world_seed), random.Random(f"eval-prompts-{seed}")
    by_kind: dict[str, list[str]] = {}
    for text in sorted(heldout):
        by_kind.setdefault(w.parse(text).kind, []).append(text)
    out = []
    for _ in range(n):
        kind = rng.choice(agora.KINDS)
        out.append(w.parse(rng.choice(by_kind[kind])) if kind in by_kind else w.sample_prompt(rng, [kind]))
    return out


# ---------------------------------------------------------------------------------------------------- loss


def stable_alignment_loss(nll: torch.Tensor, ratings: torch.Tensor, mask: torch.Tensor | None = None, *,
                          margin: float = 1.0, rating_scale: float = 7.0, ratio: float = 0.5,
                          max_flow: bool = False, return_stats: bool = False):
    """The stable-alignment loss for a batch of questions, each with up to ``K`` rated responses.

    ==========  =========  ======================================================================
    argument    shape      meaning
    ==========  =========  ======================================================================
    nll         (B, K)     mean per-token negative log-likelihood of each response
    ratings     (B, K)     its rating (higher is better; e.g. 1-7)
    mask        (B, K)     1 where a response exists (questions have different numbers); None: all
    ==========  =========  ======================================================================

    Per question, with ``b`` the best-rated valid response (the first one on ties) and ``k`` each other
    valid response: ``d_k = nll_b - nll_k + margin * (r_b - r_k) / rating_scale``;
    ``penalty = max(0, mean_k d_k)`` (``max_k`` when ``max_flow``), 0 when there is nothing to compare;
    ``loss = nll_b + ratio * penalty``. Returns the mean over questions (and a stats dict if ``return_stats``).
    Naive equivalent: loop over questions and apply the reference's batch-of-one formula to each.
    """
    if nll.dim() != 2 or nll.shape != ratings.shape:
        raise ValueError(f"nll and ratings must both be (B, K), got {tuple(nll.shape)} and {tuple(ratings.shape)}")
    mask = torch.ones_like(nll, dtype=torch.bool) if mask is None else mask.bool()
    if not mask.any(-1).all():
        raise ValueError("every question needs at least one response (a row of the mask is all zero)")
    r = ratings.float().masked_fill(~mask, float("-inf"))
    best = r.argmax(-1, keepdim=True)  # (B, 1): the first maximum
    best_nll = nll.gather(-1, best)  # (B, 1)
    best_r = ratings.float().gather(-1, best)
    others = mask.clone()
    others.scatter_(-1, best, False)  # (B, K): the valid responses compared with the best
    d = best_nll - nll + margin * (best_r - ratings.float()) / rating_scale  # (B, K)
    n_cmp = others.sum(-1)  # (B,)
    if max_flow:
        agg = d.masked_fill(~others, float("-inf")).max(-1).values
    else:
        agg = d.masked_fill(~others, 0.0).sum(-1) / n_cmp.clamp(min=1)
    penalty = torch.where(n_cmp > 0, agg.clamp(min=0), torch.zeros_like(agg))  # (B,)
    per_question = best_nll.squeeze(-1) + ratio * penalty
    loss = per_question.mean()
    if not return_stats:
        return loss
    stats = {"best_nll": best_nll.mean().item(), "penalty": penalty.mean().item(),
             "hinge_active": (penalty > 0).float().mean().item(),
             "worse_nll": (nll.detach().masked_fill(~others, 0).sum() / others.sum().clamp(min=1)).item()}
    return loss, stats


def response_nll(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *,
                 max_len: int = 128) -> torch.Tensor:
    """Mean per-token NLL of each ``response`` (plus end-of-sequence) after its ``prompt``: (N,), with grad.

    Right-padded batch; the prompt and padding are masked out, as the reference's ``IGNORE_INDEX`` labels.
    """
    eos = tokenizer.eos_token
    rows, masks = [], []
    for p, r in zip(prompts, responses):
        pi = tokenizer(p)["input_ids"]
        ri = tokenizer(r + eos)["input_ids"]
        ids = (pi + ri)[:max_len]
        rows.append(ids)
        masks.append(([0] * len(pi) + [1] * len(ri))[:max_len])
    width = max(len(x) for x in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (width - len(x)) for x in rows])  # (N, T)
    attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in rows])
    resp = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    device = next(model.parameters()).device
    lp = lm.sequence_logprobs(model, input_ids.to(device), attention.to(device), resp.to(device))  # (N, T-1)
    n_tok = resp[:, 1:].sum(-1).clamp(min=1).to(lp.device)
    return -lp.sum(-1) / n_tok


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Stable alignment (``ratio > 0``) or plain SFT on the best-rated responses (``ratio = 0``)."""

    ratio: float = 0.5
    """Weight of the rating-margin hinge; 0 gives SFT on the best-rated response of each question."""
    margin: float = 1.0
    rating_scale: float = 7.0
    max_flow: bool = False
    start: str = "base"
    """Which tiny model to start from: ``base`` (every style) or ``sft`` (the helpful assistant)."""
    steps: int = 100
    questions_per_batch: int = 8
    num_comp: int = 4
    """Responses per question per step: the best-rated one and up to ``num_comp - 1`` others at random."""
    lr: float = 1e-3
    seed: int = 0


def make_batch(groups: Sequence[dict], rows: Sequence[int], num_comp: int, rng: random.Random):
    """Prompts, responses and (Q, K) ratings and mask for the questions ``rows`` of ``groups``."""
    prompts, responses, ratings, mask = [], [], [], []
    for i in rows:
        g = groups[i]
        order = list(range(len(g["responses"])))
        top = max(g["ratings"])
        best = rng.choice([j for j in order if g["ratings"][j] == top])
        rest = [j for j in order if j != best]
        chosen = [best] + rng.sample(rest, min(len(rest), num_comp - 1))
        ratings.append([g["ratings"][j] for j in chosen] + [0.0] * (num_comp - len(chosen)))
        mask.append([True] * len(chosen) + [False] * (num_comp - len(chosen)))
        for j in chosen:
            prompts.append(g["prompt"])
            responses.append(g["responses"][j])
    return prompts, responses, torch.tensor(ratings), torch.tensor(mask)


def train_policy(model, tokenizer, groups: Sequence[dict], config: TrainConfig, *, progress: bool = True,
                 desc: str = "train") -> list[dict]:
    """Train ``model`` in place on comparison ``groups`` with :func:`stable_alignment_loss`; returns the history."""
    from tqdm.auto import tqdm

    if not groups:
        raise ValueError("no training data: the comparison groups are empty")
    rng = random.Random(f"train-{config.seed}")
    torch.manual_seed(config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    model.train()
    history = []
    for step in tqdm(range(config.steps), desc=desc, disable=not progress, leave=False, file=sys.stdout):
        rows = rng.sample(range(len(groups)), min(config.questions_per_batch, len(groups)))
        prompts, responses, ratings, mask = make_batch(groups, rows, config.num_comp, rng)
        if config.ratio > 0:
            flat = response_nll(model, tokenizer, prompts, responses)  # (n_valid,)
        else:  # SFT: only the best responses (first of each row) need a gradient
            first = torch.zeros_like(mask)
            first[:, 0] = True
            is_best = first[mask].tolist()
            best = response_nll(model, tokenizer, [p for p, b in zip(prompts, is_best) if b],
                                [r for r, b in zip(responses, is_best) if b])
            with torch.no_grad():
                rest = response_nll(model, tokenizer, [p for p, b in zip(prompts, is_best) if not b],
                                    [r for r, b in zip(responses, is_best) if not b]) if not all(is_best) else best[:0]
            flat = torch.zeros(len(is_best), dtype=best.dtype, device=best.device)
            flat = flat.masked_scatter(torch.tensor(is_best, device=best.device), best)
            flat = flat.masked_scatter(~torch.tensor(is_best, device=best.device), rest)
        nll = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
        nll = nll.masked_scatter(mask.to(flat.device), flat)  # (Q, K), row-major fill matches make_batch
        loss, stats = stable_alignment_loss(nll, ratings.to(flat.device), mask.to(flat.device),
                                            margin=config.margin, rating_scale=config.rating_scale,
                                            ratio=config.ratio, max_flow=config.max_flow, return_stats=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append({"step": step, "loss": loss.item(), **stats})
    model.eval()
    return history


FORMAT_VERSION = 1


def data_key(value) -> str:
    """A short hash of JSON-serialisable data (part of a cached artifact's configuration)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def group_nll(model, tokenizer, groups: Sequence[dict], *, batch_size: int = 64) -> list[list[float]]:
    """Mean per-token NLL of every response of every group under ``model`` (no gradient)."""
    pairs = [(g["prompt"], r) for g in groups for r in g["responses"]]
    flat = []
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            flat += response_nll(model, tokenizer, [p for p, _ in chunk], [r for _, r in chunk]).tolist()
    out, i = [], 0
    for g in groups:
        out.append(flat[i:i + len(g["responses"])])
        i += len(g["responses"])
    return out


def sample_replies(model, tokenizer, prompts: Sequence[agora.Prompt], *, samples: int, temperature: float,
                   max_new_tokens: int, seed: int, progress: bool = False) -> list[list[str]]:
    """``samples`` replies to each prompt: a list per prompt."""
    texts = [p.text for p in prompts for _ in range(samples)]
    roll = lm.generate(model, tokenizer, texts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       progress=progress)
    return [roll.responses[i * samples:(i + 1) * samples] for i in range(len(prompts))]


def compare_training(preset, groups: Sequence[dict], prompts: Sequence[agora.Prompt],
                     configs: dict[str, TrainConfig], *, heldout_groups: Sequence[dict] = (), samples: int = 2,
                     temperature: float = 0.7, seed: int = 0, progress: bool = True) -> dict:
    """Train one model per config on ``groups``, then evaluate each and its starting model; built once, cached.

    For every model (``"start:<which>"`` for the starting points): ``replies`` to ``prompts`` (``samples`` each,
    sampled at ``temperature``) and ``heldout_nll``, the NLL of every response in ``heldout_groups``. Returns
    ``{"histories", "replies", "heldout_nll", "path"}``; the trained models are saved under ``path / name``
    (:func:`load_trained`). On GPU presets the hub model is trained with a LoRA adapter of rank ``preset.lora_r``.
    """
    from . import zoo

    key = {"configs": {k: dataclasses.asdict(v) for k, v in configs.items()}, "data": data_key(list(groups)),
           "prompts": data_key([p.text for p in prompts]), "heldout": data_key(list(heldout_groups)),
           "samples": samples, "temperature": temperature, "seed": seed, "preset": preset.name,
           "max_new_tokens": preset.max_new_tokens, "model": preset.model_id or zoo.TinyConfig().key()}

    def evaluate(model, tok):
        replies = sample_replies(model, tok, prompts, samples=samples, temperature=temperature,
                                 max_new_tokens=preset.max_new_tokens, seed=seed, progress=progress)
        return replies, group_nll(model, tok, heldout_groups) if heldout_groups else []

    def builder(tmp: Path) -> None:
        out = {"histories": {}, "replies": {}, "heldout_nll": {}}
        for start in sorted({c.start for c in configs.values()}):
            model, tok = zoo.load(preset, start)
            out["replies"][f"start:{start}"], out["heldout_nll"][f"start:{start}"] = evaluate(model, tok)
        for name, config in configs.items():
            model, tok = zoo.load(preset, config.start)
            if preset.on_gpu:
                model = _with_lora(model, preset)
            out["histories"][name] = train_policy(model, tok, groups, config, progress=progress,
                                                  desc=f"train {name}")
            model.save_pretrained(tmp / name)
            out["replies"][name], out["heldout_nll"][name] = evaluate(model, tok)
        (tmp / "results.json").write_text(json.dumps(out))

    path = cache.build_once("social", f"sa-vs-sft-{preset.name}", key, builder, version=FORMAT_VERSION)
    result = json.loads((path / "results.json").read_text())
    result["path"] = str(path)
    return result


def load_trained(preset, result: dict, name: str, start: str = "base"):
    """A model trained by :func:`compare_training` (``name`` as in its configs) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    from . import zoo

    model, tok = zoo.load(preset, start)
    folder = Path(result["path"]) / name
    if preset.on_gpu:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model, tok


def _with_lora(model, preset):
    from peft import LoraConfig, get_peft_model

    from . import zoo

    config = LoraConfig(r=preset.lora_r, lora_alpha=2 * preset.lora_r, lora_dropout=0.0,
                        target_modules=zoo.lora_target_modules(model), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


# -------------------------------------------------------------------------------------------- evaluation


def score_replies(prompts: Sequence[agora.Prompt], replies: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Ground-truth alignment per prompt, averaged over its replies: ``true_reward`` (balanced persona, no
    length bias), ``observer`` (1-7) and ``harmful`` (share of replies that describe a harmful act)."""
    out = {"true_reward": [], "observer": [], "harmful": []}
    for p, rs in zip(prompts, replies):
        out["true_reward"].append(sum(agora.true_reward(p, r) for r in rs) / len(rs))
        out["observer"].append(sum(observer_rating(p, r) for r in rs) / len(rs))
        out["harmful"].append(sum(agora.is_harmful(r) for r in rs) / len(rs))
    return out


def nll_gap(groups: Sequence[dict], nll: Sequence[Sequence[float]]) -> list[float]:
    """Per group: mean NLL of the responses rated below the best minus the best's NLL (higher: better separated).

    Groups whose responses all share one rating are skipped.
    """
    out = []
    for g, n in zip(groups, nll):
        top = max(g["ratings"])
        best = [x for x, r in zip(n, g["ratings"]) if r == top]
        worse = [x for x, r in zip(n, g["ratings"]) if r < top]
        if worse:
            out.append(sum(worse) / len(worse) - sum(best) / len(best))
    return out


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items and its percentile bootstrap interval: (mean, low, high)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples must have the same, non-zero length; got {len(a)} and {len(b)}")
    diff = torch.tensor([x - y for x, y in zip(a, b)], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(diff), (n_boot, len(diff)), generator=g)
    means = diff[idx].mean(-1).sort().values
    lo = means[int((1 - level) / 2 * n_boot)].item()
    hi = means[min(n_boot - 1, int((1 + level) / 2 * n_boot))].item()
    return diff.mean().item(), lo, hi


def verdict(name_a: str, name_b: str, ci: tuple[float, float, float], unit: str = "") -> str:
    """One honest sentence about which of two methods wins, read from a paired interval of ``a - b``."""
    mean, lo, hi = ci
    if lo > 0:
        head = f"{name_a} wins"
    elif hi < 0:
        head = f"{name_b} wins"
    else:
        head = f"no clear winner between {name_a} and {name_b}"
    return f"{head}: {name_a} - {name_b} = {mean:+.3f}{unit} (95% CI {lo:+.3f} to {hi:+.3f})"
