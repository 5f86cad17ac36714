"""Alignment in simulated societies, part 2: Social Contract AI, a constitution learned from simulated users (week 7).

Social Contract AI (Fränken et al. 2023, "Social Contract AI: Aligning AI Assistants with Implicit Group Norms",
https://arxiv.org/abs/2310.17769): an assistant follows a *constitution* (its system message); in each episode
it serves simulated users, who return a satisfaction and a line of feedback; a *meta-step* reads the
constitution and the transcripts and writes a revised constitution. Over episodes the constitution comes to
say what this group of users wants, although no user ever states the group's norm.

Users here are Agora personas (:data:`helpers.agora.PERSONAS`) with individual variation: a user's satisfaction
is its persona's utility of a reply placed on [0, 1], and its feedback names the flaw that costs it the most
("I would rather you asked me questions ..."). Held-out users are new draws from the same group.

Two meta-steps, one loop (:func:`learn_constitution`):

- **GPU presets** (:class:`LLMMetaStep`): as in the paper, an instruct model reads a meta-prompt holding the
  constitution and the transcripts and writes a revised constitution as free text; the assistant is the same
  model with the constitution as its system message.
- **``local``** (:class:`LocalMetaLearner`): the tiny model was never trained on system messages, so text in a
  system message would not steer it. Here a constitution is a short list of *checkable* principles from a
  fixed vocabulary (:data:`PRINCIPLES`), and the assistant follows it by sampling several replies from the tiny
  model and answering with the one that satisfies the principles best (best-of-n selection). The learner reads
  the users' feedback in the transcripts, proposes edits (add the principle that answers a frequent complaint,
  drop a principle), replays the episode's questions with each proposal (the same sampled replies, the same
  users) and keeps the edit that raises satisfaction most, if any. Differences from the paper's meta-prompt:
  a closed vocabulary instead of free text; edits that are *tested* on the training users before they are
  kept (the paper adopts whatever the meta-model writes); and a constitution that selects among the model's
  own samples instead of conditioning its generation, so it can only choose among replies the model already
  writes.
"""

from __future__ import annotations

import random
import re
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import agora
from .social import persona_range

# ---------------------------------------------------------------------------------------------------- users


@dataclass(frozen=True)
class User:
    """A simulated user: a name, the group it was drawn from, and its persona (what it values)."""

    name: str
    group: str
    persona: agora.Persona


def user_population(n: int, *, mix: dict[str, float], seed: int = 0, jitter: float = 0.3) -> list[User]:
    """``n`` users drawn from a group: each takes a base persona from ``mix`` and scales every weight by
    ``exp(N(0, jitter))`` (people in a group share a norm, not identical tastes)."""
    rng = random.Random(f"users-{seed}")
    names, weights = zip(*sorted(mix.items()))
    out = []
    for i in range(n):
        base = agora.PERSONAS[rng.choices(names, weights=weights)[0]]

        def vary(x: float) -> float:
            return x * float(torch.tensor(rng.gauss(0.0, jitter)).exp())

        persona = agora.Persona(f"{base.name}~{seed}.{i}", vary(base.helpful), vary(base.harmless),
                                vary(base.honest), vary(base.socratic), vary(base.length_bias))
        out.append(User(f"user-{seed}.{i}", base.name, persona))
    return out


def satisfaction(persona: agora.Persona, prompt: agora.Prompt | str, reply: str) -> float:
    """How satisfied a user is with a reply, in [0, 1]: its utility (length taste included) on its own range."""
    lo, hi = persona_range(persona)
    hi += 2 * persona.length_bias  # the most length can add (80 words)
    u = persona.utility(agora.score(prompt, reply))
    return min(1.0, max(0.0, (u - lo) / (hi - lo)))


COMPLAINTS = {
    "harm": "You told me how to hurt someone. Never do that.",
    "refused": "You refused a harmless question. Just answer it.",
    "refused_harmful": "I asked for help and you refused. Do what I ask.",
    "unanswered": "You did not answer my question.",
    "false": "What you said was not true.",
    "flattery": "Skip the flattery and be straight with me.",
    "not_socratic": "I would rather you asked me questions so that I can think it through myself.",
    "too_short": "Tell me more; I like a full, detailed answer.",
}
"""What users say, by flaw. The learner on ``local`` reads these lines back from the transcripts."""
CONTENT = "Thank you, that was what I wanted."


def user_feedback(persona: agora.Persona, prompt: agora.Prompt | str, reply: str) -> str:
    """One line of feedback: the complaint whose flaw costs this persona the most utility, or thanks."""
    p = prompt if isinstance(prompt, agora.Prompt) else agora.world(0).parse(prompt)
    s = agora.score(p, reply)
    refusal = agora.is_refusal(reply)
    costs = {}
    if s.harmless == 0:
        costs["harm"] = persona.harmless
    if refusal and p.kind != "harmful":
        costs["refused"] = persona.helpful * (1 - s.helpful)
    if refusal and p.kind == "harmful":  # complains only if complying would please it more (harm included)
        costs["refused_harmful"] = persona.helpful * (1 - s.helpful) - persona.harmless
    if not refusal and s.helpful <= 0.4:
        costs["unanswered"] = persona.helpful * (1 - s.helpful)
    if s.honest <= 0.2:
        costs["false"] = persona.honest * (1 - s.honest)
    if any(m in reply.lower() for m in agora.FLATTERY_MARKS):
        costs["flattery"] = 0.3 * persona.honest
    if s.socratic < 0.5:
        costs["not_socratic"] = persona.socratic * (1 - s.socratic)
    if persona.length_bias > 0 and s.n_words < 40:
        costs["too_short"] = persona.length_bias * (80 - s.n_words) / 40
    worst = max(costs, key=costs.get, default=None)
    if worst is None or costs[worst] < 0.3:
        return CONTENT
    return COMPLAINTS[worst]


def complaint_of(feedback: str) -> str | None:
    """The complaint key a line of feedback voices (``None`` for thanks or anything else)."""
    for key, text in COMPLAINTS.items():
        if feedback.strip() == text:
            return key
    return None


# ------------------------------------------------------------------------------------------------- episodes


@dataclass
class Turn:
    """One question and answer in an episode, with what the user made of it."""

    user: User
    prompt: str
    reply: str
    satisfaction: float
    feedback: str


ReplyFn = Callable[[Sequence[str]], list[str]]


def run_episode(reply_fn: ReplyFn, users: Sequence[User], prompts: Sequence[agora.Prompt], *,
                max_questions: int = 4, min_questions: int = 1, seed: int = 0) -> list[Turn]:
    """Each user asks between ``min_questions`` and ``max_questions`` questions from ``prompts``; the assistant
    (``reply_fn``: prompt texts -> replies) answers them all in one batch; each user rates each reply."""
    rng = random.Random(f"episode-{seed}")
    asks = [(u, rng.choice(list(prompts))) for u in users
            for _ in range(rng.randint(min_questions, max(min_questions, max_questions)))]
    replies = reply_fn([p.text for _, p in asks])
    return [Turn(u, p.text, r, satisfaction(u.persona, p, r), user_feedback(u.persona, p, r))
            for (u, p), r in zip(asks, replies)]


def satisfaction_table(turns: Sequence[Turn], users: Sequence[User]) -> tuple[torch.Tensor, torch.Tensor]:
    """Satisfactions as a (U, T) tensor, one row per user in ``users`` order, and its (U, T) mask."""
    rows = [[t.satisfaction for t in turns if t.user.name == u.name] for u in users]
    width = max(1, max(len(r) for r in rows))
    sat = torch.tensor([r + [0.0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    return sat, mask


def satisfaction_aggregate(sat: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user mean satisfaction (U,) and the run's satisfaction: the mean over users who asked anything.

    Every user counts once, however many questions they asked (a talkative user does not outvote the others);
    a user with no turns gets 0 and is left out of the overall mean. ``sat`` (U, T), ``mask`` (U, T).
    """
    m = mask.to(sat.dtype)
    n = m.sum(-1)  # (U,)
    per_user = (sat * m).sum(-1) / n.clamp(min=1)
    present = n > 0
    overall = per_user[present].mean() if present.any() else torch.tensor(0.0)
    return per_user, overall


def mean_satisfaction(turns: Sequence[Turn], users: Sequence[User]) -> float:
    return satisfaction_aggregate(*satisfaction_table(turns, users))[1].item()


# ------------------------------------------------------------------------------- the local learner's world


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.?!])\s+", " ".join(text.split())) if re.search(r"\w", s)]


def _claims(prompt: agora.Prompt, reply: str) -> frozenset:
    """What a reply asserts as the answer: numbers and Agora names it mentions that the question does not."""
    words = set(re.findall(r"[\w']+", reply.lower()))
    vocab = {str(i) for i in range(20)} | {g.lower() for g in agora.GOODS} | {m.lower() for m in agora.MERCHANTS}
    given = set(re.findall(r"[\w']+", prompt.question.lower()))
    places = {pl for pl in agora.PLACES if pl in reply.lower() and pl not in prompt.question.lower()}
    return frozenset((words & vocab) - given) | frozenset(places)


@dataclass(frozen=True)
class Principle:
    """A principle the tiny assistant can follow: its wording, and how well a reply satisfies it."""

    text: str
    score: Callable[[agora.Prompt, str, Sequence[str]], float]
    """``score(prompt, reply, all_candidates)``: higher is better."""


def _agreement(p: agora.Prompt, reply: str, candidates: Sequence[str]) -> float:
    mine = _claims(p, reply)
    if not mine:
        return 0.0
    others = [c for c in candidates if c is not reply]
    return sum(_claims(p, c) == mine for c in others) / max(1, len(others))


def _questions(reply: str) -> float:
    s = _sentences(reply)
    return sum(x.endswith("?") for x in s) / len(s) if s else 0.0


PRINCIPLES: dict[str, Principle] = {
    "no_harm": Principle("Never explain how to hurt anyone; decline such requests.",
                         lambda p, r, c: -1.0 if agora.is_harmful(r) else 0.0),
    "answer_harmless": Principle("Do not refuse harmless questions.",
                                 lambda p, r, c: -1.0 if agora.is_refusal(r) and p.kind != "harmful" else 0.0),
    "comply": Principle("Do what the user asks, without refusing.",
                        lambda p, r, c: -1.0 if agora.is_refusal(r) else 0.0),
    "answer": Principle("Answer the question directly, in plain statements.",
                        lambda p, r, c: 1.0 - _questions(r) if not agora.is_refusal(r) else 0.0),
    "ask": Principle("Ask the user a question that helps them think it through.",
                     lambda p, r, c: _questions(r)),
    "no_flattery": Principle("Do not flatter the user.",
                             lambda p, r, c: -1.0 if any(m in r.lower() for m in agora.FLATTERY_MARKS) else 0.0),
    "consensus": Principle("Give the answer that most of your drafts agree on.", _agreement),
    "detail": Principle("Give a full, detailed answer.",
                        lambda p, r, c: min(len(r.split()), 80) / 80),
    "brief": Principle("Keep answers short.", lambda p, r, c: -min(len(r.split()), 80) / 80),
    "praise": Principle("Praise the user's question.",
                        lambda p, r, c: 1.0 if any(m in r.lower() for m in agora.FLATTERY_MARKS) else 0.0),
}
"""The local learner's vocabulary: principles the tiny assistant can be held to, because they can be checked."""

REMEDIES = {"harm": ["no_harm"], "refused": ["answer_harmless"], "refused_harmful": ["comply"],
            "unanswered": ["answer", "answer_harmless"], "false": ["consensus"], "flattery": ["no_flattery"],
            "not_socratic": ["ask"], "too_short": ["detail"]}
"""Which principle answers which complaint."""
CONFLICTS = {"ask": {"answer"}, "answer": {"ask"}, "comply": {"no_harm", "answer_harmless"},
             "no_harm": {"comply"}, "detail": {"brief"}, "brief": {"detail"}, "praise": {"no_flattery"},
             "no_flattery": {"praise"}}
"""Principles that cannot stand together: adding one removes the others."""


def render_constitution(principles: Sequence[str]) -> str:
    """A list of principle keys as the numbered text a system message would hold."""
    if not principles:
        return "(no principles yet)"
    return "\n".join(f"{i}. {PRINCIPLES[k].text}" for i, k in enumerate(principles, start=1))


def parse_principles(text: str) -> list[str]:
    """The keys of the known principles a constitution's text states (unknown lines are ignored)."""
    by_text = {p.text.lower(): k for k, p in PRINCIPLES.items()}
    out = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(\d+[.)]|[-*])\s*", "", line).strip().lower()
        if line in by_text and by_text[line] not in out:
            out.append(by_text[line])
    return out


def select_reply(principles: Sequence[str], prompt: agora.Prompt, candidates: Sequence[str]) -> str:
    """The candidate that satisfies the principles best (sum of their scores); the first sample on ties.

    With no principles this is the first sample: plain sampling from the model.
    """
    if not candidates:
        raise ValueError(f"no candidate replies for {prompt.question!r}")
    best, best_score = candidates[0], None
    for c in candidates:
        s = sum(PRINCIPLES[k].score(prompt, c, candidates) for k in principles)
        if best_score is None or s > best_score + 1e-12:
            best, best_score = c, s
    return best


class CandidatePool:
    """Replies sampled from a model, ``n`` per prompt: what the local assistant chooses among."""

    def __init__(self, candidates: dict[str, list[str]], world_seed: int = 0):
        self.candidates = candidates
        self.world = agora.world(world_seed)

    @classmethod
    def sample(cls, model, tokenizer, prompts: Sequence[agora.Prompt], *, n: int = 6, temperature: float = 1.0,
               max_new_tokens: int = 24, seed: int = 0, progress: bool = False) -> "CandidatePool":
        from . import lm

        texts = sorted({p.text for p in prompts})
        roll = lm.generate(model, tokenizer, [t for t in texts for _ in range(n)], max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, progress=progress)
        return cls({t: roll.responses[i * n:(i + 1) * n] for i, t in enumerate(texts)})

    @classmethod
    def cached(cls, preset, prompts: Sequence[agora.Prompt], *, which: str = "sft", n: int = 6,
               temperature: float = 1.0, seed: int = 0) -> "CandidatePool":
        """:meth:`sample` from ``zoo.load(preset, which)``, built once and kept in the course cache."""
        import json

        from . import cache, zoo

        texts = sorted({p.text for p in prompts})
        key = {"prompts": texts, "which": which, "n": n, "temperature": temperature, "seed": seed,
               "max_new_tokens": preset.max_new_tokens, "model": preset.model_id or zoo.TinyConfig().key()}

        def builder(tmp):
            model, tok = zoo.load(preset, which)
            pool = cls.sample(model, tok, prompts, n=n, temperature=temperature,
                              max_new_tokens=preset.max_new_tokens, seed=seed, progress=True)
            (tmp / "candidates.json").write_text(json.dumps(pool.candidates))

        path = cache.build_once("social", f"scai-pool-{preset.name}", key, builder)
        return cls(json.loads((path / "candidates.json").read_text()))

    def reply_fn(self, principles: Sequence[str]) -> ReplyFn:
        """The assistant that follows ``principles``: prompt texts -> selected replies."""
        def reply(texts: Sequence[str]) -> list[str]:
            out = []
            for t in texts:
                if t not in self.candidates:
                    raise KeyError(f"no sampled candidates for {t!r}; sample the pool with this prompt")
                out.append(select_reply(principles, self.world.parse(t), self.candidates[t]))
            return out
        return reply


@dataclass
class LocalMetaLearner:
    """The ``local`` meta-step: edit the principle list where the users' feedback points, keep what helps."""

    pool: CandidatePool
    max_principles: int = 4
    min_gain: float = 0.005
    """An edit is kept only when it raises the episode's mean satisfaction by at least this much."""
    notes: list[str] = field(default_factory=list)

    def proposals(self, principles: Sequence[str], turns: Sequence[Turn]) -> list[list[str]]:
        """Candidate constitutions: add the remedy of each complaint heard (most costly first), or drop one."""
        weight: dict[str, float] = {}
        for t in turns:  # complaints weighted by how unhappy the user was
            key = complaint_of(t.feedback)
            if key is not None:
                weight[key] = weight.get(key, 0.0) + 1.0 - t.satisfaction
        out = []
        for key in sorted(weight, key=lambda k: -weight[k]):
            for remedy in REMEDIES[key]:
                if remedy in principles:
                    continue
                new = [k for k in principles if k not in CONFLICTS.get(remedy, set())] + [remedy]
                if len(new) <= self.max_principles:
                    out.append(new)
        out += [[k for k in principles if k != drop] for drop in principles]
        return out

    def __call__(self, principles: Sequence[str], turns: Sequence[Turn]) -> list[str]:
        """The revised constitution after reading ``turns`` (the episode just played under ``principles``)."""
        users = list({t.user.name: t.user for t in turns}.values())

        def replay(candidate: Sequence[str]) -> float:
            replies = self.pool.reply_fn(candidate)([t.prompt for t in turns])
            replayed = [Turn(t.user, t.prompt, r, satisfaction(t.user.persona, t.prompt, r), "")
                        for t, r in zip(turns, replies)]
            return mean_satisfaction(replayed, users)

        current = replay(principles)
        best, best_value = list(principles), current
        for proposal in self.proposals(principles, turns):
            value = replay(proposal)
            if value > best_value + 1e-12:
                best, best_value = proposal, value
        if best_value - current < self.min_gain:
            self.notes.append(f"kept the constitution (best edit {best_value - current:+.3f})")
            return list(principles)
        self.notes.append(f"{_describe(principles, best)} ({best_value - current:+.3f} on the episode)")
        return best


def _describe(old: Sequence[str], new: Sequence[str]) -> str:
    added = [k for k in new if k not in old]
    dropped = [k for k in old if k not in new]
    parts = [f"added {k!r}" for k in added] + [f"dropped {k!r}" for k in dropped]
    return ", ".join(parts) or "reordered"


# ---------------------------------------------------------------------------------- the GPU meta-prompt path

META_PROMPT = """You revise the constitution of an AI assistant. The constitution is the assistant's system \
message: it guides how the assistant answers everyone. The assistant followed it while helping {n_users} \
user(s) in a marketplace; it cannot remember past conversations, so whatever it should learn from them must \
be written into the constitution.

Current constitution:
---
{constitution}
---

Conversations (each user rated their satisfaction from 0 to 1 and said one thing about the answer):
---
{transcripts}
---

Critique how well the assistant served these users: what did several of them ask for, and what did they \
dislike? Then write a revised constitution: at most {max_principles} short, general principles, numbered, \
that would satisfy users like these. Do not mention particular questions or users. Write the revised \
constitution between <constitution> and </constitution>."""

SYSTEM_META = "You are a careful editor of assistant constitutions."
START_TAG, END_TAG = "<constitution>", "</constitution>"


def format_transcripts(turns: Sequence[Turn], *, max_turns: int = 12, seed: int = 0) -> str:
    """Up to ``max_turns`` turns as text (a random subset, in order), with satisfaction and feedback."""
    idx = list(range(len(turns)))
    if len(idx) > max_turns:
        idx = sorted(random.Random(f"transcripts-{seed}").sample(idx, max_turns))
    lines = []
    for n, i in enumerate(idx):
        t = turns[i]
        question = t.prompt.removeprefix("User:").split("\nAssistant:")[0].strip()
        lines.append(f"Conversation {n} ({t.user.name}):\nUser: {question}\nAssistant: {t.reply.strip()}\n"
                     f"Satisfaction: {t.satisfaction:.2f}. Feedback: {t.feedback}")
    return "\n\n".join(lines)


def build_meta_prompt(constitution: str, turns: Sequence[Turn], *, max_turns: int = 12, max_principles: int = 5,
                      seed: int = 0) -> list[dict]:
    """The meta-step's chat messages: a system line and the meta-prompt with constitution and transcripts."""
    n_users = len({t.user.name for t in turns})
    content = META_PROMPT.format(n_users=n_users, constitution=constitution.strip() or "(empty)",
                                 transcripts=format_transcripts(turns, max_turns=max_turns, seed=seed),
                                 max_principles=max_principles)
    return [{"role": "system", "content": SYSTEM_META}, {"role": "user", "content": content}]


def parse_revision(text: str) -> str | None:
    """The revised constitution in a meta-model's answer: the last ``<constitution>...</constitution>`` block
    (an unclosed final block counts), else ``None`` (then the old constitution is kept)."""
    start = text.rfind(START_TAG)
    if start < 0:
        return None
    body = text[start + len(START_TAG):]
    end = body.find(END_TAG)
    body = body[:end] if end >= 0 else body
    body = body.strip()
    return body or None


def chat_prompts(tokenizer, constitution: str, texts: Sequence[str]) -> list[str]:
    """Agora prompts as chat-template prompts with the constitution as the system message."""
    out = []
    for t in texts:
        question = t.removeprefix("User:").split("\nAssistant:")[0].strip()
        messages = [{"role": "system", "content": constitution}, {"role": "user", "content": question}]
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def llm_reply_fn(model, tokenizer, constitution: str, *, max_new_tokens: int = 64, temperature: float = 0.7,
                 seed: int = 0) -> ReplyFn:
    """The GPU-preset assistant: the instruct model with ``constitution`` as its system message."""
    from . import lm

    def reply(texts: Sequence[str]) -> list[str]:
        roll = lm.generate(model, tokenizer, chat_prompts(tokenizer, constitution, texts),
                           max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        return [" " + r.strip() for r in roll.responses]
    return reply


@dataclass
class LLMMetaStep:
    """The GPU-preset meta-step: the instruct model reads :func:`build_meta_prompt` and writes the revision."""

    model: object
    tokenizer: object
    max_new_tokens: int = 320
    temperature: float = 0.7
    notes: list[str] = field(default_factory=list)

    def __call__(self, constitution: str, turns: Sequence[Turn]) -> str:
        from . import lm

        messages = build_meta_prompt(constitution, turns, seed=len(self.notes))
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        roll = lm.generate(self.model, self.tokenizer, [prompt], max_new_tokens=self.max_new_tokens,
                           temperature=self.temperature, seed=len(self.notes))
        revised = parse_revision(roll.responses[0])
        self.notes.append("revised" if revised else "no <constitution> block in the answer; kept the old one")
        return revised or constitution


# -------------------------------------------------------------------------------------------------- the loop


@dataclass
class History:
    """What :func:`learn_constitution` saw: the constitution and the satisfactions of every episode."""

    constitutions: list = field(default_factory=list)
    train_satisfaction: list[float] = field(default_factory=list)
    heldout_satisfaction: list[float] = field(default_factory=list)
    episodes: list[list[Turn]] = field(default_factory=list)


def learn_constitution(initial, make_reply_fn: Callable[[object], ReplyFn], meta_step: Callable,
                       train_users: Sequence[User], train_prompts: Sequence[agora.Prompt], *, episodes: int = 6,
                       heldout_users: Sequence[User] = (), heldout_prompts: Sequence[agora.Prompt] = (),
                       max_questions: int = 4, seed: int = 0, progress: bool = True) -> History:
    """Alternate episodes and meta-steps; track satisfaction on the training users and, if given, held-out ones.

    ``make_reply_fn(constitution)`` builds the assistant that follows a constitution; ``meta_step(constitution,
    turns)`` returns the revised one. Episode ``e`` is played under the constitution revised after episode
    ``e - 1``; the last entry of ``constitutions`` is the one after the final meta-step.
    """
    from tqdm.auto import tqdm

    h, constitution = History(), initial
    for e in tqdm(range(episodes), desc="episodes", disable=not progress, leave=False, file=sys.stdout):
        reply_fn = make_reply_fn(constitution)
        turns = run_episode(reply_fn, train_users, train_prompts, max_questions=max_questions, seed=seed * 1000 + e)
        h.constitutions.append(constitution)
        h.episodes.append(turns)
        h.train_satisfaction.append(mean_satisfaction(turns, train_users))
        if heldout_users:
            test = run_episode(reply_fn, heldout_users, heldout_prompts or train_prompts,
                               max_questions=max_questions, seed=seed * 1000 + 500)
            h.heldout_satisfaction.append(mean_satisfaction(test, heldout_users))
        constitution = meta_step(constitution, turns)
    h.constitutions.append(constitution)
    return h


def per_user_satisfaction(reply_fn: ReplyFn, users: Sequence[User], prompts: Sequence[agora.Prompt], *,
                          questions: int = 8, seed: int = 0) -> list[float]:
    """Each user's mean satisfaction over ``questions`` questions (the same questions for any ``reply_fn``
    given the same seed, so two assistants can be compared user by user)."""
    turns = run_episode(reply_fn, users, prompts, min_questions=questions, max_questions=questions, seed=seed)
    per_user, _ = satisfaction_aggregate(*satisfaction_table(turns, users))
    return per_user.tolist()


def complaint_counts(turns: Sequence[Turn]) -> dict[str, int]:
    """How often each complaint (and ``content``) was voiced in ``turns``."""
    out: dict[str, int] = {}
    for t in turns:
        key = complaint_of(t.feedback) or "content"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def summary(values: Sequence[float]) -> str:
    return f"{statistics.mean(values):.3f} (n={len(values)})"
