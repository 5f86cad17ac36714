"""Week 4's checks in both directions: the reference passes; a stub and typical mistakes fail, naming the mistake."""


import pytest
import torch
import torch.nn.functional as F

from helpers import cai
from check_harness import both_directions, run_quiet, stub
from helpers.checks import CheckError, week04


# --- prompt builders: (critique_fn, revision_fn) pairs with one planted mistake each
def cp_trailing_space(prompt, response, pr):
    return cai.critique_prompt(prompt, response, pr) + " "


def cp_revision_field(prompt, response, pr):
    return f"{prompt}{response}\nCritique request: {pr.revision}\nCritique:"


def cp_no_newline(prompt, response, pr):
    return f"{prompt}{response} Critique request: {pr.critique}\nCritique:"


def cp_hard_coded(prompt, response, pr):
    return cai.critique_prompt(prompt, response, cai.CONSTITUTION[0])


def rp_no_critique(prompt, response, pr, critique):
    return f"{cai.critique_prompt(prompt, response, pr)}\nRevision request: {pr.revision}\nRevision:"


def rp_no_critique_request(prompt, response, pr, critique):
    return f"{prompt}{response}\nCritique:{critique}\nRevision request: {pr.revision}\nRevision:"


def rp_wrong_field(prompt, response, pr, critique):
    return f"{cai.critique_prompt(prompt, response, pr)}{critique}\nRevision request: {pr.critique}\nRevision:"


def rp_extra_space(prompt, response, pr, critique):
    return f"{cai.critique_prompt(prompt, response, pr)} {critique}\nRevision request: {pr.revision}\nRevision:"


PROMPT_CASES = [
    ((cp_trailing_space, cai.revision_prompt), "space after 'Critique:'"),
    ((cp_revision_field, cai.revision_prompt), "revision request"),
    ((cp_no_newline, cai.revision_prompt), "new line"),
    ((cp_hard_coded, cai.revision_prompt), "not the expected text"),
    ((cai.critique_prompt, rp_no_critique), "critique is missing"),
    ((cai.critique_prompt, rp_no_critique_request), "critique request is missing"),
    ((cai.critique_prompt, rp_wrong_field), "principle.revision"),
    ((cai.critique_prompt, rp_extra_space), "extra space before the critique"),
]


def test_prompt_builders_reference_passes():
    assert "PASS check_prompt_builders" in run_quiet(week04.check_prompt_builders, cai.critique_prompt,
                                                     cai.revision_prompt)


def test_prompt_builders_stub_fails():
    with pytest.raises(CheckError, match="not implemented"):
        run_quiet(week04.check_prompt_builders, stub, cai.revision_prompt)
    with pytest.raises(CheckError, match="not implemented"):
        run_quiet(week04.check_prompt_builders, cai.critique_prompt, stub)


@pytest.mark.parametrize("fns,hint", PROMPT_CASES, ids=[h for _, h in PROMPT_CASES])
def test_prompt_builder_mistake_is_named(fns, hint):
    with pytest.raises(CheckError, match=hint):
        run_quiet(week04.check_prompt_builders, *fns)


def test_prompt_builders_wrong_type():
    with pytest.raises(CheckError, match="should return a str"):
        run_quiet(week04.check_prompt_builders, lambda p, r, pr: [p, r], cai.revision_prompt)


# --- AI labels
def ap_p_of_b(a, b):
    return torch.sigmoid(b - a).mean(-1)


def ap_mean_logits(a, b):
    return torch.sigmoid(a.mean(-1) - b.mean(-1))


def ap_unnormalised(a, b):
    return a.exp().mean(-1)


def ap_naive(a, b):
    return (a.exp() / (a.exp() + b.exp())).mean(-1)


def ap_per_principle(a, b):
    return torch.sigmoid(a - b)


def ap_votes(a, b):
    return (a > b).float().mean(-1)


# --- soft loss
def sl_hard(r_a, r_b, p):
    return cai.soft_preference_loss(r_a, r_b, p.round())


def sl_ignores_label(r_a, r_b, p):
    return -F.logsigmoid(r_a - r_b).mean()


def sl_naive(r_a, r_b, p):
    s = torch.sigmoid(r_a - r_b)
    return -(p * torch.log(s) + (1 - p) * torch.log(1 - s)).mean()


def sl_sum(r_a, r_b, p):
    d = r_a - r_b
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).sum()


def sl_detached(r_a, r_b, p):
    return cai.soft_preference_loss(r_a.detach(), r_b.detach(), p)


def sl_per_pair(r_a, r_b, p):
    d = r_a - r_b
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))


CASES = [
    (week04.check_ai_preference_probs, cai.ai_preference_probs, [
        (ap_p_of_b, "P(B better)"), (ap_mean_logits, "averaged over principles before normalising"),
        (ap_unnormalised, "normalise against"), (ap_naive, "nan"), (ap_per_principle, "one probability per principle"),
        (ap_votes, "hard votes"),
    ]),
    (week04.check_soft_preference_loss, cai.soft_preference_loss, [
        (sl_hard, "rounded"), (sl_ignores_label, "label is ignored"), (sl_naive, "logsigmoid"), (sl_sum, "sum"),
        (sl_detached, "cuts the gradient"), (sl_per_pair, "scalar"),
        (lambda r_a, r_b, p: cai.soft_preference_loss(r_b, r_a, p), "wrong sign"),
    ]),
]


test_reference_passes, test_stub_says_not_implemented, test_planted_mistake_is_named = both_directions(CASES)


def test_crash_in_student_code_is_reported_as_failed_check():
    with pytest.raises(CheckError, match="raised RuntimeError"):
        run_quiet(week04.check_ai_preference_probs, lambda a, b: a @ b)
