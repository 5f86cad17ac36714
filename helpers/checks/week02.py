"""Checks for week 2: the Bradley-Terry loss, an Elo update, and a reward model's accuracy and calibration."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import rewards
from . import CheckError, check, close, diagnose, expect_tensor, fresh_seed, run_student


def _margins_case(seed: int, B: int = 16, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    r_chosen = torch.randn(B, generator=g) * scale + 0.5
    r_rejected = torch.randn(B, generator=g) * scale
    return r_chosen, r_rejected


# ---------------------------------------------------------------------------------- Bradley-Terry loss


@check
def check_bradley_terry_loss(fn) -> str:
    """``fn(r_chosen (B,), r_rejected (B,)) -> ()``: mean of ``-log sigmoid(r_chosen - r_rejected)``."""
    seed = fresh_seed()
    for scale in (1.0, 3.0):
        rc, rr = _margins_case(seed, scale=scale)
        got = run_student(fn, rc.clone(), rr.clone(), name="bradley_terry_loss")
        d = rc - rr
        per_pair = -F.logsigmoid(d)
        if isinstance(got, torch.Tensor) and tuple(got.shape) == tuple(rc.shape) and close(got, per_pair):
            raise CheckError("bradley_terry_loss returns one loss per pair; return their mean (a scalar).")
        got = expect_tensor(got, (), "bradley_terry_loss")
        expected = rewards.bradley_terry_loss(rc, rr)
        mistakes = {
            "the sign is flipped: the loss is the NEGATIVE log-likelihood, -logsigmoid(r_chosen - r_rejected).":
                F.logsigmoid(d).mean(),
            "chosen and rejected are swapped (or this is softplus(r_chosen - r_rejected), which equals "
            "-logsigmoid(r_rejected - r_chosen)): the chosen reply should get the higher reward. "
            "Use -logsigmoid(r_chosen - r_rejected) = softplus(r_rejected - r_chosen).": -F.logsigmoid(-d).mean(),
            "this is a sum over pairs; take the mean, so the loss does not grow with the batch size.":
                per_pair.sum(),
            "the log is missing: the loss is -log sigmoid(margin), not -sigmoid(margin).": -torch.sigmoid(d).mean(),
            "the log is missing and the sign is flipped: use -logsigmoid(r_chosen - r_rejected).":
                torch.sigmoid(-d).mean(),
            "logsigmoid is applied to each reward separately; Bradley-Terry uses the difference: "
            "-logsigmoid(r_chosen - r_rejected).": -(F.logsigmoid(rc) - F.logsigmoid(rr)).mean(),
            "this is the loss of the mean margin, -logsigmoid(mean(r_chosen - r_rejected)); average the per-pair "
            "losses instead.": -F.logsigmoid(d.mean()),
        }
        diagnose(got, expected, mistakes, label="bradley_terry_loss", seed=seed)
    # It must be differentiable: a reward model learns through it.
    rc, rr = _margins_case(seed)
    rc.requires_grad_(True)
    got = run_student(fn, rc, rr.clone(), name="bradley_terry_loss")
    if not isinstance(got, torch.Tensor) or not got.requires_grad:
        raise CheckError("bradley_terry_loss is not differentiable: build it from torch operations on the inputs "
                         "(no .item(), .detach(), numpy or math functions), so gradients reach the reward model.")
    got.backward()
    expected_grad = -torch.sigmoid(-(rc - rr)).detach() / len(rc)
    if rc.grad is None or not close(rc.grad, expected_grad):
        raise CheckError("the gradient with respect to r_chosen is wrong: it should be -sigmoid(r_rejected - "
                         "r_chosen) / B per pair.")
    # Numerical stability: a confident wrong reward model has margins of -1000; sigmoid underflows to 0 there.
    rc = torch.tensor([-1000.0, 1000.0, 0.0])
    rr = torch.zeros(3)
    got = run_student(fn, rc, rr, name="bradley_terry_loss")
    if not isinstance(got, torch.Tensor) or not torch.isfinite(got).all():
        raise CheckError("bradley_terry_loss gives inf/nan for a margin of -1000: log(sigmoid(x)) underflows. Use "
                         "F.logsigmoid (or F.softplus(-x)), which are stable.")
    diagnose(got.reshape(()), rewards.bradley_terry_loss(rc, rr), {}, label="bradley_terry_loss with margins of "
             "+-1000", seed=seed, atol=1e-3)
    return "mean of -logsigmoid(margin), differentiable, stable for margins of +-1000"


# ------------------------------------------------------------------------------------------------- Elo


def _elo_case(seed: int, n: int = 12):
    g = torch.Generator().manual_seed(seed)
    r_a = 1000 + 300 * torch.randn(n, generator=g, dtype=torch.float64)
    r_b = 1000 + 300 * torch.randn(n, generator=g, dtype=torch.float64)
    score_a = torch.randint(0, 3, (n,), generator=g).double() / 2  # wins, losses and draws
    return r_a, r_b, score_a


@check
def check_elo_update(fn) -> str:
    """``fn(r_a, r_b, score_a, k) -> (new_a, new_b)``: Elo with base 10 and scale 400, elementwise."""
    seed = fresh_seed()
    r_a, r_b, s = _elo_case(seed)
    for k in (32.0, 10.0):
        got = run_student(fn, r_a.clone(), r_b.clone(), s.clone(), k, name="elo_update")
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckError(f"elo_update should return the two new ratings (new_a, new_b), got {type(got).__name__}.")
        new_a = expect_tensor(got[0], tuple(r_a.shape), "elo_update's new_a")
        new_b = expect_tensor(got[1], tuple(r_a.shape), "elo_update's new_b")
        exp_a, exp_b = rewards.elo_update(r_a, r_b, s, k)

        def pair(e_a, k_a=k, k_b=None):
            k_b = k_a if k_b is None else k_b
            return torch.cat([r_a + k_a * (s - e_a), r_b - k_b * (s - e_a)])

        e = rewards.elo_expected(r_a, r_b)
        mistakes = {
            "the expected score has the sign of the difference flipped: E_a = 1 / (1 + 10 ** ((r_b - r_a) / 400)) "
            "is above 1/2 when a is rated higher.": pair(1 - e),
            "the base is e instead of 10: Elo's expected score is 1 / (1 + 10 ** ((r_b - r_a) / 400)).":
                pair(torch.sigmoid((r_a - r_b) / 400)),
            "the scale is off: divide the rating difference by 400 (a 400-point lead is 10:1 odds).":
                pair(1 / (1 + 10 ** ((r_b - r_a) / 40))),
            "the rating difference is not divided by 400 at all.": pair(1 / (1 + 10 ** ((r_b - r_a).clamp(-300, 300)))),
            "the K-factor is missing: the change is k * (score - expected).": pair(e, 1.0),
            "the change is halved: Elo moves each player by the full k * (score - expected).": pair(e, k / 2),
            "both ratings move the same way: what a gains, b loses (new_b = r_b - k * (score_a - E_a)).":
                torch.cat([r_a + k * (s - e), r_b + k * (s - e)]),
            "b's rating did not change: b loses what a gains.": torch.cat([r_a + k * (s - e), r_b]),
            "b's update uses a's NEW rating: compute both expected scores from the ratings before the game.":
                torch.cat([r_a + k * (s - e),
                           r_b + k * ((1 - s) - rewards.elo_expected(r_b, r_a + k * (s - e)))]),
            "the new ratings are swapped: return (new_a, new_b).": torch.cat([exp_b, exp_a]),
        }
        diagnose(torch.cat([new_a, new_b]).double(), torch.cat([exp_a, exp_b]), mistakes, label=f"elo_update(k={k})",
                 seed=seed, atol=1e-6)
    # Hand-worked case and extremes: a 4000-point gap must not overflow into nan.
    a, b = run_student(fn, torch.tensor([1400.0, 5000.0]), torch.tensor([1000.0, 1000.0]), torch.tensor([1.0, 0.0]),
                       32.0, name="elo_update")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise CheckError("elo_update gives inf/nan when one player is 4000 points ahead: 10 ** (diff / 400) is "
                         "fine in float64/float32 for such gaps, so check for divisions by zero.")
    if abs(a[0].item() - (1400 + 32 / 11)) > 1e-3:
        raise CheckError(f"a 1400 player beating a 1000 player with k=32 should gain 32/11 = 2.91 points (expected "
                         f"score 10/11), got {a[0].item() - 1400:.3f}.")
    return "expected score with base 10 and scale 400, zero-sum update with the K-factor"


# ------------------------------------------------------------------------------------ accuracy and ECE


@check
def check_pairwise_accuracy(fn) -> str:
    """``fn(r_chosen (N,), r_rejected (N,)) -> float``: share of pairs ranked right, ties counting 1/2."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    # Integer rewards, so many ties; the chosen reply mostly wins, so no mistake lands on the right answer by symmetry.
    rc = torch.randint(1, 5, (200,), generator=g).float()
    rr = torch.randint(0, 4, (200,), generator=g).float()
    got = run_student(fn, rc.clone(), rr.clone(), name="pairwise_accuracy")
    if isinstance(got, torch.Tensor):
        if got.numel() != 1:
            raise CheckError(f"pairwise_accuracy should return one number, got a tensor of shape {tuple(got.shape)}.")
        got = got.item()
    if not isinstance(got, (float, int)):
        raise CheckError(f"pairwise_accuracy should return a float, got {type(got).__name__}.")
    expected = rewards.pairwise_accuracy(rc, rr)
    wins, ties = (rc > rr).float().mean().item(), (rc == rr).float().mean().item()
    mistakes = {
        "ties are counted as correct: a tie is a coin flip, worth 1/2 (as in the noise ceiling).": wins + ties,
        "ties are counted as wrong: a tie is a coin flip, worth 1/2 (as in the noise ceiling).": wins,
        "this is the share of pairs ranked the WRONG way: the chosen reply should score higher.": 1 - expected,
        "this is a count, not a share: divide by the number of pairs.": (rc > rr).sum().item() + 0.5 * (rc == rr).sum().item(),
    }
    if abs(got - expected) > 1e-6:
        for message, wrong in mistakes.items():
            if abs(got - wrong) < 1e-6:
                raise CheckError(f"pairwise_accuracy: {message} (seed {seed})")
        raise CheckError(f"pairwise_accuracy: got {got:.4f}, expected {expected:.4f} (seed {seed}).")
    return "ties count 1/2"


def _calibration_case(seed: int, n: int = 400):
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(n, generator=g, dtype=torch.float64) ** 0.7  # uneven: more mass near 1
    probs = torch.where((probs >= 0.3) & (probs < 0.4), probs + 0.3, probs)  # one empty bin: [0.3, 0.4)
    probs[:6] = torch.tensor([0.0, 1.0, 1.0, 0.5, 0.1, 0.9], dtype=torch.float64)  # edges of bins
    # Over- and under-confident in turn along [0, 1], so no binning shortcut gives the same error.
    truth = (probs + 0.3 * torch.sin(5 * math.pi * probs)).clamp(0.02, 0.98)
    labels = (torch.rand(n, generator=g, dtype=torch.float64) < truth).double()
    labels[:6] = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0], dtype=torch.float64)  # confident and wrong at 0 and 1
    return probs, labels


def _ece_variants(probs, labels, n_bins):
    """The typical mistakes' values, for diagnosis."""
    n = len(probs)
    conf, freq, counts = rewards.calibration_bins(probs, labels, n_bins)
    keep = counts > 0
    out = {
        "the bins are averaged with equal weight: weight each bin by its share of the samples, n_b / N.":
            (freq[keep] - conf[keep]).abs().mean().item(),
        "the gaps are squared: ECE uses |observed - predicted|.":
            ((counts[keep] / n) * (freq[keep] - conf[keep]) ** 2).sum().item(),
    }
    dropped = ("predictions of exactly 1.0 are dropped: the last bin is closed, [0.9, 1.0] (clamp the bin index "
               "to n_bins - 1).")
    out[dropped] = _ece_drop_ones(probs, labels, n_bins, over_all=True)
    out[dropped + " "] = _ece_drop_ones(probs, labels, n_bins, over_all=False)  # the same mistake, other weights
    # Equal-mass (quantile) bins instead of equal-width ones.
    order = probs.argsort()
    chunks = torch.tensor_split(order, n_bins)
    out["these are equal-mass (quantile) bins; use n_bins bins of equal WIDTH over [0, 1]."] = sum(
        len(c) / n * abs(labels[c].mean().item() - probs[c].mean().item()) for c in chunks if len(c))
    # n_bins - 1 bins from linspace(0, 1, n_bins) edges.
    conf2, freq2, counts2 = rewards.calibration_bins(probs, labels, n_bins - 1)
    k2 = counts2 > 0
    out["there are n_bins - 1 bins: n_bins bins need n_bins + 1 edges (linspace(0, 1, n_bins + 1))."] = (
        (counts2[k2] / n) * (freq2[k2] - conf2[k2]).abs()).sum().item()
    # Top-label ECE (classification style): confidence max(p, 1 - p), accuracy of the predicted label.
    top = torch.maximum(probs, 1 - probs)
    correct = ((probs >= 0.5).double() == labels).double()
    conf3, freq3, counts3 = rewards.calibration_bins(top, correct, n_bins)
    k3 = counts3 > 0
    out["this is the top-label ECE (confidence max(p, 1-p) against accuracy); here the bins hold p itself and "
        "the observed frequency of label 1."] = ((counts3[k3] / n) * (freq3[k3] - conf3[k3]).abs()).sum().item()
    # Bin centres instead of the mean prediction in each bin.
    centres = (torch.arange(n_bins, dtype=torch.float64) + 0.5) / n_bins
    out["each bin's confidence is its centre; use the mean predicted probability of the samples in the bin."] = (
        (counts[keep] / n) * (freq[keep] - centres[keep]).abs()).sum().item()
    return out


def _ece_drop_ones(probs, labels, n_bins, over_all: bool):
    """ECE with the predictions of exactly 1.0 left out of every bin, weights over all samples or the kept ones."""
    keep = probs < 1.0
    p, y = probs[keep], labels[keep]
    conf, freq, counts = rewards.calibration_bins(p, y, n_bins)
    k = counts > 0
    return ((counts[k] / (len(probs) if over_all else len(p))) * (freq[k] - conf[k]).abs()).sum().item()


@check
def check_expected_calibration_error(fn) -> str:
    """``fn(probs (N,), labels (N,), n_bins) -> float``: ECE over ``n_bins`` equal-width bins, weighted by count."""
    seed = fresh_seed()
    for n_bins in (10, 5):
        probs, labels = _calibration_case(seed)
        got = run_student(fn, probs.clone(), labels.clone(), n_bins, name="expected_calibration_error")
        if isinstance(got, torch.Tensor):
            if got.numel() != 1:
                raise CheckError("expected_calibration_error should return one number, got a tensor of shape "
                                 f"{tuple(got.shape)}.")
            got = got.item()
        if not isinstance(got, (float, int)) or math.isnan(got):
            raise CheckError(f"expected_calibration_error should return a number, got {got!r}: are empty bins "
                             "skipped (0 / 0 is nan)?")
        expected = rewards.expected_calibration_error(probs, labels, n_bins)
        if abs(got - expected) < 1e-6:
            continue
        for message, wrong in _ece_variants(probs, labels, n_bins).items():
            if abs(got - wrong) < 1e-6:
                raise CheckError(f"expected_calibration_error(n_bins={n_bins}): {message.strip()} (seed {seed})")
        raise CheckError(f"expected_calibration_error(n_bins={n_bins}): got {got:.5f}, expected {expected:.5f} "
                         f"(seed {seed}).")
    # A perfectly calibrated case worked by hand: p = 0.25 with one label in four, p = 0.75 with three in four.
    p = torch.tensor([0.25] * 4 + [0.75] * 4, dtype=torch.float64)
    y = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.float64)
    got = run_student(fn, p, y, 10, name="expected_calibration_error")
    got = got.item() if isinstance(got, torch.Tensor) else got
    if abs(got) > 1e-9:
        raise CheckError(f"a calibrated predictor (p = 0.25 right 1 time in 4, p = 0.75 right 3 times in 4) should "
                         f"have ECE 0, got {got:.4f}.")
    return "equal-width bins, count-weighted gaps, p = 1.0 in the last bin"
