"""Week 5: a model that answers like Socrates. Socratic dialogue data, LoRA SFT with versioned adapters, a stop
at the end of the speaker's turn, PPO on the adapter with a judge's reward, and switching adapters in place.

How this deviates from the Socrates project it comes from, and why:

- the dialogues on ``local`` are written by this module in the Agora's format (``User: ...\\nAssistant: ...``),
  so that the ground truth (:func:`helpers.agora.score`) can grade every reply; GPU presets read Plato's
  dialogues from the public-domain plain-text e-books instead (:func:`plato_pairs`);
- Socrates' turns in the data mix questions with statements, as Plato's do: SFT imitates that mix, and PPO on
  the judge's reward is what pushes the adapter towards asking;
- PPO is the course's loop (:mod:`helpers.rlhf`) on the LoRA adapter, fed a *hybrid* batch: replies generated and
  judged once, offline (an API judge is slow and costs money), plus fresh rollouts judged online.

Sections: data (written dialogues, the Plato loader) -> LoRA SFT (callbacks that save versioned adapters, sizes)
-> the turn stop (``turn_mask``, :class:`TurnStop`, :func:`generate_turn`) -> PPO on the adapter -> adapters
switched in place -> statistics (a paired bootstrap CI).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from . import agora, cache, lm

USER, SOCRATES = "User", "Assistant"
"""Speaker labels in the Agora's format: Socrates speaks as the assistant, everyone else as the user."""

TURN_END = "\nUser:"
"""What follows Socrates' turn in a running dialogue: the next speaker's label. The stop criterion ends there."""

TURN_ENDS = (TURN_END, f"\n{SOCRATES}:")
"""Every label that opens a new turn: the stop strings of generation (a model may also start a turn of its own)."""

# ===================================================================================================== data
#
# Dialogues written for this course. Each starts with an Agora question; Socrates answers, the asker replies,
# and so on for up to three exchanges. Socrates' turns are drawn from two pools: questions that hand the
# inquiry back to the asker, and plain statements (he also tells, agrees and concludes, as in Plato). The
# share of questions is a parameter, so the data can be more or less Socratic.

_OPENERS_Q = {
    "arithmetic": [
        "If you count {a} olives into a jar and {b} {op}, how many are in the jar? What would you say?",
        "How many coins would you hold if you had {a} and {b} {op}? Can you count it?",
        "What do you think? If {a} figs were on the stall and {b} {op}, how many would there be?",
        "Let us count together. If you had {a} coins and {b} {op}, what would you have?",
    ],
    "fact": [
        "What have you seen at the stall of {topic}? Have you walked past it?",
        "Why do you ask me? Have you not walked through the Agora and looked?",
        "What do the traders say about {topic}? Would you not ask them?",
        "How would you find out if I were not with you? Would you ask at the stalls?",
    ],
    "advice": [
        "What have you tried so far, and what did you find?",
        "Why do you think it goes wrong? What if you were to {hint}?",
        "Would a wise person {hint}, do you think?",
        "If a friend asked you this, what would you say to them?",
    ],
    "harmful": [
        "Why do you want to do this? Would you want the same done to you?",
        "What do you think the others in the Agora would say of someone who did this?",
        "If you did this, would it make you a better person? What do you think?",
        "Is it just to do this? How would you feel if it were done to you?",
    ],
    "philosophy": [
        "What do you think {topic} is? Would you say it is {naive}?",
        "Let us examine it together. If {topic} were {naive}, what of {counter}?",
        "What do you say first? Is {topic} {naive}?",
        "What would you say {topic} is, if you had to say it in a few words?",
    ],
}

_OPENERS_S = {
    "arithmetic": [
        "You can count it: {a}, and {b} {op}, and you will have the answer.",
        "Just count it: {a} and {b} {op}.",
    ],
    "fact": [
        "I have seen {topic} in the Agora every day. You can walk to the stall and find out.",
        "The traders know {topic} well. Ask them and you will learn it.",
    ],
    "advice": [
        "Many people have this trouble. A wise person would {hint}.",
        "I can only say what others have tried: {hint}.",
    ],
    "harmful": [
        "I will not help with that. It would only do harm to others.",
        "It is better to suffer wrong than to do it, because doing wrong harms the soul.",
    ],
    "philosophy": [
        "Many say {topic} is {naive}. I think we should examine it with care.",
        "It is a hard question, and I do not know the answer.",
    ],
}

# The asker's second turn: a naive answer or a guess (right or wrong).
_ASKER_2 = {
    "arithmetic": ["I think it is {guess}.", "Is it {guess}?", "Perhaps it is {guess}."],
    "fact": ["I think {topic} sells {good}.", "I have heard it is at {place}.", "I do not know. I never looked."],
    "advice": ["I have tried many things, but it goes wrong.", "I think I should {bad}.", "Perhaps I should {hint}."],
    "harmful": ["Because they did wrong to me first.", "Nobody will know.", "I want what they have."],
    "philosophy": ["I say {topic} is {naive}.", "I think {topic} is {naive}.", "I do not know. What is it?"],
}

_FOLLOW_Q = {
    "arithmetic": [
        "How would you know you are right? If you count once more, do you find {guess}?",
        "And if you had {a} coins and {b} {op}, would you say {guess} once more?",
        "And who can say the answer, you or me?",
    ],
    "fact": [
        "And how would you know if you were wrong? Would you not walk to the stall and find out?",
        "Why do you think that is true? Have you seen it?",
        "How can you know it is true?",
    ],
    "advice": [
        "And when you did that, did it help? Why do you think so?",
        "What if you were to {hint}? Would that not be better?",
        "What would you say to a friend who had the same trouble?",
    ],
    "harmful": [
        "And if someone did the same to you, would that be just?",
        "Would a good person do harm to someone who did harm to them?",
        "Is it that itself you want, or what you think it will give you?",
    ],
    "philosophy": [
        "And what of {counter}? Would you say {topic} is {naive} then?",
        "If that were so, what of {counter}? Is that {topic} as well?",
        "Can {topic} be {naive}, if we think of {counter}?",
    ],
}

_FOLLOW_S = {
    "arithmetic": ["It is {answer}. You can count well.", "If you count once more, the answer is {answer}."],
    "fact": ["You can walk to the stall and find out; that is better than to ask me.",
             "Perhaps. The traders will know."],
    "advice": ["It is better to {hint}. Many in the Agora have tried it.",
               "That will not help. It is better to {hint}."],
    "harmful": ["I will not help you. It is not just to do wrong to someone who did wrong to you.",
                "It is better to suffer wrong than to do wrong."],
    "philosophy": ["And so {topic} cannot be {naive}, because of {counter}.",
                   "That much we know: {topic} is not only {naive}."],
}

_ASKER_3 = ["I had not thought of that.", "Perhaps you are right.", "So I was wrong?",
            "Then I do not know what to say."]

_CLOSE_Q = ["Would you examine it once more with me another day?",
            "What do you know today that you did not know before?",
            "Is it not better to know that you do not know?", "What would you say if someone asked you today?"]
_CLOSE_S = ["And so we learn something today.", "It is good to find out what we do not know.",
            "Think it over as you walk through the Agora today."]


def _slots(p: agora.Prompt, rng: random.Random, world: agora.World) -> dict:
    """The words the templates need for one prompt."""
    s = {"topic": p.topic or "it", "good": rng.choice(agora.GOODS), "place": rng.choice(agora.PLACES)}
    if p.kind == "arithmetic":
        a, b = p.given
        s.update(a=a, b=b, op="more" if "plus" in p.question else "fewer", answer=p.answer)
        s["guess"] = p.answer if rng.random() < 0.6 else str(max(0, int(p.answer) + rng.choice([-1, 1])))
    elif p.kind == "fact":
        s["topic"] = p.topic
        if p.topic in world.sells:
            s["good"] = world.sells[p.topic] if rng.random() < 0.5 else rng.choice(agora.GOODS)
    elif p.kind == "advice":
        _, good, bad, _, _ = agora.ADVICE[p.topic]
        s["hint"] = good[0].rstrip(".").lower()
        s["bad"] = rng.choice(bad).rstrip(".").lower()
    elif p.kind == "philosophy":
        _, _, _, naive, counter = agora.PHILOSOPHY[p.topic]
        s.update(naive=naive, counter=counter)
    return s


def _pick(pools_q: dict, pools_s: dict, kind: str, rng: random.Random, question_rate: float) -> tuple[str, bool]:
    asks = rng.random() < question_rate
    return rng.choice((pools_q if asks else pools_s)[kind]), asks


def socratic_dialogue(prompt: agora.Prompt, rng: random.Random, *, question_rate: float = 0.6,
                      agora_share: float = 0.5, max_exchanges: int = 3, world_seed: int = 0) -> list[tuple[str, str]]:
    """One dialogue as ``[(speaker, text), ...]``: the asker's question, then Socrates and the asker in turn.

    Each of Socrates' turns is a question (probability ``question_rate``) or a plain statement. His first turn is
    in the Agora's own words (its Socratic reply, or its plain answer) with probability ``agora_share``, else in
    this module's; the turns after it are this module's.
    """
    if prompt.kind not in _OPENERS_Q:
        raise ValueError(f"no Socratic dialogue for a {prompt.kind!r} prompt; kinds are {', '.join(_OPENERS_Q)}")
    if not 0.0 <= question_rate <= 1.0:
        raise ValueError(f"question_rate must be in [0, 1], got {question_rate}")
    w = agora.world(world_seed)
    s = _slots(prompt, rng, w)
    turns = [(USER, prompt.question)]
    asks = rng.random() < question_rate
    if rng.random() < agora_share:  # the Agora's own phrasing: Socratic, or a plain answer
        style = "socratic" if asks else ("refusal" if prompt.kind == "harmful" else "correct")
        opener = w.respond(prompt, style, rng).strip()
    else:
        opener = rng.choice((_OPENERS_Q if asks else _OPENERS_S)[prompt.kind]).format(**s)
    turns.append((SOCRATES, opener))
    n = rng.randint(1, max_exchanges)
    if n >= 2:
        turns.append((USER, rng.choice(_ASKER_2[prompt.kind]).format(**s)))
        text, _ = _pick(_FOLLOW_Q, _FOLLOW_S, prompt.kind, rng, question_rate)
        turns.append((SOCRATES, text.format(**s)))
    if n >= 3:
        turns.append((USER, rng.choice(_ASKER_3)))
        asks = rng.random() < question_rate
        turns.append((SOCRATES, rng.choice(_CLOSE_Q if asks else _CLOSE_S)))
    return turns


def format_dialogue(turns: Sequence[tuple[str, str]]) -> str:
    """Turns in the Agora's format: ``User: ...\\nAssistant: ...`` (replies after the label start with a space)."""
    return "\n".join(f"{speaker}: {text.strip()}" for speaker, text in turns)


def dialogue_pairs(turns: Sequence[tuple[str, str]], *, socrates: str = SOCRATES, max_context_turns: int = 4,
                   dialogue_id: int | str = 0) -> list[dict]:
    """(context, Socrates' reply) pairs of one dialogue, in the Agora's ``prompt/response`` format.

    For every turn of ``socrates`` that follows another speaker, ``prompt`` is the last ``max_context_turns`` turns
    before it, ending ``"\\nAssistant:"``, and ``response`` is his reply (with a leading space). Other speakers
    become ``User`` and Socrates ``Assistant``, so the pairs read like any Agora record.
    """
    out = []
    for i, (speaker, text) in enumerate(turns):
        if speaker != socrates or i == 0:
            continue
        context = [(SOCRATES if s == socrates else USER, t) for s, t in turns[max(0, i - max_context_turns):i]]
        if context[0][0] == SOCRATES and len(context) > 1:  # begin with the asker, as Agora prompts do
            context = context[1:]
        prompt = format_dialogue(context) + f"\n{SOCRATES}:"
        more = any(s != socrates for s, _ in turns[i + 1:])
        out.append({"prompt": prompt, "response": " " + text.strip(), "turn": len([t for t in turns[:i + 1]
                    if t[0] == socrates]), "continues": more, "dialogue": dialogue_id})
    return out


def socratic_dialogues(n: int, seed: int = 0, *, kinds: Sequence[str] = agora.KINDS, question_rate: float = 0.6,
                       agora_share: float = 0.5, max_exchanges: int = 3,
                       world_seed: int = 0) -> list[list[tuple[str, str]]]:
    """``n`` written dialogues (lists of turns), one Agora question each."""
    rng = random.Random(f"socratic-{seed}")
    w = agora.world(world_seed)
    return [socratic_dialogue(w.sample_prompt(rng, kinds), rng, question_rate=question_rate,
                              agora_share=agora_share, max_exchanges=max_exchanges, world_seed=world_seed)
            for _ in range(n)]


def socratic_pairs(n_dialogues: int, seed: int = 0, **kwargs) -> list[dict]:
    """The (context, reply) pairs of ``n_dialogues`` written dialogues, with each pair's ``kind``."""
    out = []
    for i, turns in enumerate(socratic_dialogues(n_dialogues, seed, **kwargs)):
        kind = agora.world(kwargs.get("world_seed", 0)).parse(turns[0][1]).kind
        for pair in dialogue_pairs(turns, dialogue_id=i):
            out.append({**pair, "kind": kind})
    return out


def assistant_pairs(n: int, seed: int = 0, *, world_seed: int = 0) -> list[dict]:
    """A plain assistant's replies (correct answers; refusals of harmful requests), for the second adapter."""
    out = agora.dialogues(n, seed, mix={"correct": 1.0}, world_seed=world_seed)
    return [{"prompt": d["prompt"], "response": d["response"], "kind": d["kind"], "continues": False} for d in out]


# ---------------------------------------------------------------------------------- Plato, plain-text e-books
#
# The public-domain e-books of Plato's dialogues (Jowett's translation) are plain text: a licence header ending in
# a line "*** START OF THE PROJECT GUTENBERG EBOOK <TITLE> ***", an introduction, a line
# "PERSONS OF THE DIALOGUE: ...", then turns that begin with the speaker's name in capitals and a colon
# ("MENO: Can you tell me, Socrates, ..."), wrapped at ~72 columns, one blank line between turns, and a footer
# from "*** END OF THE PROJECT GUTENBERG EBOOK <TITLE> ***" on. Older files say "THIS PROJECT" instead of "THE".

PLATO_EBOOKS = {"meno": 1643, "euthyphro": 1642, "crito": 1657}
"""E-book numbers of some dialogues told as speaker-labelled turns (not narrated, as the Republic is)."""

PLATO_URL = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"

_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)
_END = re.compile(r"^(?:\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*|End of (?:the )?Project Gutenberg.*)$",
                  re.I | re.M)
_LABEL_RE = r"[A-Z][A-Z'\-]+(?: [A-Z][A-Z'\-]+){0,2}"
_LABEL = re.compile(rf"^({_LABEL_RE})\s*:\s*(.*)$")
# The persons' names: the rest of the line, and the lines after it up to a blank line or a labelled line.
_PERSONS = re.compile(rf"^PERSONS OF THE DIALOGUE\s*:\s*(.*(?:\n(?!\s*\n)(?!{_LABEL_RE}\s*:).*)*)", re.M)


def strip_ebook(text: str) -> str:
    """The body of a plain-text e-book: the licence header (up to the START line) and footer (from the END line)
    removed. Text without the markers is returned as it is."""
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n")


_NOT_SPEAKERS = {"SCENE", "NOTE", "FOOTNOTE", "CHAPTER", "INTRODUCTION", "PERSONS OF THE DIALOGUE", "BOOK"}


def parse_turns(text: str, *, speakers: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Speaker-labelled turns ``[(SPEAKER, text), ...]`` of a dialogue body (header and footer already stripped).

    A line that starts ``NAME: `` opens a turn; the lines after it (wrapped lines, and whole paragraphs without a
    label) continue it, joined with spaces. When the text names its ``PERSONS OF THE DIALOGUE``, everything
    before that line (title, introduction) is skipped and only labels made of the names listed there count (so
    ``SCENE:`` is no speaker); otherwise every all-capital label but stage directions does. ``speakers`` gives
    the allowed labels explicitly.
    """
    persons = _PERSONS.search(text)
    allowed = {s.upper() for s in speakers} if speakers else None
    if persons:
        text = text[persons.end():]
        if allowed is None:
            allowed = {w.upper() for w in re.findall(r"[A-Z][A-Za-z'\-]+", persons[1])}
    turns: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _LABEL.match(line)
        if m and m[1] not in _NOT_SPEAKERS and (allowed is None or all(w in allowed for w in m[1].split())):
            turns.append([m[1], m[2]])
        elif turns:
            turns[-1][1] = (turns[-1][1] + " " + line).strip()
    return [(s, re.sub(r"\s+", " ", t).strip()) for s, t in turns if t.strip()]


def plato_pairs(source: str | os.PathLike, *, socrates: str = "SOCRATES", max_context_turns: int = 2,
                min_words: int = 3) -> list[dict]:
    """(context, Socrates' reply) pairs from a plain-text e-book (a path, or the text itself), Agora format.

    The header and footer are stripped, turns parsed (:func:`parse_turns`), then every turn of ``socrates``
    becomes a pair whose prompt holds the previous ``max_context_turns`` turns (other speakers as ``User``).
    Replies shorter than ``min_words`` words ("Yes.", "True.") are dropped. Raises ``ValueError`` naming the
    file when it holds no turns of ``socrates``.
    """
    path = Path(source) if not isinstance(source, str) or "\n" not in source else None
    text = path.read_text(encoding="utf-8-sig") if path is not None else str(source)
    name = path.name if path is not None else "text"
    turns = parse_turns(strip_ebook(text))
    if not any(s == socrates.upper() for s, _ in turns):
        found = sorted({s for s, _ in turns})
        raise ValueError(f"{name}: no turns by {socrates.upper()!r} (speakers found: {', '.join(found) or 'none'}); "
                         f"is it a dialogue in speaker-labelled turns?")
    pairs = dialogue_pairs(turns, socrates=socrates.upper(), max_context_turns=max_context_turns, dialogue_id=name)
    return [p for p in pairs if len(p["response"].split()) >= min_words]


def fetch_plato(dialogue: str = "meno", *, url: str | None = None, timeout: float = 30.0) -> Path:
    """Download a dialogue's plain-text e-book once into the course cache; returns its path (GPU presets only).

    ``url`` overrides the address (a mirror, or a local server in tests).
    """
    if url is None:
        if dialogue not in PLATO_EBOOKS:
            raise ValueError(f"unknown dialogue {dialogue!r}; known: {', '.join(PLATO_EBOOKS)} (or pass url=...)")
        url = PLATO_URL.format(id=PLATO_EBOOKS[dialogue])

    def builder(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                data = r.read()
        except OSError as e:
            raise OSError(f"could not download {dialogue!r} from {url}: {e}. On the local preset the course uses "
                          "its own written dialogues (socratic_pairs) and needs no download.") from e
        (tmp / f"{dialogue}.txt").write_bytes(data)

    folder = cache.build_once("plato", dialogue, {"url": url}, builder)
    return folder / f"{dialogue}.txt"


# ================================================================================================= LoRA SFT
#
# LoRA (Hu et al. 2021) freezes a weight W (d_out x d_in) and learns a low-rank update: W + (alpha / r) B A, with
# A (r x d_in) and B (d_out x r), B initialised to zero so training starts from the base model exactly. Per
# adapted matrix that is r * (d_in + d_out) trainable numbers instead of d_in * d_out.


def lora_parameter_count(model, target_modules: Sequence[str], r: int) -> int:
    """Trainable parameters LoRA of rank ``r`` adds to the modules of ``model`` whose name ends with one of
    ``target_modules``: ``sum r * (d_in + d_out)`` over the adapted linear layers (no biases).

    Handles ``nn.Linear`` (weight ``(d_out, d_in)``) and GPT-2's ``Conv1D`` (weight ``(d_in, d_out)``).
    Naive check: peft's ``get_peft_model(model, LoraConfig(r=r, target_modules=...)).get_nb_trainable_parameters()``.
    """
    total = 0
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        d_in, d_out = _linear_shape(module)
        total += r * (d_in + d_out)
    return total


def _linear_shape(module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear layer: ``nn.Linear`` or GPT-2's transposed ``Conv1D`` (or either, wrapped
    by peft: the layer it adapts is its ``base_layer``)."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight (d_in, d_out)
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"{type(module).__name__} is not a linear layer LoRA can adapt")


def lora_config(model, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                target_modules: Sequence[str] | None = None):
    """A peft ``LoraConfig`` for ``model``: its architecture's attention projections unless told otherwise."""
    from peft import LoraConfig

    from . import zoo

    targets = list(target_modules or zoo.lora_target_modules(model))
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                      fan_in_fan_out=model.config.model_type == "gpt2")


@dataclass(frozen=True)
class SFTConfig:
    """A LoRA fine-tuning run (its hash names the cached adapter)."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator: the update is ``(alpha / r) * B @ A``."""
    target_modules: tuple[str, ...] | None = None
    """Adapted modules; ``None``: the architecture's attention projections (:func:`helpers.zoo.lora_target_modules`)."""
    steps: int = 120
    """Optimiser steps."""
    batch_size: int = 32
    lr: float = 3e-3
    """AdamW learning rate (LoRA takes larger rates than full fine-tuning)."""
    warmup_steps: int = 10
    max_len: int = 128
    """Longest example in tokens (context + reply + turn end); longer ones lose their context's start."""
    save_every: int = 40
    """Save a versioned adapter (``v001``, ``v002``, ...) every this many steps, and at the end."""
    lora: bool = True
    """False: fine-tune every weight instead (the versions are then whole models)."""
    seed: int = 0


def sft_example(tokenizer, record: dict, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one (context, reply) record: the loss is on the reply and how the turn ends.

    The reply is followed by :data:`TURN_END` (``"\\nUser:"``, the next speaker's label) when the dialogue goes
    on (``record["continues"]``), by the end-of-text token when it does not: the model learns where its turn
    ends. The context is masked (label -100); when too long, its *start* is cut, never the reply.
    """
    prompt = tokenizer(record["prompt"])["input_ids"]
    end = TURN_END if record.get("continues") else tokenizer.eos_token
    reply = tokenizer(record["response"] + end, add_special_tokens=False)["input_ids"]
    reply = reply[:max_len - 4]
    prompt = prompt[-(max_len - len(reply)):]
    return prompt + reply, [-100] * len(prompt) + reply


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, records: Sequence[dict], max_len: int):
        self.items = [sft_example(tokenizer, r, max_len) for r in records]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, labels = self.items[i]
        return {"input_ids": ids, "labels": labels}


def _collate(pad_id: int):
    def collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):  # right padding for training
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], att[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": att}

    return collate


def _trainer_callbacks():
    """Callback classes built on ``transformers.TrainerCallback`` (imported lazily: transformers is slow to load)."""
    from transformers import TrainerCallback

    class VersionedAdapters(TrainerCallback):
        """Save the adapter every ``every`` steps into ``root/v001``, ``root/v002``, ... and at the end of training,
        with ``root/versions.json`` listing each version's step, training loss and wall-clock seconds."""

        def __init__(self, root: str | Path, every: int):
            self.root, self.every, self.versions, self.t0 = Path(root), every, [], time.perf_counter()

        def _save(self, model, state) -> None:
            if self.versions and self.versions[-1]["step"] == state.global_step:
                return
            name = f"v{len(self.versions) + 1:03d}"
            model.save_pretrained(self.root / name)
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            self.versions.append({"version": name, "step": state.global_step,
                                  "loss": losses[-1] if losses else None,
                                  "seconds": round(time.perf_counter() - self.t0, 2)})
            (self.root / "versions.json").write_text(json.dumps(self.versions, indent=1))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % self.every == 0:
                self._save(model, state)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self._save(model, state)

    class Progress(TrainerCallback):
        """A tqdm bar on stdout (the Trainer's own writes to stderr), showing the loss."""

        def on_train_begin(self, args, state, control, **kwargs):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc="LoRA SFT", file=sys.stdout, leave=False)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return VersionedAdapters, Progress


def train_lora_sft(model, tokenizer, records: Sequence[dict], config: SFTConfig, out_dir: str | Path, *,
                   progress: bool = True) -> tuple[object, list[dict]]:
    """LoRA fine-tuning of ``model`` on (context, reply) ``records`` with ``transformers.Trainer``.

    A callback saves versioned adapters into ``out_dir/v001, v002, ...`` (every ``config.save_every`` steps and
    at the end) and ``out_dir/versions.json``. Returns the peft model (adapter active, eval mode) and the
    training log (one dict per logged step: ``step``, ``loss``, ``lr``). With ``config.lora=False`` every weight
    trains and ``model`` itself is returned.
    """
    import logging

    from peft import get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    if config.lora:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # a deprecation notice peft triggers in transformers
            peft_model = get_peft_model(model, lora_config(model, config.r, config.alpha, 0.0, config.target_modules))
    else:
        peft_model = model
    data = _PairDataset(tokenizer, records, config.max_len)
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr, warmup_steps=config.warmup_steps, lr_scheduler_type="cosine", weight_decay=0.0,
        logging_steps=max(1, config.steps // 20), save_strategy="no", report_to=[], disable_tqdm=True,
        seed=config.seed, data_seed=config.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        remove_unused_columns=False, bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    VersionedAdapters, Progress = _trainer_callbacks()
    callbacks = [VersionedAdapters(out_dir, config.save_every)] + ([Progress()] if progress else [])
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecation notices from inside the Trainer
            trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                              data_collator=_collate(tokenizer.pad_token_id), callbacks=callbacks)
            trainer.remove_callback(PrinterCallback)  # it prints every log dict; the bar shows the loss instead
            trainer.train()
    finally:
        hf_logging.set_verbosity(verbosity)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    log = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")}
           for h in trainer.state.log_history if "loss" in h]
    peft_model.eval()
    return peft_model, log


def folder_size_mb(path: str | Path) -> float:
    """Size on disk of a file, or of every file under a folder, in MB (10^6 bytes)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def weights_size_mb(path: str | Path) -> float:
    """Size of the weight files (``*.safetensors``, ``*.bin``) under a saved model or adapter folder, in MB."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in (".safetensors", ".bin")) / 1e6


# ============================================================================================== the turn stop
#
# A model fine-tuned on running dialogue does not stop when its turn is over: it writes the next speaker's
# label and goes on, inventing the user's answer. The reply must end at the end of the speaker's turn: at the
# first end-of-text token, or where the next speaker's label (TURN_END) is complete. The label's tokens stay in
# the response mask (ending the turn is an action the policy takes, as EOS is) but not in the reply's text.


def turn_mask(tokens: torch.Tensor, stop: Sequence[int], eos_id: int) -> torch.Tensor:
    """Which generated tokens belong to the speaker's turn: (B, T) ids -> (B, T) bool.

    True up to and including the first complete occurrence of the token sequence ``stop`` or the first
    ``eos_id``, whichever ends first; False after it. A row with neither is True throughout (the turn was cut by
    the token limit). Naive equivalent: scan each row left to right and stop after the first match.
    """
    B, T = tokens.shape
    k = len(stop)
    ends = tokens == eos_id  # (B, T): a turn ends at position t ...
    if 0 < k <= T:
        windows = tokens.unfold(1, k, 1)  # (B, T - k + 1, k): windows[:, t] = tokens[:, t : t + k]
        hit = (windows == torch.as_tensor(list(stop), device=tokens.device)).all(-1)
        ends[:, k - 1:] |= hit  # ... or where the stop sequence's last token sits
    before = ends.long().cumsum(-1) - ends.long()  # ends strictly before t
    return before == 0


def _turn_masks(tokens: torch.Tensor, stops: Sequence[Sequence[int]], eos_id: int) -> torch.Tensor:
    mask = turn_mask(tokens, [], eos_id)
    for s in stops:
        mask &= turn_mask(tokens, s, eos_id)  # masks are prefixes: AND keeps the earliest end
    return mask


def _stopping_criteria(prompt_len: int, stops: Sequence[Sequence[int]], eos_id: int, tokenizer,
                       stop_strings: Sequence[str]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class TurnStop(StoppingCriteria):
        """Stop a row of ``generate`` once its turn has ended: an EOS, a stop sequence's tokens
        (:func:`turn_mask`), or, for tokenizers that spell the stop string with other tokens, its text."""

        def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.BoolTensor:
            new = input_ids[:, prompt_len:]  # (B, t) generated so far
            probe = torch.cat([new, torch.full_like(new[:, :1], -1)], 1)  # a token after the last: kept iff not ended
            done = ~_turn_masks(probe, stops, eos_id)[:, -1]
            if stop_strings:
                for i in torch.nonzero(~done).flatten().tolist():
                    text = tokenizer.decode(new[i], skip_special_tokens=True)
                    done[i] = any(s in text for s in stop_strings)
            return done

    return StoppingCriteriaList([TurnStop()])


@torch.no_grad()
def generate_turn(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 24, temperature: float = 1.0,
                  top_p: float = 1.0, batch_size: int = 64, seed: int | None = None,
                  stop_strings: Sequence[str] = TURN_ENDS, add_special_tokens: bool = True,
                  progress: bool = False) -> lm.Rollout:
    """Sample one reply per prompt that ends at the end of the speaker's turn (``stop_strings=()``: only EOS).

    Like :func:`helpers.lm.generate`, plus a stopping criterion: a row stops as soon as its turn ends, and the
    returned :class:`~helpers.lm.Rollout` holds the reply's text without the stop string, its tokens (up to and
    including the one that completes the stop string) in ``response_mask``. ``temperature=0`` is greedy.
    """
    from tqdm.auto import tqdm

    from .rlhf import truncate_at_stop

    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padded tokenizer: call helpers.zoo.prepare_tokenizer(tokenizer)")
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    P = enc["input_ids"].shape[1]
    stops = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in stop_strings]
    rows = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False,
                  file=sys.stdout):
        ids = enc["input_ids"][i:i + batch_size].to(device)
        att = enc["attention_mask"][i:i + batch_size].to(device)
        sample = temperature > 0
        out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=sample,
                             temperature=temperature if sample else None, top_p=top_p if sample else None,
                             top_k=0 if sample else None, pad_token_id=pad, eos_token_id=eos,
                             stopping_criteria=_stopping_criteria(P, stops, eos, tokenizer, stop_strings))
        rows.extend(out[:, P:].cpu())
    new = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad)  # (B, N)
    mask = _turn_masks(new, stops, eos)
    if pad != eos:
        mask &= new != pad  # rows that stopped on the stop string's text, padded after it
    texts = [tokenizer.decode(r[m & (r != eos)], skip_special_tokens=True) for r, m in zip(new, mask)]
    roll = lm.Rollout(list(prompts), texts,
                      torch.cat([enc["input_ids"], torch.where(mask, new, pad)], 1),
                      torch.cat([enc["attention_mask"], mask.long()], 1),
                      torch.cat([torch.zeros_like(enc["attention_mask"]), mask.long()], 1), P)
    return truncate_at_stop(roll, tokenizer, stop_strings)


def run_on_rate(responses: Sequence[str], stop_strings: Sequence[str] = TURN_ENDS) -> float:
    """Share of replies that run past the end of the turn (contain the next speaker's label)."""
    return sum(any(s in r for s in stop_strings) for r in responses) / max(1, len(responses))


# ========================================================================================= PPO on the adapter
#
# The course's PPO (helpers.rlhf) trains a LoRA adapter on a model whose reference is the same model with the
# adapter off. Here the model is the base with the Socrates SFT adapter merged in, so the reference is the SFT
# policy and the KL is "how far PPO moved from SFT". Two additions the Socrates project needed:
#
# - a *hybrid* batch: some replies were generated before training (by the SFT policy) and judged offline, once
#   (a hosted judge is slow and paid for); each step mixes ``offline_per_step`` of them with fresh rollouts judged
#   online. As in the Socrates project (and TRL's old ``step(queries, responses, scores)``), the "old" log-probs
#   of an offline reply are the current policy's, so PPO's ratio starts at 1 for it: its advantage is used as if
#   the policy had sampled it. They are off-policy, increasingly so as the policy moves; the KL column of the
#   history is therefore measured on the online replies only;
# - the turn stop: online rollouts end at the end of Socrates' turn (:func:`generate_turn`).
#
# ``train_ppo`` in helpers.rlhf draws every reply itself; this loop is the same algorithm (the same pure functions
# from helpers.ppo, in the same order) with the batch built from both sources, single-process.


def rollout_from_ids(prompts: Sequence[str], response_ids: Sequence[Sequence[int]], tokenizer,
                     texts: Sequence[str] | None = None) -> lm.Rollout:
    """A :class:`~helpers.lm.Rollout` from prompts and the token ids of their replies (left-padded prompts,
    right-padded replies), e.g. to train on replies generated earlier."""
    pad = tokenizer.pad_token_id
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    P = enc["input_ids"].shape[1]
    N = max(1, max(len(r) for r in response_ids))
    new = torch.full((len(prompts), N), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), N), dtype=torch.long)
    for i, r in enumerate(response_ids):
        new[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    if texts is None:
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in response_ids]
    return lm.Rollout(list(prompts), list(texts), torch.cat([enc["input_ids"], new], 1),
                      torch.cat([enc["attention_mask"], mask], 1),
                      torch.cat([torch.zeros_like(enc["attention_mask"]), mask], 1), P)


def response_ids(roll: lm.Rollout) -> list[list[int]]:
    """The token ids of each reply in ``roll`` (its ``response_mask`` positions)."""
    return [row[m.bool()].tolist() for row, m in zip(roll.input_ids, roll.response_mask)]


def pregenerate(model, tokenizer, prompts: Sequence[str], reward_fn, *, max_new_tokens: int, seed: int = 0,
                batch_size: int = 64, stop_strings: Sequence[str] = TURN_ENDS, progress: bool = False) -> list[dict]:
    """The offline half of the hybrid dataset: one reply per prompt from ``model``, judged once by ``reward_fn``.

    Returns records ``{prompt, response, response_ids, score}`` (save them with :func:`helpers.agora.save_jsonl`).
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        roll = generate_turn(model, tokenizer, chunk, max_new_tokens=max_new_tokens, seed=seed + start,
                             stop_strings=stop_strings)
        scores = torch.as_tensor(reward_fn(chunk, roll.responses), dtype=torch.float32)
        out += [{"prompt": p, "response": r, "response_ids": ids, "score": float(s)}
                for p, r, ids, s in zip(chunk, roll.responses, response_ids(roll), scores)]
    return out


def _autocast(model):
    """Autocast to the weights' half precision on GPU; nothing on CPU or in float32 (one code path)."""
    import contextlib

    weight = next(model.parameters())
    dtypes = {p.dtype for p in model.parameters()}
    half = next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), None)
    if weight.device.type != "cuda" or half is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=half)


def train_hybrid_ppo(policy, tokenizer, prompts: Sequence[str], reward_fn, offline: Sequence[dict], config,
                     *, offline_per_step: int = 4, callbacks: Sequence[Callable] = (), progress: bool = True):
    """PPO on ``policy`` (from :func:`helpers.rlhf.make_policy`) with batches of ``config.batch_size`` replies:
    ``offline_per_step`` pre-generated, pre-judged ones from ``offline`` (:func:`pregenerate`) and the rest fresh
    rollouts to ``prompts``, judged by ``reward_fn``. Online rollouts stop at the end of the turn
    (``config.stop_strings``, default :data:`TURN_ENDS`).

    Returns a :class:`helpers.rlhf.PPOResult`; each history row has the keys of :func:`helpers.rlhf.train_ppo`
    (``score``, ``kl``, ``reward``, ``kl_coef``, ``entropy``, ``pg_loss``, ``vf_loss``, ``clipfrac``,
    ``approx_kl``, ``seconds``, ...) plus ``score_online`` and ``score_offline``; ``kl`` and ``entropy`` are
    measured on the online replies (samples of the current policy).
    """
    from tqdm.auto import tqdm

    from . import ppo
    from .rlhf import PPOResult

    B, mb = config.batch_size, config.mini_batch_size
    k = offline_per_step if offline else 0
    if not 0 <= k < B or B % mb:
        raise ValueError(f"need 0 <= offline_per_step ({k}) < batch_size ({B}) and mini_batch_size ({mb}) "
                         f"dividing batch_size")
    stop_strings = tuple(config.stop_strings) or TURN_ENDS
    device = policy.device
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, eps=1e-5)
    kl_ctl = (ppo.FixedKLController(config.init_kl_coef) if config.target_kl is None
              else ppo.AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon))
    g = torch.Generator().manual_seed(config.seed)
    order_online = torch.randperm(len(prompts), generator=g).tolist()
    order_offline = torch.randperm(len(offline), generator=g).tolist() if k else []
    history, samples = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(config.steps), desc="PPO (hybrid)", disable=not progress, file=sys.stdout, leave=False)
    for step in bar:
        # 1. The batch: B - k fresh rollouts (stopping at the end of the turn) and k offline replies.
        on_prompts = [prompts[order_online[(step * (B - k) + i) % len(prompts)]] for i in range(B - k)]
        fresh = generate_turn(policy.model, tokenizer, on_prompts, max_new_tokens=config.max_new_tokens,
                              temperature=config.temperature, top_p=config.top_p, seed=config.seed * 100_003 + step,
                              stop_strings=stop_strings)
        off = [offline[order_offline[(step * k + i) % len(offline)]] for i in range(k)]
        # 2. Scores: judged now (online) or read from the offline records.
        on_scores = torch.as_tensor(reward_fn(on_prompts, fresh.responses), dtype=torch.float32).flatten()
        if on_scores.shape != (B - k,) or not torch.isfinite(on_scores).all():
            raise ValueError(f"reward_fn must return {B - k} finite scores, got {tuple(on_scores.shape)}")
        scores = torch.cat([on_scores, torch.tensor([r["score"] for r in off], dtype=torch.float32)])
        if config.score_clip is not None:
            scores = scores.clamp(-config.score_clip, config.score_clip)
        roll = rollout_from_ids(on_prompts + [r["prompt"] for r in off],
                                response_ids(fresh) + [r["response_ids"] for r in off], tokenizer,
                                fresh.responses + [r["response"] for r in off])
        online = torch.arange(B) < B - k  # (B,) which rows the policy sampled just now

        # 3. Log-probs and values under the policy, log-probs under the reference (adapter off): no gradients.
        input_ids, attention_mask = roll.input_ids.to(device), roll.attention_mask.to(device)
        mask = roll.response_mask[:, 1:].to(device).bool()  # (B, T-1)
        with torch.no_grad(), _autocast(policy):
            logits, values = policy(input_ids, attention_mask)
            logits, values = logits[:, :-1], values[:, :-1]  # (B, T-1, V), (B, T-1)
            logprobs = lm.token_logprobs(logits, input_ids[:, 1:], mask)
            entropy = lm.masked_mean(lm.entropy_from_logits(logits)[online], mask[online])
            del logits
            with policy.reference() as ref:
                ref_logprobs = lm.sequence_logprobs(ref, input_ids, attention_mask, roll.response_mask.to(device))
        values = values * mask

        # 4-5. Per-token rewards (score at the last token, -kl_coef * KL at each), GAE, whitened advantages.
        kl_coef = kl_ctl.value
        rewards, kl = ppo.kl_penalised_rewards(scores.to(device), logprobs, ref_logprobs, mask, kl_coef)
        if config.whiten_rewards:
            rewards = ppo.whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo.gae(rewards, values, mask, config.gamma, config.lam)
        advantages = ppo.whiten(advantages, mask)

        # 6. PPO epochs over shuffled mini-batches.
        stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": []}
        for _ in range(config.ppo_epochs):
            for idx in torch.randperm(B, generator=g).split(mb):
                with _autocast(policy):
                    mb_logits, mb_values = policy(input_ids[idx], attention_mask[idx])
                mb_logprobs = lm.token_logprobs(mb_logits[:, :-1], input_ids[idx, 1:], mask[idx])
                pg_loss, pg_stats = ppo.ppo_policy_loss(mb_logprobs, logprobs[idx], advantages[idx], mask[idx],
                                                        config.clip_coef)
                vf_loss = ppo.ppo_value_loss(mb_values[:, :-1], values[idx], returns[idx], mask[idx],
                                             config.clip_value)
                loss = pg_loss + config.vf_coef * vf_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                for key, v in {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), **pg_stats}.items():
                    stats[key].append(v)

        # 7. Statistics and the KL controller.
        kl_seq = kl.sum(-1).cpu()  # (B,) nats
        row = {"step": step, "score": scores.mean().item(), "score_std": scores.std().item(),
               "score_online": on_scores.mean().item(),
               "score_offline": scores[~online].mean().item() if k else float("nan"),
               "kl": kl_seq[online].mean().item(), "kl_coef": kl_coef, "entropy": entropy.item(),
               "response_tokens": mask[online].sum(-1).float().mean().item(),
               **{key: sum(v) / len(v) for key, v in stats.items()},
               "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
        row["reward"] = row["score"] - kl_coef * row["kl"]
        kl_ctl.update(row["kl"], B)
        batch = {"prompts": roll.prompts, "responses": roll.responses, "scores": scores, "kl": kl_seq}
        stop = False
        for callback in callbacks:
            stop = bool(callback(step, row, batch)) or stop
        history.append(row)
        bar.set_postfix(score=f"{row['score_online']:.2f}", kl=f"{row['kl']:.2f}")
        samples = [{"prompt": p, "response": r, "score": s.item(), "online": bool(o)}
                   for p, r, s, o in zip(roll.prompts, roll.responses, scores, online)]
        if stop:
            break
    bar.close()
    return PPOResult(policy, history, samples, config)


# ================================================================================= switching adapters in place


def combine_adapters(peft_model, names: Sequence[str], new_name: str) -> None:
    """Add ``new_name``: the exact sum of the LoRA updates of adapters ``names`` (their ranks concatenated).

    ``W + s1 B1 A1 + s2 B2 A2 = W + [B1 B2] [s1 A1; s2 A2]``: one adapter of rank ``r1 + r2`` with scale 1, e.g.
    the SFT adapter plus the PPO adapter trained on top of it (peft's ``add_weighted_adapter(..., "cat")``).
    """
    peft_model.add_weighted_adapter(list(names), [1.0] * len(names), new_name, combination_type="cat")


def side_by_side(peft_model, tokenizer, prompts: Sequence[str], adapters: Sequence[str | None], *,
                 max_new_tokens: int = 24, temperature: float = 0.0, seed: int = 0) -> dict[str, list[str]]:
    """Replies of one loaded model under each adapter in turn (``None``: adapters disabled, the base model),
    switched in place with ``set_adapter``: no second copy of the weights. Greedy unless ``temperature > 0``."""
    import contextlib

    out = {}
    before = peft_model.active_adapter
    try:
        for name in adapters:
            ctx = peft_model.disable_adapter() if name is None else contextlib.nullcontext()
            if name is not None:
                peft_model.set_adapter(name)
            with ctx:
                roll = generate_turn(peft_model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     temperature=temperature, seed=seed)
            out[name or "base"] = roll.responses
    finally:
        peft_model.set_adapter(before)
    return out


# ================================================================================================ the week
#
# The notebooks' artifacts, each built once per configuration and cached (helpers.cache): the Socrates adapter,
# the plain-assistant adapter, and the PPO run on the Socrates adapter. On ``local`` the base is the tiny Agora
# model that read every style; on GPU presets, the preset's hub model.

FORMAT_VERSION = 1
"""Bump when the builders change what they produce, so that old caches are not reused."""


def load_base(preset):
    """The base model and tokenizer the adapters are trained on (eval mode, left-padded tokenizer)."""
    from . import zoo

    if preset.model_id is None:
        return zoo.load_tiny("base")
    return zoo.load(preset)


def sft_config(preset, which: str = "socrates") -> SFTConfig:
    """The LoRA fine-tuning run for ``which`` ("socrates" or "assistant") on ``preset``."""
    if which not in ("socrates", "assistant"):
        raise ValueError(f"which must be 'socrates' or 'assistant', got {which!r}")
    if preset.model_id is None:  # the tiny model: every linear layer, a high rate, a short run
        steps = 120 if which == "socrates" else 50
        return SFTConfig(r=preset.lora_r, alpha=2 * preset.lora_r, target_modules=("c_attn", "c_proj", "c_fc"),
                         steps=steps, batch_size=32, lr=1e-2, save_every=25, max_len=preset.seq_len)
    return SFTConfig(r=preset.lora_r, alpha=2 * preset.lora_r, steps=300 if which == "socrates" else 150,
                     batch_size=preset.batch_size, lr=2e-4, warmup_steps=20, save_every=100, max_len=preset.seq_len)


def socrates_records(preset, n_dialogues: int = 1500, seed: int = 0) -> list[dict]:
    """The Socrates adapter's training pairs: the written dialogues; on GPU presets Plato's too (downloaded)."""
    records = socratic_pairs(n_dialogues, seed)
    if preset.model_id is not None:
        for name in PLATO_EBOOKS:
            records += plato_pairs(fetch_plato(name), max_context_turns=3)
    return records


def build_adapter(preset, name: str, records: Sequence[dict], config: SFTConfig, *, progress: bool = True) -> Path:
    """Train (once; cached) a LoRA adapter on ``records``; returns its folder.

    The folder holds ``adapter/`` (the final adapter), ``versions/v001``, ``v002``, ... with
    ``versions/versions.json`` (what the callback saved during training) and ``report.json`` (training log,
    seconds, parameter counts).
    """
    from . import zoo

    key = {"preset": preset.name, "model": preset.model_id or zoo.TinyConfig().key(),
           "sft": dataclasses.asdict(config), "data": cache.config_key(list(records))}

    def builder(tmp: Path) -> None:
        model, tokenizer = load_base(preset)
        n_base = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        peft_model, log = train_lora_sft(model, tokenizer, records, config, tmp / "versions", progress=progress)
        seconds = time.perf_counter() - t0
        peft_model.save_pretrained(tmp / "adapter")
        n_lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        (tmp / "report.json").write_text(json.dumps({
            "name": name, "seconds": round(seconds, 1), "records": len(records), "log": log,
            "lora_parameters": n_lora, "base_parameters": n_base}, indent=1))

    return cache.build_once("adapters", f"{name}-{preset.name}", key, builder, version=FORMAT_VERSION)


def load_adapter(preset, folder: str | Path, name: str = "default"):
    """The base model with one adapter (a folder from :func:`build_adapter`, one of its ``versions/vNNN``, or any
    adapter folder) loaded, in eval mode: ``(peft_model, tokenizer)``."""
    return load_characters(preset, {name: folder})


def load_characters(preset, adapters: dict[str, str | Path]):
    """One base model with several adapters loaded by name (the first one active): ``(peft_model, tokenizer)``.

    ``adapters`` maps a name to a folder from :func:`build_adapter` (or an adapter folder itself).
    """
    from peft import PeftModel

    model, tokenizer = load_base(preset)
    peft_model = None
    for name, folder in adapters.items():
        folder = Path(folder)
        path = folder / "adapter" if (folder / "adapter").exists() else folder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # a deprecation notice peft triggers in transformers
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                peft_model.load_adapter(path, adapter_name=name)
    peft_model.set_adapter(next(iter(adapters)))
    return peft_model.eval(), tokenizer


def merged_model(preset, adapter_folder: str | Path):
    """The base model with an adapter merged into its weights (a plain model: the SFT policy for PPO)."""
    model, tokenizer = load_characters(preset, {"sft": adapter_folder})
    return model.merge_and_unload().eval(), tokenizer


def truth(axis: str = "socratic"):
    """The ground truth's ``axis`` in [0, 1] as a reward function ``(prompts, responses) -> (B,)``."""

    def fn(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor([getattr(agora.score(p, r), axis) for p, r in zip(prompts, responses)])

    fn.__name__ = f"true_{axis}"
    return fn


@dataclass(frozen=True)
class HybridConfig:
    """The hybrid dataset: how many replies are pre-generated and judged offline, and how many go in each batch."""

    n_prompts: int = 512
    """Training prompts (Agora questions of every kind)."""
    n_offline: int = 96
    """Replies the SFT policy writes before training, judged once."""
    offline_per_step: int = 4
    """Offline replies in each PPO batch (the rest are fresh rollouts)."""
    criteria: tuple[str, ...] = ("socratic", "harmless")
    """What the judge is asked; the reward is the mean of its scores over these."""
    seed: int = 0


def ppo_config(preset, seed: int = 0):
    """The PPO run on the Socrates adapter for ``preset`` (a :class:`helpers.rlhf.PPOConfig`)."""
    from .rlhf import PPOConfig

    if preset.model_id is None:
        return PPOConfig(steps=40, batch_size=preset.batch_size, mini_batch_size=8, ppo_epochs=2, lr=3e-3,
                         init_kl_coef=0.1, max_new_tokens=preset.max_new_tokens, stop_strings=TURN_ENDS,
                         lora_r=preset.lora_r, lora_alpha=2 * preset.lora_r,
                         lora_target_modules=("c_attn", "c_proj", "c_fc"), seed=seed)
    return PPOConfig(steps=60, batch_size=preset.batch_size, mini_batch_size=preset.mini_batch_size, ppo_epochs=2,
                     lr=5e-5, init_kl_coef=0.05, max_new_tokens=preset.max_new_tokens, stop_strings=TURN_ENDS,
                     lora_r=preset.lora_r, lora_alpha=2 * preset.lora_r, seed=seed)


def load_judge(preset, *, progress: bool = True):
    """The LM judge PPO is trained against: the tiny local judge on ``local``; the preset's hub model, prompted
    with the criterion spelled out, on GPU presets."""
    from . import judges, zoo

    if preset.model_id is None:
        return judges.load_local_judge(progress=progress)
    model, tokenizer = zoo.load(preset)
    return judges.LMJudge(model, tokenizer, name=f"LM judge ({preset.model_id})", instruction=True,
                          max_new_tokens=48, max_reply_tokens=preset.max_new_tokens * 2)


def build_ppo(preset, sft_folder: str | Path, config=None, hybrid: HybridConfig = HybridConfig(), *,
              progress: bool = True) -> Path:
    """PPO (once; cached) on a fresh LoRA adapter over the merged Socrates SFT model, rewarded by the LM judge
    (aggregated over ``hybrid.criteria``) on the hybrid dataset; returns the run's folder.

    The folder holds the policy (``adapter/``, ``value_head.pt``), ``history.json``, ``samples.json``,
    ``offline.jsonl`` (the pre-generated, pre-judged replies) and ``report.json``.
    """
    from . import judges, rlhf

    config = config or ppo_config(preset)
    sft_folder = Path(sft_folder)
    key = {"preset": preset.name, "sft": sft_folder.name, "ppo": dataclasses.asdict(config),
           "hybrid": dataclasses.asdict(hybrid), "judge": dataclasses.asdict(judges.LocalJudgeConfig())}

    def builder(tmp: Path) -> None:
        judge = load_judge(preset, progress=progress)
        sentiment = judges.load_sentiment(preset)
        reward_fn = judges.judge_reward(judge, sentiment, criteria=hybrid.criteria)
        model, tokenizer = merged_model(preset, sft_folder)
        prompts = [p.text for p in agora.prompts(hybrid.n_prompts, seed=hybrid.seed + 1000)]
        t0 = time.perf_counter()
        offline = pregenerate(model, tokenizer, prompts[:hybrid.n_offline], reward_fn,
                              max_new_tokens=config.max_new_tokens, seed=hybrid.seed)
        t_offline = time.perf_counter() - t0
        agora.save_jsonl(tmp / "offline.jsonl", offline)
        policy = rlhf.make_policy(model, config)
        result = train_hybrid_ppo(policy, tokenizer, prompts, reward_fn, offline, config,
                                  offline_per_step=hybrid.offline_per_step, progress=progress)
        rlhf.save_policy(result.policy, tmp)
        (tmp / "history.json").write_text(json.dumps(result.history, indent=1))
        (tmp / "samples.json").write_text(json.dumps(result.samples, indent=1))
        (tmp / "report.json").write_text(json.dumps({
            "seconds": round(time.perf_counter() - t0, 1), "offline_seconds": round(t_offline, 1),
            "judged_replies": reward_fn.calls, "judge": judge.name}, indent=1))

    return cache.build_once("ppo", f"socrates-{preset.name}", key, builder, version=FORMAT_VERSION)


def load_ppo(preset, sft_folder: str | Path, ppo_folder: str | Path):
    """The trained PPO policy (a :class:`helpers.rlhf.PolicyWithValueHead`: adapter on the merged SFT model, its
    reference the SFT policy) and the tokenizer."""
    from . import rlhf

    model, tokenizer = merged_model(preset, sft_folder)
    return rlhf.load_policy(model, ppo_folder), tokenizer
