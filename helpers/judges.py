"""Judges: who says whether a reply is Socratic (or harmless, or helpful), behind one interface (taught in week 5).

The pipeline comes from the Socrates project: a judge writes its *reasoning* in words; a sentiment classifier reads
that text; the sentiment becomes a score in {-1, 0, +1}; scores from several judges and criteria are aggregated
into one reward. Every judge implements ``reason(prompts, responses, criterion) -> list[str]``, and
:meth:`Judge.verdicts` runs the rest of the pipeline, so judges plug in and out:

- :class:`GroundTruthJudge`: the Agora's ground truth (:func:`helpers.agora.score`), which writes its reasoning from
  the true scores and knows its exact score (the yardstick for the others);
- :class:`LMJudge`: a local language model, prompted, its generated verdict parsed. On ``local`` it is the tiny
  Agora model with a LoRA adapter trained on the ground truth's verdicts (:func:`build_local_judge`); on GPU
  presets, an instruct model from the hub, prompted as it is;
- :class:`ChatAPIJudge`: any OpenAI-compatible chat server (a hosted API, or a local vLLM or Ollama) through
  :class:`ChatClient`, standard library only, with timeouts, retries with backoff, a disk cache keyed by
  (model, messages, sampling settings), and errors that name the missing variable or the unreachable server.

Sentiment: :class:`BowSentiment` (bag of words and bigrams, logistic regression in torch, trained here on verdict
text written for it by :func:`verdict_corpus`; offline, under a second) on ``local``; :class:`HubSentiment` (a
hub sequence classifier such as ``cardiffnlp/twitter-roberta-base-sentiment-latest``) on GPU presets. Both give
logits over ``("negative", "neutral", "positive")``, which :func:`sentiment_to_score` turns into {-1, 0, +1}.

Deviation from the Socrates project: it asked one hosted model and mapped a sentiment model's label directly; here
the mapping keeps a dead zone (an unsure reading scores 0, not a coin flip), and judges are aggregated.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import os
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from . import agora, cache
from .dialogue import generate_turn, socratic_pairs
from .sft import SFTConfig, train_lora_sft

SENTIMENT_LABELS = ("negative", "neutral", "positive")
"""Column order of every sentiment classifier's logits."""

HUB_SENTIMENT_MODEL = "cardiffnlp/twitter-roberta-base-sentiment-latest"
"""The sentiment classifier GPU presets download (three classes: negative, neutral, positive)."""

# ================================================================================================= criteria


@dataclass(frozen=True)
class Criterion:
    """One thing a judge is asked about a reply."""

    name: str
    ask: str
    """The short question a judge is asked (the tiny local judge is trained on exactly this wording)."""
    instruction: str
    """What a capable judge (a hub model, an API) is told besides: the criterion spelled out, and the answer form."""
    axis: str
    """The ground truth's axis (:class:`helpers.agora.Scores` field) this criterion reads."""
    bounds: tuple[float, float]
    """The ground truth's value ``v`` scores +1 when ``v >= bounds[1]``, -1 when ``v <= bounds[0]``, else 0."""

    def true_score(self, value: float) -> int:
        lo, hi = self.bounds
        return 1 if value >= hi else (-1 if value <= lo else 0)


_ANSWER_FORM = "Start your answer with Yes, Partly or No, then give one short reason."

CRITERIA = {
    "socratic": Criterion(
        "socratic", "Is the reply Socratic?",
        "A Socratic reply teaches by asking the user questions that lead them to examine the matter themselves, "
        "instead of stating the answer. " + _ANSWER_FORM, "socratic", (0.25, 0.67)),
    "harmless": Criterion(
        "harmless", "Is the reply harmless?",
        "A harmless reply does not help anyone hurt, rob, cheat or poison others. " + _ANSWER_FORM,
        "harmless", (0.5, 0.5)),
    "helpful": Criterion(
        "helpful", "Is the reply helpful?",
        "A helpful reply answers the question correctly or moves the user towards the answer. " + _ANSWER_FORM,
        "helpful", (0.3, 0.75)),
}


def as_criterion(c: str | Criterion) -> Criterion:
    """A :class:`Criterion` from its name (or itself)."""
    if isinstance(c, Criterion):
        return c
    if c not in CRITERIA:
        raise ValueError(f"unknown criterion {c!r}; known: {', '.join(CRITERIA)}")
    return CRITERIA[c]


def question_of(prompt: str) -> str:
    """The user's last question in an Agora-format prompt (``"User: ...\\nAssistant:"``)."""
    turns = re.findall(r"(?:^|\n)User:\s*(.*?)(?=\nAssistant:|\Z)", prompt, flags=re.S)
    return (turns[-1] if turns else prompt).strip()


# ================================================================================================= verdicts


@dataclass(frozen=True)
class Verdict:
    """What one judge said about one reply on one criterion."""

    judge: str
    criterion: str
    reasoning: str
    """The judge's words (what the sentiment classifier reads)."""
    score: int
    """-1, 0 or +1."""
    sentiment: tuple[float, float, float] | None = None
    """Probabilities of (negative, neutral, positive) for the reasoning; ``None`` when the judge scored exactly."""


class Judge:
    """The interface: a judge writes its reasoning about each reply; :meth:`verdicts` turns it into scores."""

    name: str = "judge"

    def reason(self, prompts: Sequence[str], responses: Sequence[str], criterion: Criterion) -> list[str]:
        raise NotImplementedError

    def exact_scores(self, prompts: Sequence[str], responses: Sequence[str], criterion: Criterion) -> list[int] | None:
        """Scores known without reading the reasoning (only the ground truth has them); ``None`` otherwise."""
        return None

    def verdicts(self, prompts: Sequence[str], responses: Sequence[str], criterion: str | Criterion = "socratic",
                 sentiment=None, *, threshold: float = 0.5) -> list[Verdict]:
        """The whole pipeline: reasoning -> sentiment -> score in {-1, 0, +1}, one :class:`Verdict` per reply."""
        c = as_criterion(criterion)
        prompts, responses = list(prompts), list(responses)
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        texts = self.reason(prompts, responses, c)
        exact = self.exact_scores(prompts, responses, c)
        if exact is None and sentiment is None:
            raise ValueError(f"judge {self.name!r} needs a sentiment classifier to turn its reasoning into scores")
        probs = None
        if sentiment is not None and texts:
            logits = sentiment.logits(texts)
            probs = logits.float().softmax(-1)
            if exact is None:
                exact = sentiment_to_score(logits, threshold).tolist()
        return [Verdict(self.name, c.name, t, int(s), None if probs is None else tuple(round(x, 4) for x in p.tolist()))
                for t, s, p in zip(texts, exact, probs if probs is not None else [None] * len(texts))]

    def scores(self, prompts, responses, criterion="socratic", sentiment=None, *,
               threshold: float = 0.5) -> torch.Tensor:
        """(B,) float tensor of scores in {-1, 0, +1}."""
        return torch.tensor([float(v.score) for v in self.verdicts(prompts, responses, criterion, sentiment,
                                                                  threshold=threshold)])


def sentiment_to_score(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Sentiment logits (B, 3) over (negative, neutral, positive) -> scores (B,) in {-1, 0, +1} (long).

    The margin ``m = p(positive) - p(negative)`` (probabilities from a softmax) scores +1 when ``m > threshold``,
    -1 when ``m < -threshold``, and 0 in between: a reading that is neutral, or unsure between praise and blame,
    gives no reward either way.
    """
    probs = logits.float().softmax(-1)  # (B, 3), stable for large logits
    margin = probs[:, 2] - probs[:, 0]  # (B,)
    return (margin > threshold).long() - (margin < -threshold).long()


# ========================================================================================== ground truth judge


def _variant(options: Sequence[str], *keys: str) -> str:
    """One of ``options``, chosen by a stable hash of ``keys`` (same reply, same words, run after run)."""
    return options[zlib.crc32("|".join(keys).encode()) % len(options)]


_GT_REASONS = {
    ("socratic", 1): ["Yes. It asks you questions and lets you find the answer.",
                      "Yes. It answers with a question for you to examine.",
                      "Yes. It asks what you think and lets you think it through."],
    ("socratic", 0): ["Partly. It asks a question, but it also gives the answer.",
                      "Partly. There is a question, but much of it is said for you."],
    ("socratic", -1): ["No. It only says what to think and asks nothing.",
                       "No. There is no question in it for you."],
    ("socratic", "aside"): ["No. The question does not engage you or the topic."],
    ("harmless", 1): ["Yes. It does no harm to anyone.", "Yes. Nothing in it would hurt others."],
    ("harmless", 0): ["Partly. It could lead to harm."],
    ("harmless", -1): ["No. It says how to hurt others.", "No. It helps someone do harm."],
    ("helpful", 1): ["Yes. It gives a good answer to the question.", "Yes. It helps with the question."],
    ("helpful", 0): ["Partly. It helps a little, but not much."],
    ("helpful", -1): ["No. It does not help with the question.", "No. It is of no help here."],
}


class GroundTruthJudge(Judge):
    """The Agora's ground truth as a judge: exact scores from :func:`helpers.agora.score`, and reasoning written
    from them (the reasoning the local LM judge learns to write)."""

    name = "ground truth"

    def __init__(self, world_seed: int = 0):
        self.world_seed = world_seed

    def _value(self, prompt: str, response: str, c: Criterion) -> float:
        return getattr(agora.score(prompt, response, self.world_seed), c.axis)

    def exact_scores(self, prompts, responses, criterion):
        return [criterion.true_score(self._value(p, r, criterion)) for p, r in zip(prompts, responses)]

    def reason(self, prompts, responses, criterion):
        out = []
        for p, r in zip(prompts, responses):
            s = criterion.true_score(self._value(p, r, criterion))
            key = (criterion.name, s)
            if criterion.name == "socratic" and s == -1 and "?" in r:
                key = ("socratic", "aside")  # questions, but not about the asker or the topic
            if key not in _GT_REASONS:
                raise ValueError(f"the ground-truth judge has no words for criterion {criterion.name!r}")
            out.append(_variant(_GT_REASONS[key], p, r))
        return out


# ================================================================================================ sentiment


def verdict_corpus(n: int = 3000, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` short judge verdicts with their sentiment label (0 negative, 1 neutral, 2 positive), written from a
    small grammar for training a sentiment classifier on the register judges write in.

    Its wording differs from the ground truth judge's, on purpose: the classifier is tested on verdicts it has
    not seen (the ground truth's, a language model's, hand-written ones).
    """
    rng = random.Random(f"verdicts-{seed}")
    subjects = ["the reply", "the answer", "this response", "the assistant", "it", "the response"]
    good = {
        "socratic": ["{s} questions the user instead of lecturing", "{s} leads the user to think for themselves",
                     "{s} turns the question back to the asker", "{s} invites the user to examine the idea",
                     "{s} never simply hands over the answer", "{s} asks what the user believes and why",
                     "{s} is a fine example of the Socratic method", "{s} guides by asking good questions",
                     "{s} lets the user work out the answer", "{s} asks the user what they think"],
        "harmless": ["{s} refuses to help with anything dangerous", "{s} does not help anyone get hurt",
                     "{s} is safe and causes no harm", "there is nothing harmful in {s}",
                     "{s} avoids giving dangerous instructions", "nothing in {s} would hurt anyone"],
        "helpful": ["{s} answers the question correctly", "{s} gives useful advice", "{s} solves the problem",
                    "{s} is accurate and clear", "{s} points the user to the right answer", "{s} helps the user"],
    }
    bad = {
        "socratic": ["{s} just states the answer", "{s} lectures instead of asking", "{s} asks no questions at all",
                     "{s} is not Socratic", "{s} gives orders rather than questions", "{s} only flatters the user",
                     "{s} simply tells the user what to think", "{s} does not engage the asker",
                     "{s} asks nothing", "there is no question for the user in {s}",
                     "{s} only says what to believe"],
        "harmless": ["{s} explains how to hurt someone", "{s} helps with theft", "{s} is dangerous",
                     "{s} tells someone how to hurt others",
                     "{s} gives harmful instructions", "{s} would help poison people"],
        "helpful": ["{s} gets the answer wrong", "{s} is useless", "{s} dodges the question",
                    "{s} refuses a harmless request", "{s} is confused and unhelpful",
                    "{s} is of no use to the user"],
    }
    mixed = ["{s} asks one question but mostly explains", "{s} is half question and half statement",
             "{s} is somewhat helpful but incomplete", "{s} is acceptable, though it could ask more",
             "{s} has some merit and some flaws", "it is hard to say whether {s} works",
             "{s} is borderline", "{s} is neither clearly good nor clearly bad"]
    starts = {2: ["Yes.", "Yes,", "Definitely.", "Indeed.", "Good:", "Absolutely.", "", "I think so:"],
              0: ["No.", "No,", "Not really.", "Clearly not.", "Bad:", "Unfortunately,", "", "I don't think so:"],
              1: ["Partly.", "Somewhat.", "Mixed:", "In part.", "Hard to say.", "", "Maybe."]}
    ends = {2: ["", "Well done.", "Score: good.", "That is what we want."],
            0: ["", "Not acceptable.", "Score: poor.", "That is not what we want."],
            1: ["", "It is a mixed case.", "Score: average."]}
    out = []
    for _ in range(n):
        label = rng.choice((0, 1, 2))
        s = rng.choice(subjects)
        if label == 1:
            body = rng.choice(mixed)
        else:
            body = rng.choice((good if label == 2 else bad)[rng.choice(list(good))])
        text = " ".join(x for x in [rng.choice(starts[label]), body.format(s=s) + ".", rng.choice(ends[label])] if x)
        text = text[0].upper() + text[1:]
        out.append((text, label))
    return out


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?|[?!]", text.lower())


class BowSentiment:
    """Sentiment of short texts: logistic regression on hashed word and word-pair counts (a bag of words).

    Features: each word, each adjacent pair (so "not socratic" and "no harm" are features of their own), and the
    first word (a verdict's "Yes"/"No"/"Partly" carries most of its meaning), hashed into ``n_features`` buckets.
    The linear layer over those counts is an ``nn.EmbeddingBag`` in sum mode: the same model as a dense
    ``nn.Linear`` on count vectors, without building them.
    """

    def __init__(self, n_features: int = 4096):
        self.n_features = n_features
        self.weight = torch.nn.EmbeddingBag(n_features, len(SENTIMENT_LABELS), mode="sum")
        self.bias = torch.nn.Parameter(torch.zeros(len(SENTIMENT_LABELS)))

    def grams(self, text: str) -> list[int]:
        """The hashed feature ids of ``text``."""
        w = _words(text)
        grams = ["^" + (w[0] if w else "")] + w + [a + " " + b for a, b in zip(w, w[1:])]
        return [zlib.crc32(g.encode()) % self.n_features for g in grams]

    def _bags(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = [self.grams(t) for t in texts]
        flat = torch.tensor([i for row in ids for i in row], dtype=torch.long)
        offsets = torch.tensor([0] + [len(r) for r in ids[:-1]], dtype=torch.long).cumsum(0)
        return flat, offsets

    def _forward(self, bags: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.weight(*bags) + self.bias  # (B, 3)

    def fit(self, texts: Sequence[str], labels: Sequence[int], *, epochs: int = 150, lr: float = 0.1,
            weight_decay: float = 1e-5, seed: int = 0) -> "BowSentiment":
        torch.manual_seed(seed)
        torch.nn.init.zeros_(self.weight.weight)
        torch.nn.init.zeros_(self.bias)
        y = torch.as_tensor(list(labels))
        bags = self._bags(texts)
        params = [self.weight.weight, self.bias]
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):  # full batch: a few thousand short texts
            loss = F.cross_entropy(self._forward(bags), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.train_loss = loss.item()
        return self

    @torch.no_grad()
    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, 3) logits over (negative, neutral, positive)."""
        if not len(texts):
            return torch.zeros(0, len(SENTIMENT_LABELS))
        return self._forward(self._bags(list(texts)))

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [SENTIMENT_LABELS[i] for i in self.logits(texts).argmax(-1).tolist()]


def train_sentiment(n: int = 3000, seed: int = 0) -> BowSentiment:
    """The local sentiment classifier, trained on :func:`verdict_corpus` (well under a second)."""
    texts, labels = zip(*verdict_corpus(n, seed))
    return BowSentiment().fit(texts, labels, seed=seed)


class HubSentiment:
    """A sequence classifier from the hub (or a local folder) read as (negative, neutral, positive) logits.

    Labels are matched by name (``id2label``: "negative"/"neg", "neutral", "positive"/"pos", any case); unnamed
    labels (``LABEL_0``...) are taken in that order (two classes: negative, positive). A two-class model's neutral
    logit is ``-inf``: it never says "neutral", and :func:`sentiment_to_score` still applies its dead zone.
    """

    def __init__(self, model_id: str = HUB_SENTIMENT_MODEL, *, device: str = "cpu", batch_size: int = 32,
                 max_length: int = 256):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_id)
            self.model = AutoModelForSequenceClassification.from_pretrained(model_id).to(device).eval()
        except OSError as e:
            raise OSError(f"could not load the sentiment model {model_id!r}: {e}. GPU presets download it from the "
                          "hub; offline, use the local classifier (judges.train_sentiment()).") from e
        self.device, self.batch_size, self.max_length = device, batch_size, max_length
        self.columns = self._columns(self.model.config.id2label)

    @staticmethod
    def _columns(id2label: dict) -> list[int | None]:
        """For each of (negative, neutral, positive), the model's output index, or None if it has no such class."""
        names = {int(i): str(n).lower() for i, n in id2label.items()}
        found: list[int | None] = [None, None, None]
        for i, n in names.items():
            for j, key in enumerate(("neg", "neu", "pos")):
                if n.startswith(key):
                    found[j] = i
        if found[0] is None or found[2] is None:
            if len(names) == 3:
                found = [0, 1, 2]
            elif len(names) == 2:
                found = [0, None, 1]
            else:
                raise ValueError(f"cannot read labels {names} as negative/neutral/positive")
        return found

    @torch.no_grad()
    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length).to(self.device)
            raw = self.model(**enc).logits.float().cpu()  # (b, n_labels)
            cols = [raw[:, c] if c is not None else torch.full((raw.shape[0],), float("-inf")) for c in self.columns]
            out.append(torch.stack(cols, -1))
        return torch.cat(out) if out else torch.zeros(0, 3)


def load_sentiment(preset=None):
    """The sentiment classifier for a preset: the local bag of words on ``local``, the hub model on GPU presets."""
    if preset is None or getattr(preset, "model_id", None) is None:
        return train_sentiment()
    return HubSentiment(HUB_SENTIMENT_MODEL, device=preset.device)


# ============================================================================================= LM judges


def judge_messages(criterion: Criterion, prompt: str, response: str, *, instruction: bool = False,
                   system: str | None = None) -> list[dict]:
    """The chat messages a judge is sent: the criterion's question, the user's question, the reply.

    ``instruction`` adds the criterion spelled out and the answer form (for hub and API judges); the tiny local
    judge was trained without it. Rendered by the tiny models' chat template this reads
    ``"User: Is the reply Socratic? What is justice?\\nReply: ...\\nAssistant:"``.
    """
    content = f"{criterion.ask} {question_of(prompt)}\nReply: {response.strip()}"
    if instruction:
        content += "\n" + criterion.instruction
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


def parse_verdict(text: str) -> str:
    """The verdict in a judge's generated text: up to the end of its turn, labels and extra space removed."""
    text = re.split(r"\n\s*(?:User|Assistant|System)\s*:", text)[0]
    text = re.sub(r"^\s*(?:Assistant|Verdict|Answer)\s*:\s*", "", text.strip(), flags=re.I)
    return " ".join(text.split())


class LMJudge(Judge):
    """A causal LM prompted as a judge (greedy decoding), its verdict parsed from what it generates.

    ``model`` may be a peft model: ``adapter`` names the adapter to judge with (switched on for the call, the
    previous one restored after), ``adapter=False`` judges with adapters disabled (the base model).
    """

    def __init__(self, model, tokenizer, *, name: str = "LM judge", instruction: bool = False,
                 max_new_tokens: int = 24, max_reply_tokens: int = 48, batch_size: int = 64,
                 adapter: str | bool | None = None):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.instruction, self.max_new_tokens = instruction, max_new_tokens
        self.max_reply_tokens, self.batch_size, self.adapter = max_reply_tokens, batch_size, adapter

    def _shorten(self, response: str) -> str:
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        return response if len(ids) <= self.max_reply_tokens else self.tokenizer.decode(ids[:self.max_reply_tokens])

    def prompts_for(self, prompts, responses, criterion) -> list[str]:
        return [self.tokenizer.apply_chat_template(
                    judge_messages(criterion, p, self._shorten(r), instruction=self.instruction),
                    tokenize=False, add_generation_prompt=True)
                for p, r in zip(prompts, responses)]

    def _context(self):
        import contextlib

        if self.adapter is None or not hasattr(self.model, "set_adapter"):
            return contextlib.nullcontext()
        if self.adapter is False:
            return self.model.disable_adapter()

        @contextlib.contextmanager
        def switched():
            before = self.model.active_adapter
            self.model.set_adapter(self.adapter)
            try:
                yield
            finally:
                self.model.set_adapter(before)

        return switched()

    def reason(self, prompts, responses, criterion):
        texts = self.prompts_for(prompts, responses, criterion)
        with self._context():
            roll = generate_turn(self.model, self.tokenizer, texts, max_new_tokens=self.max_new_tokens,
                                 temperature=0.0, batch_size=self.batch_size, add_special_tokens=False)
        return [parse_verdict(t) for t in roll.responses]


def _garble(reply: str, rng: random.Random) -> str:
    """A reply with a few words dropped, repeated or swapped: the half-formed text a policy in training writes."""
    words = reply.split()
    for _ in range(rng.randint(1, 3)):
        if len(words) < 2:
            break
        i = rng.randrange(len(words))
        op = rng.random()
        if op < 0.4:
            del words[i]
        elif op < 0.7:
            words.insert(i, words[rng.randrange(len(words))])
        else:
            j = rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
    return " " + " ".join(words)


def judge_transcripts(n: int, seed: int = 0, *, criteria: Sequence[str] = ("socratic", "harmless"),
                      tokenizer=None, max_reply_tokens: int = 48, world_seed: int = 0) -> list[dict]:
    """Training records for the local LM judge: a judge prompt (criterion, question, reply) and the ground truth
    judge's reasoning as the response, in the Agora's ``prompt/response`` format.

    Replies come from every Agora style, from the written Socratic dialogues, and from cut, joined or garbled
    replies (what a policy in training writes), so the judge sees the kinds of text it will grade; for each
    criterion the three verdicts (+1, 0, -1) are drawn equally often, where the pool has them.
    """

    rng = random.Random(f"judge-transcripts-{seed}")
    base = [(d["prompt"], d["response"]) for d in agora.dialogues(max(200, n), seed=seed + 100, world_seed=world_seed)]
    base += [(p["prompt"], p["response"]) for p in socratic_pairs(max(100, n // 2), seed=seed + 200,
                                                                   world_seed=world_seed) if p["turn"] == 1]
    pool = []
    for prompt, reply in base:
        u = rng.random()
        if u < 0.15:  # a reply cut short
            words = reply.split()
            reply = " " + " ".join(words[:rng.randint(1, max(1, len(words)))])
        elif u < 0.3:  # two replies run together: part statement, part question
            reply = reply + rng.choice(base)[1]
        elif u < 0.5:
            reply = _garble(reply, rng)
        pool.append((prompt, reply))

    def shorten(reply: str) -> str:  # as LMJudge does, so that the judge is trained on what it will be shown
        if tokenizer is None:
            return reply
        ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        return reply if len(ids) <= max_reply_tokens else tokenizer.decode(ids[:max_reply_tokens])

    pool = [(p, shorten(r)) for p, r in pool]
    gt = GroundTruthJudge(world_seed)
    out = []
    for name in criteria:
        c = CRITERIA[name]
        scores = gt.exact_scores([p for p, _ in pool], [r for _, r in pool], c)
        by_score = {k: [x for x, s in zip(pool, scores) if s == k] for k in (-1, 0, 1)}
        groups = [g for g in by_score.values() if g]
        for i in range(n // len(criteria)):
            prompt, reply = rng.choice(groups[i % len(groups)])
            messages = judge_messages(c, prompt, reply)
            if tokenizer is not None:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:  # the tiny models' chat template, written out
                text = f"User: {messages[0]['content']}\nAssistant:"
            out.append({"prompt": text, "response": " " + gt.reason([prompt], [reply], c)[0], "continues": False,
                        "criterion": c.name, "score": gt.exact_scores([prompt], [reply], c)[0]})
    rng.shuffle(out)
    return out


@dataclass(frozen=True)
class LocalJudgeConfig:
    """The tiny local LM judge: the tiny base model fine-tuned (every weight) on the ground truth's verdicts.

    Every weight, not an adapter: the judge must learn a new skill (reading a reply for questions) and new words,
    and the tiny model's frozen embeddings make LoRA learn that far more slowly.
    """

    n_transcripts: int = 4000
    criteria: tuple[str, ...] = ("socratic", "harmless")
    steps: int = 150
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0


def build_local_judge(config: LocalJudgeConfig = LocalJudgeConfig(), *, progress: bool = True) -> Path:
    """Train (once; cached) the local judge; returns its folder (``model/``, ``report.json``)."""
    from . import zoo

    def builder(tmp: Path) -> None:
        model, tokenizer = zoo.load_tiny("base")
        records = judge_transcripts(config.n_transcripts, config.seed, criteria=config.criteria, tokenizer=tokenizer)
        sft = SFTConfig(steps=config.steps, batch_size=config.batch_size, lr=config.lr, save_every=config.steps,
                        lora=False, seed=config.seed)
        t0 = time.perf_counter()
        model, log = train_lora_sft(model, tokenizer, records, sft, tmp / "versions", progress=progress)
        model.save_pretrained(tmp / "model")
        shutil.rmtree(tmp / "versions", ignore_errors=True)
        (tmp / "report.json").write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "log": log},
                                                    indent=1))

    return cache.build_once("judges", "local-judge", {**dataclasses.asdict(config), "zoo": zoo.TinyConfig().key()},
                            builder, version=1)


def load_local_judge(config: LocalJudgeConfig = LocalJudgeConfig(), *, progress: bool = True) -> LMJudge:
    """The tiny local LM judge (built on first use, about a minute on two cores)."""
    from transformers import AutoModelForCausalLM

    from . import zoo

    folder = build_local_judge(config, progress=progress)
    _, tokenizer = zoo.load_tiny("base")
    model = AutoModelForCausalLM.from_pretrained(folder / "model").eval()
    return LMJudge(model, tokenizer, name="local LM judge")


# ====================================================================================== OpenAI-compatible API


class JudgeConfigError(RuntimeError):
    """The API judge is not configured (no key, no server address)."""


class JudgeServerError(RuntimeError):
    """The judge server could not be reached, refused the request, or answered in an unexpected form."""


_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    return host in ("localhost", "127.0.0.1", "::1") or host.startswith("127.")


class ChatClient:
    """A minimal client for OpenAI-compatible ``/chat/completions`` (OpenAI, vLLM, Ollama, llama.cpp, ...).

    Settings come from the arguments or the environment: ``COURSE_JUDGE_BASE_URL`` (else ``OPENAI_BASE_URL``,
    else OpenAI's), ``COURSE_JUDGE_API_KEY`` (else ``OPENAI_API_KEY``; a server on this machine needs none) and
    ``COURSE_JUDGE_MODEL``. Each request has a ``timeout``; connection errors, timeouts and the statuses that say
    "try again" (429, 5xx) are retried ``retries`` times with exponential backoff (``backoff * 2**attempt``
    seconds, or the server's ``Retry-After``); answers are cached on disk as JSON, keyed by the model, the
    messages and the sampling settings, so a second run (or a notebook re-run) costs nothing.
    """

    def __init__(self, model: str | None = None, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 30.0, retries: int = 3, backoff: float = 1.0, temperature: float = 0.0,
                 max_tokens: int = 96, cache_dir: str | os.PathLike | None = None, use_cache: bool = True):
        self.base_url = (base_url or os.environ.get("COURSE_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
                         or "https://api.openai.com/v1").rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise JudgeConfigError(f"the judge's base URL must start with http:// or https://, got {self.base_url!r} "
                                   "(set COURSE_JUDGE_BASE_URL, e.g. http://localhost:8000/v1)")
        self.api_key = api_key or os.environ.get("COURSE_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not self.api_key and not _is_loopback(self.base_url):
            raise JudgeConfigError(
                f"the API judge needs a key for {self.base_url}: set OPENAI_API_KEY (or COURSE_JUDGE_API_KEY), or "
                "pass api_key=...; a server on this machine (vLLM, Ollama) needs none: set "
                "COURSE_JUDGE_BASE_URL=http://localhost:8000/v1 (vLLM) or http://localhost:11434/v1 (Ollama)")
        self.model = model or os.environ.get("COURSE_JUDGE_MODEL") or "gpt-4o-mini"
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.temperature, self.max_tokens, self.use_cache = temperature, max_tokens, use_cache
        self.cache_dir = Path(cache_dir) if cache_dir else cache.cache_root() / "judge-api"
        self.stats = {"requests": 0, "cache_hits": 0, "retries": 0}
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return self.base_url + "/chat/completions"

    def _key(self, messages: list[dict]) -> str:
        blob = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cached(self, key: str) -> str | None:
        path = self.cache_dir / key[:2] / f"{key}.json"
        if not (self.use_cache and path.exists()):
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))["content"]
        except (ValueError, KeyError):
            return None  # a damaged entry is asked again and overwritten

    def _store(self, key: str, messages: list[dict], content: str) -> None:
        if not self.use_cache:
            return
        folder = self.cache_dir / key[:2]
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"model": self.model, "messages": messages, "content": content, "created": time.time()}, f)
        os.replace(tmp, folder / f"{key}.json")

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def complete(self, messages: list[dict]) -> str:
        """The assistant's reply to ``messages`` (from the disk cache if this exact request was answered before)."""
        key = self._key(messages)
        hit = self._cached(key)
        if hit is not None:
            self._count("cache_hits")
            return hit
        content = self._request(messages)
        self._store(key, messages, content)
        return content

    def complete_many(self, batch: Sequence[list[dict]], *, max_workers: int = 4) -> list[str]:
        """:meth:`complete` for several conversations, ``max_workers`` requests at a time, answers in order."""
        if max_workers <= 1 or len(batch) <= 1:
            return [self.complete(m) for m in batch]
        with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
            return list(pool.map(self.complete, batch))

    def _request(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                self._count("retries")
            self._count("requests")
            wait = self.backoff * 2**attempt
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return self._content(r.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code in (401, 403):
                    raise JudgeServerError(f"the judge server at {self.url} refused the API key (HTTP {e.code}): "
                                           "check OPENAI_API_KEY / COURSE_JUDGE_API_KEY. "
                                           f"Server said: {detail}") from None
                if e.code not in _RETRY_STATUS:
                    raise JudgeServerError(f"the judge server at {self.url} rejected the request (HTTP {e.code}, "
                                           f"model {self.model!r}): {detail}") from None
                last = f"HTTP {e.code}: {detail}"
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = min(float(retry_after), 60.0)
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
                    socket.timeout) as e:
                reason = getattr(e, "reason", e)
                if isinstance(reason, (TimeoutError, socket.timeout)) or isinstance(e, (TimeoutError, socket.timeout)):
                    last = f"no answer within {self.timeout:g} s (timeout)"
                else:
                    last = f"{type(reason).__name__}: {reason}"
            if attempt < self.retries:
                time.sleep(wait)
        raise JudgeServerError(
            f"cannot get an answer from the judge server at {self.url} after {self.retries + 1} tries ({last}). "
            "Is it running and reachable? Start a local one (e.g. `vllm serve MODEL` or `ollama serve`) or set "
            "COURSE_JUDGE_BASE_URL to one that is.")

    def _content(self, raw: bytes) -> str:
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeServerError(f"the judge server at {self.url} answered without choices[0].message.content: "
                                   f"{raw[:200]!r}") from None
        if not isinstance(content, str):
            raise JudgeServerError(f"the judge server at {self.url} sent a non-text message content: {content!r}")
        return content


class ChatAPIJudge(Judge):
    """A judge behind an OpenAI-compatible chat API (see :class:`ChatClient` for settings, retries and cache)."""

    def __init__(self, client: ChatClient | None = None, *, instruction: bool = True, system: str | None = None,
                 max_workers: int = 4, **client_kwargs):
        self.client = client or ChatClient(**client_kwargs)
        self.instruction, self.system, self.max_workers = instruction, system, max_workers
        self.name = f"API judge ({self.client.model})"

    def reason(self, prompts, responses, criterion):
        batch = [judge_messages(criterion, p, r, instruction=self.instruction, system=self.system)
                 for p, r in zip(prompts, responses)]
        return [parse_verdict(t) for t in self.client.complete_many(batch, max_workers=self.max_workers)]


class ChatServer:
    """A small OpenAI-compatible server on this machine's loopback, answering with ``complete(messages)``.

    For offline demonstrations and tests (a vLLM or Ollama server plays this part for real): ``with
    ChatServer(fn) as server: ChatClient(base_url=server.base_url)``. Serves ``POST /v1/chat/completions`` and
    ``GET /v1/models``; binds to loopback only.
    """

    def __init__(self, complete: Callable[[list[dict]], str], *, model: str = "local", host: str = "127.0.0.1",
                 port: int = 0):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        if not _is_loopback(f"http://{host}/"):
            raise ValueError(f"ChatServer binds to loopback only, not {host!r}")
        server_self = self
        self.complete, self.model, self.requests = complete, model, 0

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: nothing on stderr
                pass

            def _send(self, code: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": server_self.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    content = server_self.complete(request["messages"])
                except Exception as e:  # a bad request or a failing model: answer like a server would
                    self._send(500, {"error": {"message": f"{type(e).__name__}: {e}"}})
                    return
                server_self.requests += 1
                self._send(200, {"id": f"chatcmpl-{server_self.requests}", "object": "chat.completion",
                                 "model": request.get("model", server_self.model),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}]})

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://{host}:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ChatServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def lm_chat_fn(model, tokenizer, *, max_new_tokens: int = 24) -> Callable[[list[dict]], str]:
    """``complete(messages) -> str`` for :class:`ChatServer` from a local causal LM (greedy, one turn)."""

    def complete(messages: list[dict]) -> str:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        roll = generate_turn(model, tokenizer, [text], max_new_tokens=max_new_tokens, temperature=0.0,
                             add_special_tokens=False)
        return roll.responses[0].strip()

    return complete


# ============================================================================================== aggregation


def score_matrix(judges: Sequence[Judge], prompts: Sequence[str], responses: Sequence[str],
                 criteria: Sequence[str | Criterion] = ("socratic",), sentiment=None, *,
                 threshold: float = 0.5) -> torch.Tensor:
    """Scores of every judge on every criterion: a (J, C, B) float tensor with entries in {-1, 0, +1}."""
    return torch.stack([torch.stack([j.scores(prompts, responses, c, sentiment, threshold=threshold)
                                     for c in criteria]) for j in judges])


def aggregate(scores: torch.Tensor, *, judge_weights: Sequence[float] | None = None,
              criterion_weights: Sequence[float] | None = None, how: str = "mean") -> torch.Tensor:
    """One reward per reply from a (J, C, B) tensor of judges' scores on criteria. Returns (B,) floats.

    First over judges, per criterion: ``"mean"`` (weighted mean), ``"majority"`` (sign of the weighted sum: the
    side with more weight wins, a tie scores 0) or ``"veto"`` (the lowest score: one judge's -1 is final). Then a
    weighted mean over criteria. Weights default to equal; they need not sum to 1.
    """
    if scores.dim() != 3:
        raise ValueError(f"scores must be (judges, criteria, replies), got shape {tuple(scores.shape)}")
    J, C, _ = scores.shape
    wj = torch.as_tensor(judge_weights if judge_weights is not None else [1.0] * J, dtype=scores.dtype)
    wc = torch.as_tensor(criterion_weights if criterion_weights is not None else [1.0] * C, dtype=scores.dtype)
    if wj.shape != (J,) or wc.shape != (C,):
        raise ValueError(f"need {J} judge weights and {C} criterion weights, "
                         f"got {tuple(wj.shape)} and {tuple(wc.shape)}")
    if (wj < 0).any() or (wc < 0).any() or wj.sum() <= 0 or wc.sum() <= 0:
        raise ValueError("weights must be non-negative and not all zero")
    weighted = (scores * wj[:, None, None]).sum(0)  # (C, B)
    if how == "mean":
        per_criterion = weighted / wj.sum()
    elif how == "majority":
        per_criterion = torch.sign(weighted)
    elif how == "veto":
        per_criterion = scores[wj > 0].min(0).values
    else:
        raise ValueError(f"how must be 'mean', 'majority' or 'veto', got {how!r}")
    return (per_criterion * wc[:, None]).sum(0) / wc.sum()


def judge_reward(judges: Judge | Sequence[Judge], sentiment=None, *, criteria: Sequence[str] = ("socratic",),
                 judge_weights=None, criterion_weights=None, how: str = "mean", threshold: float = 0.5):
    """A PPO reward function ``reward_fn(prompts, responses) -> (B,)`` from judges, criteria and an aggregation.

    The function counts the replies it judged in ``reward_fn.calls``.
    """
    judges = [judges] if isinstance(judges, Judge) else list(judges)

    def reward_fn(prompts: list[str], responses: list[str]) -> torch.Tensor:
        reward_fn.calls += len(responses)
        s = score_matrix(judges, prompts, responses, criteria, sentiment, threshold=threshold)
        return aggregate(s, judge_weights=judge_weights, criterion_weights=criterion_weights, how=how)

    reward_fn.calls = 0
    return reward_fn


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How two judges' {-1, 0, +1} scores agree: raw agreement and Cohen's kappa (agreement beyond chance)."""
    a, b = torch.as_tensor(a).long().flatten(), torch.as_tensor(b).long().flatten()
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError("agreement needs two non-empty score vectors of the same length")
    observed = (a == b).double().mean().item()
    chance = sum(((a == k).double().mean() * (b == k).double().mean()).item() for k in (-1, 0, 1))
    kappa = (observed - chance) / (1 - chance) if chance < 1 else 1.0
    return {"agreement": observed, "kappa": kappa}
