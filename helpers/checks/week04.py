"""Checks for week 4: the critique and revision prompt builders, soft AI labels from log-probs, and the
preference-model loss on soft labels."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from .. import agora, cai
from . import CheckError, check, diagnose, expect_tensor, fresh_seed, run_student

# ------------------------------------------------------------------------------------------ prompt builders


def _prompt_case(seed: int) -> tuple[str, str, cai.Principle, str]:
    """A random request and reply, a principle whose three fields come from different principles (so using the
    wrong field shows), and a critique."""
    rng = random.Random(seed)
    world = agora.world(0)
    p = world.sample_prompt(rng, rng.choice([["harmful"], agora.KINDS]))
    response = world.respond(p, rng.choice(agora.STYLES_FOR_KIND[p.kind]), rng)
    i, j, k = rng.sample(range(len(cai.CONSTITUTION)), 3)
    principle = cai.Principle(f"principle {seed % 97}", cai.CONSTITUTION[i].critique, cai.CONSTITUTION[j].revision,
                              cai.CONSTITUTION[k].comparison)
    return p.text, response, principle, cai.ground_truth_critique(p, response)


def _first_difference(got: str, expected: str) -> str:
    n = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    lo = max(0, n - 25)
    return (f"they first differ at character {n}: yours has {got[lo:n + 25]!r}, expected {expected[lo:n + 25]!r} "
            f"(lengths {len(got)} and {len(expected)})")


def _diagnose_text(got, expected: str, mistakes: dict[str, str], *, label: str, seed: int) -> None:
    if not isinstance(got, str):
        raise CheckError(f"{label} should return a str, got {type(got).__name__}.")
    if got == expected:
        return
    for message, wrong in mistakes.items():
        if got == wrong:
            raise CheckError(f"{label}: {message} (seed {seed})")
    raise CheckError(f"{label}: the prompt is not the expected text; {_first_difference(got, expected)}; seed {seed}.")


def _critique_mistakes(prompt: str, response: str, pr: cai.Principle) -> dict[str, str]:
    tail = f"\nCritique request: {pr.critique}\nCritique:"
    return {
        "there is a space after 'Critique:'. End the prompt with 'Critique:' itself: the model writes the critique "
        "next, and every continuation starts with its own space.": f"{prompt}{response}{tail} ",
        "the reply is missing: the model must see the assistant's reply it is asked to critique.": f"{prompt}{tail}",
        "this uses the principle's revision request; the critique prompt asks principle.critique.":
            f"{prompt}{response}\nCritique request: {pr.revision}\nCritique:",
        "this uses the principle's comparison question; the critique prompt asks principle.critique.":
            f"{prompt}{response}\nCritique request: {pr.comparison}\nCritique:",
        "'Critique request:' must start a new line: put '\\n' before it.":
            f"{prompt}{response} Critique request: {pr.critique}\nCritique:",
        "'Critique:' must start a new line: put '\\n' between the request and 'Critique:'.":
            f"{prompt}{response}\nCritique request: {pr.critique} Critique:",
        "the prompt must end with '\\nCritique:' so that the model writes the critique next.":
            f"{prompt}{response}\nCritique request: {pr.critique}",
        "there is an extra space between the prompt and the reply: the reply already starts with a space.":
            f"{prompt} {response}{tail}",
        "there is an extra space after 'Critique request:' (the template has exactly one).":
            f"{prompt}{response}\nCritique request:  {pr.critique}\nCritique:",
    }


def _revision_mistakes(prompt: str, response: str, pr: cai.Principle, critique: str) -> dict[str, str]:
    head = cai.critique_prompt(prompt, response, pr)
    tail = f"\nRevision request: {pr.revision}\nRevision:"
    return {
        "there is a space after 'Revision:'. End the prompt with 'Revision:' itself; the revision brings its own "
        "leading space.": f"{head}{critique}{tail} ",
        "the critique is missing: write it in right after 'Critique:' (the revision is conditioned on it).":
            f"{head}{tail}",
        "the critique request is missing: the revision prompt is the whole critique prompt with the critique "
        "written in, then the revision request.": f"{prompt}{response}\nCritique:{critique}{tail}",
        "this uses the principle's critique request as the revision request; use principle.revision.":
            f"{head}{critique}\nRevision request: {pr.critique}\nRevision:",
        "there is an extra space before the critique: the critique already starts with a space.":
            f"{head} {critique}{tail}",
        "'Revision request:' must start a new line: put '\\n' before it.":
            f"{head}{critique} Revision request: {pr.revision}\nRevision:",
        "the prompt must end with '\\nRevision:' so that the model writes the revision next.":
            f"{head}{critique}\nRevision request: {pr.revision}",
        "the reply is missing from the revision prompt: the model rewrites the reply it sees.":
            f"{cai.critique_prompt(prompt, '', pr)}{critique}{tail}",
    }


@check
def check_prompt_builders(critique_fn, revision_fn) -> str:
    """``critique_fn(prompt, response, principle) -> str`` and ``revision_fn(prompt, response, principle, critique)``
    against :func:`helpers.cai.critique_prompt` and :func:`helpers.cai.revision_prompt`, on fresh requests and
    principles."""
    seed = fresh_seed()
    for offset in range(4):
        prompt, response, pr, critique = _prompt_case(seed + offset)
        got = run_student(critique_fn, prompt, response, pr, name="build_critique_prompt")
        _diagnose_text(got, cai.critique_prompt(prompt, response, pr), _critique_mistakes(prompt, response, pr),
                       label="build_critique_prompt", seed=seed + offset)
        got = run_student(revision_fn, prompt, response, pr, critique, name="build_revision_prompt")
        _diagnose_text(got, cai.revision_prompt(prompt, response, pr, critique),
                       _revision_mistakes(prompt, response, pr, critique), label="build_revision_prompt",
                       seed=seed + offset)
    # An edited constitution: the builders must read the principle they are given, whatever it says.
    odd = cai.Principle("edited", "Is anything in it unkind?", "Make it kind.", "Which is kinder?")
    prompt, response = "User: What is 2 plus 2?\nAssistant:", " 2 plus 2 is 4."
    got = run_student(critique_fn, prompt, response, odd, name="build_critique_prompt")
    _diagnose_text(got, cai.critique_prompt(prompt, response, odd), _critique_mistakes(prompt, response, odd),
                   label="build_critique_prompt with an edited principle", seed=seed)
    got = run_student(revision_fn, prompt, response, odd, " It is kind.", name="build_revision_prompt")
    _diagnose_text(got, cai.revision_prompt(prompt, response, odd, " It is kind."),
                   _revision_mistakes(prompt, response, odd, " It is kind."),
                   label="build_revision_prompt with an edited principle", seed=seed)
    return "both prompts match the format on random requests, replies and principles"


# ----------------------------------------------------------------------------------- AI labels from log-probs


def _logprob_case(seed: int, N: int = 7, K: int = 4, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logp_a = -(torch.randn(N, K, generator=g) * scale).abs() - 0.1
    logp_b = -(torch.randn(N, K, generator=g) * scale).abs() - 0.1
    return logp_a, logp_b


@check
def check_ai_preference_probs(fn) -> str:
    """``fn(logp_a (N,K), logp_b (N,K)) -> (N,)``: P(A better), normalised per principle, averaged over principles."""
    seed = fresh_seed()
    for K in (4, 1):
        a, b = _logprob_case(seed, K=K)
        got = run_student(fn, a.clone(), b.clone(), name="ai_preference_probs")
        if isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(a.shape) and K > 1:
            raise CheckError("ai_preference_probs returns one probability per principle, shape (N, K): average them "
                             "over the K principles (dim=-1) to get one soft label per pair, shape (N,).")
        got = expect_tensor(got, (a.shape[0],), "ai_preference_probs")
        expected = cai.ai_preference_probs(a, b)
        mistakes = {
            "this is P(B better): the label is the probability of (A), sigmoid(logp_a - logp_b).":
                torch.sigmoid(b - a).mean(-1),
            "the log-probs are averaged over principles before normalising; normalise each principle's pair first "
            "(sigmoid(logp_a - logp_b)), then average the probabilities.": torch.sigmoid(a.mean(-1) - b.mean(-1)),
            "exp(logp_a) alone is not the label: normalise against (B), exp(a) / (exp(a) + exp(b)).":
                a.exp().mean(-1),
            "these are hard votes (1 if logp_a > logp_b): the soft label keeps the probabilities.":
                (a > b).float().mean(-1),
            "this is a log-probability: return the probability itself (between 0 and 1).":
                F.logsigmoid(a - b).mean(-1),
            "the softmax runs over the principles (dim=-1 of logp_a); normalise across the two options instead.":
                a.softmax(-1).mean(-1),
        }
        diagnose(got, expected, mistakes, label="ai_preference_probs", seed=seed)
    # Numerical stability: both options very unlikely (long contexts give log-probs in the hundreds).
    a, b = _logprob_case(seed)
    a, b = a - 1000.0, b - 1000.0
    got = run_student(fn, a.clone(), b.clone(), name="ai_preference_probs")
    if not torch.isfinite(got).all():
        raise CheckError("ai_preference_probs gives nan for log-probs near -1000: exp() underflows to 0 and 0/0 is "
                         "nan. Use sigmoid(logp_a - logp_b) (or softmax over the pair), which only sees the difference.")
    diagnose(got, cai.ai_preference_probs(a, b), {}, label="ai_preference_probs with log-probs near -1000",
             seed=seed, atol=1e-4)
    return "soft labels match for K in {1, 4} principles and for log-probs near -1000"


# ------------------------------------------------------------------------------ preference loss, soft labels


def _loss_case(seed: int, N: int = 9):
    g = torch.Generator().manual_seed(seed)
    r_a, r_b = torch.randn(N, generator=g) * 2, torch.randn(N, generator=g) * 2
    p = torch.rand(N, generator=g)
    p[0], p[1] = 1.0, 0.0  # hard labels are soft labels too
    return r_a, r_b, p


@check
def check_soft_preference_loss(fn) -> str:
    """``fn(r_a (N,), r_b (N,), p_a (N,)) -> scalar``: mean cross-entropy of sigmoid(r_a - r_b) against p_a."""
    seed = fresh_seed()
    r_a, r_b, p = _loss_case(seed)
    got = run_student(fn, r_a.clone(), r_b.clone(), p.clone(), name="soft_preference_loss")
    if isinstance(got, torch.Tensor) and got.shape == r_a.shape:
        raise CheckError("soft_preference_loss returns one loss per pair: return their mean, a scalar.")
    got = expect_tensor(got, (), "soft_preference_loss")
    expected = cai.soft_preference_loss(r_a, r_b, p)
    d = r_a - r_b
    mistakes = {
        "the soft label is rounded to 0/1: keep p_a as it is; the loss is p*log s(d) + (1-p)*log s(-d).":
            cai.soft_preference_loss(r_a, r_b, p.round()),
        "the label is ignored: this is the hard Bradley-Terry loss -logsigmoid(r_a - r_b). Weight the two "
        "outcomes by p_a and 1 - p_a.": -F.logsigmoid(d).mean(),
        "the margin has the wrong sign: P(A better) = sigmoid(r_a - r_b).": cai.soft_preference_loss(r_b, r_a, p),
        "this is a sum over pairs; take the mean.": expected * len(p),
        "the (1 - p_a) * log sigmoid(r_b - r_a) term is missing: a soft label also rewards (B) in proportion.":
            -(p * F.logsigmoid(d)).mean(),
        "this is the log-likelihood; the loss is its negative (minimise -log-likelihood).": -expected,
        "this is a squared error between sigmoid(r_a - r_b) and p_a; use the cross-entropy (log-loss).":
            ((torch.sigmoid(d) - p) ** 2).mean(),
    }
    diagnose(got, expected, mistakes, label="soft_preference_loss", seed=seed)
    # Gradients flow, and d loss / d r_a = (sigmoid(d) - p) / N: the minimum is where sigmoid(d) = p.
    ra = r_a.clone().requires_grad_(True)
    loss = run_student(fn, ra, r_b.clone(), p.clone(), name="soft_preference_loss")
    if not loss.requires_grad:
        raise CheckError("soft_preference_loss cuts the gradient (.detach(), .item() or a Python float?): the "
                         "preference model learns through it.")
    loss.backward()
    diagnose(ra.grad, (torch.sigmoid(d) - p) / len(p), {}, label="the gradient of soft_preference_loss", seed=seed)
    # Numerical stability: large margins.
    big_a, big_b = r_a * 100, r_b * 100
    got = run_student(fn, big_a, big_b, p.clone(), name="soft_preference_loss")
    if not torch.isfinite(got):
        raise CheckError("soft_preference_loss is inf/nan for margins in the hundreds: log(sigmoid(d)) underflows "
                         "to log(0) = -inf (and 0 * -inf = nan). Use F.logsigmoid(d) and F.logsigmoid(-d).")
    diagnose(got, cai.soft_preference_loss(big_a, big_b, p), {}, label="soft_preference_loss with large margins",
             seed=seed, atol=1e-3)
    return "loss, gradient and large margins match"
