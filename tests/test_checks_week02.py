"""Week 2 checks, both directions: the reference passes; a stub and planted typical mistakes fail, naming the mistake."""

import math

import torch
import torch.nn.functional as F

from helpers import rewards
from check_harness import both_directions, run_quiet
from helpers.checks import week02


# --- Bradley-Terry loss
def bt_sign(rc, rr):
    return F.logsigmoid(rc - rr).mean()


def bt_softplus(rc, rr):
    return F.softplus(rc - rr).mean()


def bt_sum(rc, rr):
    return -F.logsigmoid(rc - rr).sum()


def bt_naive_log(rc, rr):
    return -torch.log(torch.sigmoid(rc - rr)).mean()


def bt_no_mean(rc, rr):
    return -F.logsigmoid(rc - rr)


def bt_item(rc, rr):
    return torch.tensor(-F.logsigmoid(rc - rr).mean().item())


def bt_separate(rc, rr):
    return -(F.logsigmoid(rc) - F.logsigmoid(rr)).mean()


def bt_no_log(rc, rr):
    return -torch.sigmoid(rc - rr).mean()


# --- Elo
def elo_base_e(ra, rb, s, k):
    e = 1 / (1 + torch.exp((rb - ra) / 400))
    return ra + k * (s - e), rb - k * (s - e)


def elo_flipped(ra, rb, s, k):
    e = 1 / (1 + 10 ** ((ra - rb) / 400))
    return ra + k * (s - e), rb - k * (s - e)


def elo_scale(ra, rb, s, k):
    e = 1 / (1 + 10 ** ((rb - ra) / 40))
    return ra + k * (s - e), rb - k * (s - e)


def elo_half_k(ra, rb, s, k):
    e = 1 / (1 + 10 ** ((rb - ra) / 400))
    return ra + k / 2 * (s - e), rb - k / 2 * (s - e)


def elo_no_k(ra, rb, s, k):
    e = 1 / (1 + 10 ** ((rb - ra) / 400))
    return ra + (s - e), rb - (s - e)


def elo_same_direction(ra, rb, s, k):
    e = 1 / (1 + 10 ** ((rb - ra) / 400))
    return ra + k * (s - e), rb + k * (s - e)


def elo_sequential(ra, rb, s, k):
    new_a = ra + k * (s - 1 / (1 + 10 ** ((rb - ra) / 400)))
    new_b = rb + k * ((1 - s) - 1 / (1 + 10 ** ((new_a - rb) / 400)))
    return new_a, new_b


def elo_swapped(ra, rb, s, k):
    a, b = rewards.elo_update(ra, rb, s, k)
    return b, a


# --- accuracy
def acc_ties_right(rc, rr):
    return (rc >= rr).float().mean().item()


def acc_ties_wrong(rc, rr):
    return (rc > rr).float().mean().item()


def acc_inverted(rc, rr):
    return 1 - rewards.pairwise_accuracy(rc, rr)


# --- ECE
def ece_unweighted(p, y, n_bins=10):
    conf, freq, counts = rewards.calibration_bins(p, y, n_bins)
    keep = counts > 0
    return (freq[keep] - conf[keep]).abs().mean().item()


def ece_quantile(p, y, n_bins=10):
    chunks = torch.tensor_split(p.argsort(), n_bins)
    return sum(len(c) / len(p) * abs(y[c].mean().item() - p[c].mean().item()) for c in chunks if len(c))


def ece_drops_ones(p, y, n_bins=10):
    total = 0.0
    for b in range(n_bins):
        sel = (p >= b / n_bins) & (p < (b + 1) / n_bins)
        if sel.any():
            total += sel.sum().item() / len(p) * abs(y[sel].mean().item() - p[sel].mean().item())
    return total


def ece_linspace(p, y, n_bins=10):
    edges = torch.linspace(0, 1, n_bins, dtype=p.dtype)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (p >= lo) & ((p < hi) | ((hi == 1) & (p == 1)))
        if sel.any():
            total += sel.sum().item() / len(p) * abs(y[sel].mean().item() - p[sel].mean().item())
    return total


def ece_top_label(p, y, n_bins=10):
    top = torch.maximum(p, 1 - p)
    correct = ((p >= 0.5).double() == y).double()
    return rewards.expected_calibration_error(top, correct, n_bins)


def ece_centres(p, y, n_bins=10):
    conf, freq, counts = rewards.calibration_bins(p, y, n_bins)
    centres = (torch.arange(n_bins, dtype=torch.float64) + 0.5) / n_bins
    keep = counts > 0
    return ((counts[keep] / len(p)) * (freq[keep] - centres[keep]).abs()).sum().item()


def ece_nan_empty(p, y, n_bins=10):
    conf, freq, counts = rewards.calibration_bins(p, y, n_bins)
    return ((counts / len(p)) * (freq - conf).abs()).sum().item()  # nan from empty bins


def ece_loop_reference(p, y, n_bins=10):
    """A plain loop, written independently: must pass."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        sel = (p >= lo) & ((p < hi) if b < n_bins - 1 else (p <= hi))
        if sel.any():
            total += sel.sum().item() / len(p) * abs(y[sel].mean().item() - p[sel].mean().item())
    return total


CASES = [
    (week02.check_bradley_terry_loss, rewards.bradley_terry_loss, [
        (bt_sign, "sign is flipped"), (bt_softplus, "softplus"), (bt_sum, "sum over pairs"),
        (bt_naive_log, "logsigmoid"), (bt_no_mean, "mean"), (bt_item, "not differentiable"),
        (bt_separate, "separately"), (bt_no_log, "log is missing"),
        (lambda rc, rr: -F.logsigmoid(rr - rc).mean(), "swapped"),
    ]),
    (week02.check_elo_update, rewards.elo_update, [
        (elo_base_e, "base is e"), (elo_flipped, "sign of the difference"), (elo_scale, "scale is off"),
        (elo_half_k, "halved"), (elo_no_k, "K-factor is missing"), (elo_same_direction, "same way"),
        (elo_sequential, "NEW rating"), (elo_swapped, "swapped"),
        (lambda ra, rb, s, k: (rewards.elo_update(ra, rb, s, k)[0], rb), "did not change"),
    ]),
    (week02.check_pairwise_accuracy, rewards.pairwise_accuracy, [
        (acc_ties_right, "ties are counted as correct"), (acc_ties_wrong, "ties are counted as wrong"),
        (acc_inverted, "WRONG way"),
        (lambda rc, rr: (rc > rr).sum().item() + 0.5 * (rc == rr).sum().item(), "count, not a share"),
    ]),
    (week02.check_expected_calibration_error, rewards.expected_calibration_error, [
        (ece_unweighted, "equal weight"), (ece_quantile, "quantile"), (ece_drops_ones, "1.0 are dropped"),
        (ece_linspace, "n_bins - 1 bins"), (ece_top_label, "top-label"), (ece_centres, "centre"),
        (ece_nan_empty, "empty bins"),
        (lambda p, y, n_bins=10: ((rewards.calibration_bins(p, y, n_bins)[2] / len(p)).nan_to_num()
                                  * (rewards.calibration_bins(p, y, n_bins)[1]
                                     - rewards.calibration_bins(p, y, n_bins)[0]).nan_to_num() ** 2).sum().item(),
         "squared"),
    ]),
]


test_reference_passes, test_stub_says_not_implemented, test_planted_mistake_is_named = both_directions(CASES)


def test_independent_loop_ece_passes():
    assert run_quiet(week02.check_expected_calibration_error, ece_loop_reference).startswith("PASS")


def test_independent_scalar_elo_passes():
    def scalar_elo(ra, rb, s, k):
        new_a, new_b = [], []
        for a, b, sc in zip(ra.tolist(), rb.tolist(), s.tolist()):
            e = 1 / (1 + math.pow(10, (b - a) / 400))
            new_a.append(a + k * (sc - e))
            new_b.append(b - k * (sc - e))
        return torch.tensor(new_a, dtype=ra.dtype), torch.tensor(new_b, dtype=rb.dtype)

    assert run_quiet(week02.check_elo_update, scalar_elo).startswith("PASS")


def test_softplus_form_passes():
    assert run_quiet(week02.check_bradley_terry_loss, lambda rc, rr: F.softplus(rr - rc).mean()).startswith("PASS")
