"""Both directions for every check: the reference passes; a stub and typical mistakes fail with a diagnosis."""


import pytest
import torch.nn.functional as F

from helpers import lm
from check_harness import both_directions, run_quiet
from helpers.checks import CheckError, week00


# --- token_logprobs
def tl_no_mask(logits, labels, mask):
    return F.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)


def tl_softmax_log(logits, labels, mask):
    return logits.softmax(-1).gather(-1, labels[..., None]).squeeze(-1).log() * mask


def tl_wrong_dim(logits, labels, mask):
    return F.log_softmax(logits, 1).gather(-1, labels[..., None]).squeeze(-1) * mask


# --- response_logprob
def rl_no_shift(logits, ids, rmask):
    return lm.token_logprobs(logits, ids, rmask).sum(-1)


def rl_all_tokens(logits, ids, rmask):
    return lm.token_logprobs(logits[:, :-1], ids[:, 1:]).sum(-1)


def rl_mean(logits, ids, rmask):
    return lm.masked_mean(lm.token_logprobs(logits[:, :-1], ids[:, 1:]), rmask[:, 1:], dim=1)


# --- top_p
def tp_exclusive(logits, top_p):
    probs, order = logits.softmax(-1).sort(-1, descending=True)
    drop = probs.cumsum(-1) > top_p
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def tp_zero(logits, top_p):
    return lm.top_p_filter(logits, top_p).nan_to_num(neginf=0.0)


def tp_sorted(logits, top_p):
    return lm.top_p_filter(logits, top_p).sort(-1, descending=True).values


CASES = [
    (week00.check_token_logprobs, lm.token_logprobs, [
        (tl_no_mask, "padding"), (tl_softmax_log, "log_softmax"), (tl_wrong_dim, "dimension"),
        (lambda lo, la, m: -lm.token_logprobs(lo, la, m), "sign"),
    ]),
    (week00.check_response_logprob, week00.reference_response_logprob, [
        (rl_no_shift, "no shift"), (rl_all_tokens, "prompt and padding"), (rl_mean, "mean"),
    ]),
    (week00.check_top_p_filter, lm.top_p_filter, [
        (tp_exclusive, "crosses top_p"), (tp_zero, "-inf"), (tp_sorted, "sorted order"),
        (lambda lo, p: lo.softmax(-1), "probabilities"),
    ]),
]


test_reference_passes, test_stub_says_not_implemented, test_planted_mistake_is_named = both_directions(CASES)


def test_crash_in_student_code_is_reported_as_failed_check():
    def crashes(*args):
        return args[0] @ args[0]

    with pytest.raises(CheckError, match="raised RuntimeError"):
        run_quiet(week00.check_token_logprobs, crashes)


def test_wrong_shape_is_named():
    with pytest.raises(CheckError, match="shape"):
        run_quiet(week00.check_response_logprob, lambda lo, ids, m: lm.token_logprobs(lo, ids, m))
