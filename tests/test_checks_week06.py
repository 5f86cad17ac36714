"""Week 6 checks in both directions: the reference passes; a stub and typical mistakes fail with a diagnosis."""

import math

import pytest
import torch

from check_harness import both_directions, run_quiet
from helpers import redteam, safety
from helpers.checks import CheckError, week06


# --- asr_with_ci
def _counts(successes):
    flags = torch.as_tensor(successes, dtype=torch.bool)
    return int(flags.sum()), flags.numel()


def asr_ref(successes):
    k, n = _counts(successes)
    lo, hi = redteam.wilson_interval(k, n)
    return k / n, lo, hi


def asr_wald(successes):
    k, n = _counts(successes)
    p = k / n
    h = 1.96 * math.sqrt(p * (1 - p) / n)
    return p, p - h, p + h


def asr_wald_clipped(successes):
    p, lo, hi = asr_wald(successes)
    return p, max(0.0, lo), min(1.0, hi)


def asr_no_denominator(successes):
    k, n = _counts(successes)
    z, p = 1.959964, k / n
    c = p + z * z / (2 * n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return p, c - h, c + h


def asr_no_quarter(successes):
    k, n = _counts(successes)
    z, p = 1.959964, k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n) / d
    return p, c - h, c + h


def asr_z90(successes):
    k, n = _counts(successes)
    lo, hi = redteam.wilson_interval(k, n, z=1.644854)
    return k / n, lo, hi


def asr_percent(successes):
    return tuple(100 * x for x in asr_ref(successes))


# --- precision_recall
def pr_ref(scores, labels, threshold):
    return safety.precision_recall(scores, labels, threshold)


def pr_swapped(scores, labels, threshold):
    p, r = pr_ref(scores, labels, threshold)
    return r, p


def pr_strict(scores, labels, threshold):
    return pr_ref(scores, labels, threshold + 1e-9)


def pr_nan_when_empty(scores, labels, threshold):
    flagged = scores >= threshold
    tp = (flagged & labels).sum().item()
    fp = (flagged & ~labels).sum().item()
    fn = (~flagged & labels).sum().item()
    return (tp / (tp + fp) if tp + fp else float("nan")), tp / (tp + fn)


def pr_zero_when_empty(scores, labels, threshold):
    p, r = pr_nan_when_empty(scores, labels, threshold)
    return (0.0 if math.isnan(p) else p), r


def pr_recall_over_flagged(scores, labels, threshold):
    p, _ = pr_ref(scores, labels, threshold)
    return p, p


def pr_accuracy(scores, labels, threshold):
    flagged = scores >= threshold
    _, r = pr_ref(scores, labels, threshold)
    return (flagged == labels).float().mean().item(), r


def pr_inverted(scores, labels, threshold):
    return pr_ref(-scores, labels, -threshold)


# --- lagrange_update
def lag_ref(lam, harm, threshold, lr):
    return safety.lagrange_update(lam, harm, threshold, lr)


def lag_no_projection(lam, harm, threshold, lr):
    return lam + lr * (harm - threshold)


def lag_sign(lam, harm, threshold, lr):
    return max(0.0, lam - lr * (harm - threshold))


def lag_no_lr(lam, harm, threshold, lr):
    return max(0.0, lam + (harm - threshold))


def lag_no_threshold(lam, harm, threshold, lr):
    return max(0.0, lam + lr * harm)


def lag_abs(lam, harm, threshold, lr):
    return abs(lam + lr * (harm - threshold))


def lag_clip_one(lam, harm, threshold, lr):
    return min(1.0, max(0.0, lam + lr * (harm - threshold)))


def lag_tensor(lam, harm, threshold, lr):  # a tensor answer is fine
    return torch.clamp(torch.tensor(lam + lr * (harm - threshold)), min=0.0)


CASES = [
    (week06.check_asr_ci, asr_ref, [
        (asr_wald, "Wald"), (asr_wald_clipped, "Wald"), (asr_no_denominator, "divided by (1 + z^2/n)"),
        (asr_no_quarter, "z^2/(4n^2) term is missing"), (asr_z90, "1.645"), (asr_percent, "percentage")]),
    (week06.check_precision_recall, pr_ref, [
        (pr_swapped, "swapped"), (pr_strict, "exactly the threshold"), (pr_nan_when_empty, "nan"),
        (pr_zero_when_empty, "not 0.0"), (pr_recall_over_flagged, "recall divides by the number of flagged"),
        (pr_accuracy, "accuracy"), (pr_inverted, "inverted")]),
    (week06.check_lagrange_update, lag_ref, [
        (lag_no_projection, "negative"), (lag_sign, "sign of the step is flipped"), (lag_no_lr, "learning rate"),
        (lag_no_threshold, "threshold is missing"), (lag_abs, "abs()"), (lag_clip_one, "[0, 1]")]),
]


test_reference_passes, test_stub_says_not_implemented, test_planted_mistake_is_named = both_directions(CASES)


def test_tensor_answer_passes():
    assert run_quiet(week06.check_lagrange_update, lag_tensor).startswith("PASS")


def test_wrong_shape_and_crash_are_reported():
    with pytest.raises(CheckError, match="3 numbers"):
        run_quiet(week06.check_asr_ci, lambda s: 0.5)
    with pytest.raises(CheckError, match="ZeroDivisionError"):
        run_quiet(week06.check_lagrange_update, lambda *a: 1 / 0)
