"""The Socratic dialogues of the Agora: dialogue data written for the course, in the Agora's format
(``User: ...\nAssistant: ...``), and the turn stop (generation that ends at the end of the speaker's turn).

Used by week 5 (:mod:`helpers.socratic`) and by the judges (:mod:`helpers.judges`), which sit above it.
"""

from __future__ import annotations

import random
import sys
from typing import Sequence

import torch

from . import agora, lm

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
