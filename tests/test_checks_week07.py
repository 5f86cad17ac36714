"""Week 7 checks in both directions: the reference passes; a stub and typical mistakes fail with a diagnosis."""


import pytest
import torch

from helpers import scai, social
from check_harness import both_directions, run_quiet
from helpers.checks import CheckError, week07


# --- neighbour_mask
def nm_with_self(loc, center, radius, active):
    d = (loc - loc[center]).double().pow(2).sum(-1).sqrt()
    return (d <= radius) & active.bool() | (torch.arange(len(loc)) == center)


def nm_no_active(loc, center, radius, active):
    d = (loc - loc[center]).double().pow(2).sum(-1).sqrt()
    return (d <= radius) & (d > 0)


def nm_manhattan(loc, center, radius, active):
    d = (loc - loc[center]).abs().sum(-1).double()
    return (d <= radius) & (d > 0) & active.bool()


def nm_chebyshev(loc, center, radius, active):
    d = (loc - loc[center]).abs().max(-1).values.double()
    return (d <= radius) & (d > 0) & active.bool()


def nm_strict(loc, center, radius, active):
    d = (loc - loc[center]).double().pow(2).sum(-1).sqrt()
    return (d < radius) & (d > 0) & active.bool()


def nm_squared(loc, center, radius, active):
    d2 = (loc - loc[center]).double().pow(2).sum(-1)
    return (d2 <= radius) & (d2 > 0) & active.bool()


# --- stable_alignment_loss (positional: nll, ratings, mask, margin, rating_scale, ratio, max_flow)
def sa_ref(nll, ratings, mask, margin, rating_scale, ratio, max_flow):
    return social.stable_alignment_loss(nll, ratings, mask, margin=margin, rating_scale=rating_scale, ratio=ratio,
                                        max_flow=max_flow)


def sa_no_mask(nll, ratings, mask, margin, rating_scale, ratio, max_flow):
    return sa_ref(nll, ratings, torch.ones_like(mask), margin, rating_scale, ratio, max_flow)


def sa_no_scale(nll, ratings, mask, margin, rating_scale, ratio, max_flow):
    return sa_ref(nll, ratings, mask, margin * rating_scale, rating_scale, ratio, max_flow)


def sa_ignores_max_flow(nll, ratings, mask, margin, rating_scale, ratio, max_flow):
    return sa_ref(nll, ratings, mask, margin, rating_scale, ratio, False)


def sa_clamp_each(nll, ratings, mask, margin, rating_scale, ratio, max_flow):
    return week07._variant(nll, ratings, mask, margin=margin, rating_scale=rating_scale, ratio=ratio,
                           max_flow=max_flow, clamp_each=True)


def sa_include_self(nll, ratings, mask, margin, rating_scale, ratio, max_flow):
    return week07._variant(nll, ratings, mask, margin=margin, rating_scale=rating_scale, ratio=ratio,
                           max_flow=max_flow, include_self=True)


def sa_flipped(nll, ratings, mask, margin, rating_scale, ratio, max_flow):
    return week07._variant(nll, ratings, mask, margin=margin, rating_scale=rating_scale, ratio=ratio,
                           max_flow=max_flow, sign=-1.0)


def sa_sum(nll, ratings, mask, margin, rating_scale, ratio, max_flow):
    return sa_ref(nll, ratings, mask, margin, rating_scale, ratio, max_flow) * nll.shape[0]


def sa_detached(nll, ratings, mask, margin, rating_scale, ratio, max_flow):
    return torch.tensor(sa_ref(nll, ratings, mask, margin, rating_scale, ratio, max_flow).item())


# --- satisfaction_aggregate
def sat_all_turns(sat, mask):
    per_user, _ = scai.satisfaction_aggregate(sat, mask)
    return per_user, (sat * mask).sum() / mask.sum()


def sat_divide_by_t(sat, mask):
    per_user = (sat * mask).sum(-1) / sat.shape[1]
    return per_user, per_user[mask.any(-1)].mean()


def sat_count_silent(sat, mask):
    per_user, _ = scai.satisfaction_aggregate(sat, mask)
    return per_user, per_user.mean()


def sat_nan(sat, mask):
    per_user = (sat * mask).sum(-1) / mask.sum(-1)
    return per_user, per_user[mask.any(-1)].mean()


CASES = [
    (week07.check_neighbour_mask, social.neighbour_mask, [
        (nm_with_self, "itself"), (nm_no_active, "inactive"), (nm_manhattan, "Manhattan"),
        (nm_chebyshev, "Chebyshev"), (nm_strict, "edge"), (nm_squared, "squared"),
    ]),
    (week07.check_stable_alignment_loss, sa_ref, [
        (sa_no_mask, "padded"), (sa_no_scale, "rating_scale"), (sa_ignores_max_flow, "max_flow"),
        (sa_clamp_each, "clamp"), (sa_include_self, "itself"), (sa_flipped, "sign"), (sa_sum, "summed"),
        (sa_detached, "gradient"),
    ]),
    (week07.check_satisfaction_aggregate, scai.satisfaction_aggregate, [
        (sat_all_turns, "talked"), (sat_divide_by_t, "number of turns"), (sat_count_silent, "asked nothing"),
        (sat_nan, "nan"),
    ]),
]


test_reference_passes, test_stub_says_not_implemented, test_planted_mistake_is_named = both_directions(CASES)


def test_reference_passes_repeatedly():
    """Fresh random inputs each time: the reference must pass on every draw, not by luck."""
    for _ in range(10):
        for check, reference, _ in CASES:
            run_quiet(check, reference)


def test_wrong_shape_and_crash_are_reported():
    with pytest.raises(CheckError, match="shape"):
        run_quiet(week07.check_neighbour_mask, lambda loc, c, r, a: torch.zeros(3, dtype=torch.bool))
    with pytest.raises(CheckError, match="raised"):
        run_quiet(week07.check_stable_alignment_loss, lambda *a: a[0] @ a[0] @ a[0])
    with pytest.raises(CheckError, match="two tensors"):
        run_quiet(week07.check_satisfaction_aggregate, lambda sat, mask: sat.mean())
