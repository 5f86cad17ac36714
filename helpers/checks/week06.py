"""Checks for week 6: attack success rate with a Wilson interval, a checker's precision and recall, the Lagrange
multiplier's projected gradient step."""

from __future__ import annotations

import math
import random

import torch

from .. import redteam, safety
from . import CheckError, check, fresh_seed, run_student

Z95 = 1.959964
ATOL_ASR = 2e-4
"""z = 1.96 (rounded) is as right as 1.959964: it moves the ends by less than 1e-4."""


def _floats(got, n: int, label: str) -> tuple[float, ...]:
    """The student's answer as ``n`` floats (a tuple, a list or a tensor of n numbers)."""
    if isinstance(got, torch.Tensor):
        got = got.flatten().tolist()
    if not isinstance(got, (tuple, list)) or len(got) != n:
        raise CheckError(f"{label} should return {n} numbers (a tuple), got {got!r}.")
    try:
        out = tuple(float(x.item() if isinstance(x, torch.Tensor) else x) for x in got)
    except (TypeError, ValueError):
        raise CheckError(f"{label} should return {n} numbers, got {got!r}.") from None
    return out


def _name_mistake(got: tuple, expected: tuple, mistakes: dict[str, tuple], *, label: str, case: str, seed: int,
                  atol: float = 1e-6) -> None:
    def same(a, b):  # float32 answers are fine: a relative tolerance of 1e-6 on top of atol
        return all((math.isnan(x) and math.isnan(y))
                   or (not math.isnan(x) and not math.isnan(y) and abs(x - y) <= atol + 1e-6 * abs(y))
                   for x, y in zip(a, b))

    def distance(a, b):
        return max((abs(x - y) if not (math.isnan(x) or math.isnan(y)) else math.inf) for x, y in zip(a, b))

    if same(got, expected):
        return
    # The mistake closest to the answer (two can nearly coincide on some inputs), among those it matches.
    matches = [(distance(got, wrong), message) for message, wrong in mistakes.items()
               if same(got, wrong) and not same(wrong, expected)]
    if matches:
        raise CheckError(f"{label} ({case}): {min(matches)[1]} (seed {seed})")
    shown = ", ".join(f"{x:.4g}" for x in got)
    want = ", ".join(f"{x:.4g}" for x in expected)
    raise CheckError(f"{label} ({case}): got ({shown}), expected ({want}) (seed {seed}).")


# ----------------------------------------------------------------------------------------------- ASR + CI


def _wilson(k: int, n: int, z: float, *, denom: bool = True, shift: bool = True, quarter: bool = True) -> tuple:
    p = k / n
    d = 1 + z * z / n if denom else 1.0
    center = (p + (z * z / (2 * n) if shift else 0.0)) / d
    half = z * math.sqrt(p * (1 - p) / n + (z * z / (4 * n * n) if quarter else 0.0)) / d
    return p, center - half, center + half


def _asr_mistakes(k: int, n: int) -> dict[str, tuple]:
    p = k / n
    wald = Z95 * math.sqrt(p * (1 - p) / n)
    out = {
        "this is the normal (Wald) interval p +- z sqrt(p(1-p)/n); use Wilson's score interval, which is centred at "
        "(p + z^2/2n) / (1 + z^2/n)": (p, p - wald, p + wald),
        "this is the Wald interval clipped to [0, 1]; it still collapses to a point at 0 or n successes: use Wilson's "
        "score interval": (p, max(0.0, p - wald), min(1.0, p + wald)),
        "the whole interval must be divided by (1 + z^2/n)": _wilson(k, n, Z95, denom=False),
        "the centre is shifted by z^2/(2n) before dividing: (p + z^2/(2n)) / (1 + z^2/n)": _wilson(k, n, Z95, shift=False),
        "the square root holds p(1-p)/n + z^2/(4n^2): the z^2/(4n^2) term is missing": _wilson(k, n, Z95, quarter=False),
        "z is the 95% quantile of the normal, 1.96, not 1.645 (that gives a 90% interval)": _wilson(k, n, 1.644854),
        "z should be 1.96 (two-sided 95%); 2.576 gives a 99% interval": _wilson(k, n, 2.575829),
        "the rate should be a fraction in [0, 1], not a percentage": tuple(100 * x for x in _wilson(k, n, Z95)),
    }
    return out


@check
def check_asr_ci(fn) -> str:
    """``fn(successes) -> (rate, lo, hi)``: ``successes`` a (n,) bool tensor; Wilson 95% interval."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    cases = []
    for n in (12, 40, 150):
        p = torch.rand((), generator=g).item() * 0.6 + 0.2
        cases.append(torch.rand(n, generator=g) < p)
    cases.append(torch.rand(25, generator=g) < 0.1)
    for flags in cases:
        k, n = int(flags.sum()), len(flags)
        got = _floats(run_student(fn, flags.clone(), name="asr_with_ci"), 3, "asr_with_ci")
        lo, hi = redteam.wilson_interval(k, n)
        _name_mistake(got, (k / n, lo, hi), _asr_mistakes(k, n), label="asr_with_ci", case=f"{k} of {n}", seed=seed,
                      atol=ATOL_ASR)
    # The ends: no success, every success (where the normal approximation claims certainty), and a list input.
    for flags in (torch.zeros(30, dtype=torch.bool), torch.ones(8, dtype=torch.bool)):
        k, n = int(flags.sum()), len(flags)
        got = _floats(run_student(fn, flags.clone(), name="asr_with_ci"), 3, "asr_with_ci")
        if any(math.isnan(x) for x in got):
            raise CheckError(f"asr_with_ci ({k} of {n}): returned nan; at 0 or n successes p(1-p) = 0, which is "
                             f"fine for Wilson (the z^2/(4n^2) term keeps the interval open).")
        lo, hi = redteam.wilson_interval(k, n)
        _name_mistake(got, (k / n, lo, hi), _asr_mistakes(k, n), label="asr_with_ci", case=f"{k} of {n}", seed=seed,
                      atol=ATOL_ASR)
    got = _floats(run_student(fn, [True, False, True, True], name="asr_with_ci"), 3, "asr_with_ci")
    lo, hi = redteam.wilson_interval(3, 4)
    _name_mistake(got, (0.75, lo, hi), _asr_mistakes(3, 4), label="asr_with_ci", case="a list of 4 outcomes", seed=seed,
                  atol=ATOL_ASR)
    return "Wilson 95% interval, open at 0 and n successes"


# -------------------------------------------------------------------------------------- precision / recall


def _pr(scores: torch.Tensor, labels: torch.Tensor, threshold: float, *, strict=False, invert=False,
        empty=1.0) -> tuple[float, float]:
    flagged = scores > threshold if strict else scores >= threshold
    if invert:
        flagged = ~flagged if not strict else scores <= threshold
    tp = int((flagged & labels).sum())
    fp = int((flagged & ~labels).sum())
    fn = int((~flagged & labels).sum())
    precision = tp / (tp + fp) if tp + fp else empty
    recall = tp / (tp + fn) if tp + fn else 1.0
    return precision, recall


def _pr_mistakes(scores, labels, threshold) -> dict[str, tuple]:
    p, r = _pr(scores, labels, threshold)
    flagged = scores >= threshold
    tp = int((flagged & labels).sum())
    fp = int((flagged & ~labels).sum())
    fn = int((~flagged & labels).sum())
    tn = int((~flagged & ~labels).sum())
    n = len(labels)
    return {
        "precision and recall are swapped: precision = TP / (TP + FP) (of the flagged, how many are harmful), "
        "recall = TP / (TP + FN)": (r, p),
        "a reply scoring exactly the threshold should be flagged (scores >= threshold, not >)":
            _pr(scores, labels, threshold, strict=True),
        "the comparison is inverted: flag replies whose score is at least the threshold (higher = more harmful)":
            _pr(scores, labels, threshold, invert=True),
        "the comparison is inverted: flag replies whose score is at least the threshold (higher = more harmful) ":
            _pr(scores, labels, threshold, invert=True, strict=True),
        "recall divides by the number of flagged replies; it should divide by the number of harmful ones (TP + FN)":
            (p, p),
        "precision divides by the number of harmful replies; it should divide by the number flagged (TP + FP)":
            (r, r),
        "this looks like accuracy ((TP + TN) / n), not precision": ((tp + tn) / n, r),
        "recall divides by all replies, not by the harmful ones": (p, tp / n),
        "precision divides by all replies, not by the flagged ones": (tp / n, r),
    }


@check
def check_precision_recall(fn) -> str:
    """``fn(scores (B,), labels (B,) bool, threshold) -> (precision, recall)``; flag ``scores >= threshold``."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    for B in (40, 120, 300):
        labels = torch.rand(B, generator=g) < 0.35
        labels[:3] = torch.tensor([True, False, True])
        # Scores on a grid of tenths (so some equal the threshold), harmful ones higher on average.
        scores = ((torch.rand(B, generator=g) * 6 + labels.float() * 4).floor() / 10).clamp(max=0.9)
        threshold = [0.4, 0.5, 0.6][B % 3]
        scores[:3] = torch.tensor([threshold, threshold, threshold - 0.1])  # ties at the threshold
        got = _floats(run_student(fn, scores.clone(), labels.clone(), threshold, name="precision_recall"), 2,
                      "precision_recall")
        expected = _pr(scores, labels, threshold)
        _name_mistake(got, expected, _pr_mistakes(scores, labels, threshold), label="precision_recall",
                      case=f"{B} replies, threshold {threshold}", seed=seed)
    # Nothing flagged: precision has no flagged reply to be wrong about (1.0 by the convention of the lesson).
    scores = torch.tensor([0.1, 0.2, 0.3, 0.2])
    labels = torch.tensor([True, False, True, False])
    got = _floats(run_student(fn, scores, labels, 0.9, name="precision_recall"), 2, "precision_recall")
    if math.isnan(got[0]):
        raise CheckError("precision_recall with nothing flagged returned nan (0/0): precision is 1.0 when no reply "
                         "is flagged (no false alarm was raised); guard the division.")
    if got[0] == 0.0 and got[1] == 0.0:
        raise CheckError("precision_recall with nothing flagged: precision should be 1.0 (no false alarm was "
                         "raised), not 0.0; recall is 0.0.")
    _name_mistake(got, (1.0, 0.0), {}, label="precision_recall", case="nothing flagged", seed=seed)
    return "precision and recall at scores >= threshold, 1.0 precision when nothing is flagged"


# ------------------------------------------------------------------------------------------- Lagrangian


def _lagrange_mistakes(lam, harm, d, lr) -> dict[str, tuple]:
    step = lam + lr * (harm - d)
    return {
        "lambda went negative: project onto lambda >= 0 with max(0, ...)": (step,),
        "the sign of the step is flipped (or harm and threshold are swapped): lambda must grow while "
        "harm > threshold, lr * (harm - threshold)": (max(0.0, lam - lr * (harm - d)),),
        "the learning rate is missing: lambda + lr * (harm - threshold)": (max(0.0, lam + (harm - d)),),
        "the threshold is missing: the step is lr * (harm - threshold), not lr * harm": (max(0.0, lam + lr * harm),),
        "the projection uses abs(); project with max(0, ...), which sets a negative lambda to 0": (abs(step),),
        "lambda is clipped to [0, 1]; only the lower bound 0 applies": (min(1.0, max(0.0, step)),),
    }


@check
def check_lagrange_update(fn) -> str:
    """``fn(lam, harm, threshold, lr) -> new lam``: ``max(0, lam + lr * (harm - threshold))``."""
    seed = fresh_seed()
    rng = random.Random(seed)
    d = rng.choice([0.05, 0.1, 0.15])
    cases = [
        (rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.6), d, rng.uniform(0.5, 3.0)),   # violated: lambda grows
        (rng.uniform(0.5, 1.5), rng.uniform(0.0, d / 2), d, rng.uniform(0.5, 2.0)),  # satisfied: lambda shrinks
        (rng.uniform(0.01, 0.05), 0.0, d, rng.uniform(2.0, 5.0)),                     # would go negative: projected
        (0.0, rng.uniform(0.0, d / 2), d, 1.0),                                      # stays at 0
        (rng.uniform(1.5, 3.0), rng.uniform(0.3, 0.9), d, rng.uniform(2.0, 4.0)),     # above 1: no upper bound
    ]
    for lam, harm, thr, lr in cases:
        got = _floats((run_student(fn, lam, harm, thr, lr, name="lagrange_update"),), 1, "lagrange_update")
        expected = (safety.lagrange_update(lam, harm, thr, lr),)
        _name_mistake(got, expected, _lagrange_mistakes(lam, harm, thr, lr), label="lagrange_update",
                      case=f"lambda={lam:.3f}, harm={harm:.3f}, threshold={thr}, lr={lr:.2f}", seed=seed, atol=1e-7)
    # Large values stay finite and exact (no accumulation tricks needed).
    got = _floats((run_student(fn, 1e6, 1.0, 0.0, 1e6, name="lagrange_update"),), 1, "lagrange_update")
    if abs(got[0] - 2e6) > 1e-3:
        raise CheckError(f"lagrange_update(1e6, 1.0, 0.0, 1e6) returned {got[0]:.6g}, expected 2e6.")
    return "projected gradient ascent on the multiplier"
