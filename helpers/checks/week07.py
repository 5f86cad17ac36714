"""Checks for week 7: back-scatter neighbour selection, the batched stable-alignment loss, the satisfaction aggregate."""

from __future__ import annotations

import torch

from .. import scai, social
from . import CheckError, check, close, diagnose, expect_tensor, fresh_seed, run_student


# ------------------------------------------------------------------------------------------- neighbours


def _grid(seed: int, size: int):
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    locations = torch.stack([rows.flatten(), cols.flatten()], -1)  # (N, 2)
    active = torch.rand(size * size, generator=g) > 0.15
    return locations, active, g


def _as_mask(got, n: int, label: str) -> torch.Tensor:
    got = expect_tensor(got, (n,), label)
    if got.dtype != torch.bool:
        if not ((got == 0) | (got == 1)).all():
            raise CheckError(f"{label} should return a bool mask (True for a neighbour), got values {got.unique()[:5].tolist()}.")
        got = got.bool()
    return got


@check
def check_neighbour_mask(fn) -> str:
    """``fn(locations (N,2), center, radius, active (N,)) -> (N,) bool``: who can give ``center`` feedback."""
    seed = fresh_seed()
    for size, radius in ((7, 2.5), (6, 2.0), (8, 3.0), (5, 1.0)):
        locations, active, g = _grid(seed + size, size)
        n = size * size
        middle = (size // 2) * size + size // 2  # first the middle cell, where every distance occurs
        for center in [middle] + torch.randint(0, n, (2,), generator=g).tolist():
            args = (locations.clone(), center, radius, active.clone())
            got = _as_mask(run_student(fn, *args), n, "neighbour_mask")
            expected = social.neighbour_mask(*args)
            if torch.equal(got, expected):
                continue
            loc = locations.double()
            diff = loc - loc[center]
            euclid = diff.pow(2).sum(-1).sqrt()
            base = (euclid <= radius) & active
            base_self, base_self_active = base.clone(), base.clone()
            base_self[center] = True
            base_self_active[center] = bool(active[center])
            itself = "the agent itself is in the mask: exclude the center (it cannot rate its own answer)."
            mistakes = {
                itself: base_self,
                itself + " ": base_self_active,
                "inactive agents are included: and the mask with `active`.": (euclid <= radius) & (euclid > 0),
                "the distance should be Euclidean (sqrt(dr^2 + dc^2)); this looks like Manhattan distance "
                "(|dr| + |dc|).": (diff.abs().sum(-1) <= radius) & active & (euclid > 0),
                "the distance should be Euclidean; this looks like Chebyshev distance (max(|dr|, |dc|)).":
                    (diff.abs().max(-1).values <= radius) & active & (euclid > 0),
                "agents exactly at distance `radius` are missing: the circle includes its edge (<=, not <).":
                    (euclid < radius) & active & (euclid > 0),
                "the squared distance is compared with the radius: compare distance <= radius "
                "(or squared distance <= radius ** 2).": (diff.pow(2).sum(-1) <= radius) & active & (euclid > 0),
            }
            for message, wrong in mistakes.items():
                if torch.equal(got, wrong):
                    raise CheckError(f"neighbour_mask (center {center}, radius {radius}): {message} (seed {seed})")
            missing = (expected & ~got).nonzero().flatten().tolist()
            extra = (got & ~expected).nonzero().flatten().tolist()
            raise CheckError(f"neighbour_mask (center {center}, radius {radius}, grid {size}x{size}): missing "
                             f"agents {missing[:6]}, unexpected agents {extra[:6]} (seed {seed}).")
    # A radius smaller than one cell: nobody is in reach, and nothing breaks.
    locations, active, _ = _grid(seed, 4)
    got = _as_mask(run_student(fn, locations.clone(), 5, 0.5, active.clone()), 16, "neighbour_mask")
    if got.any():
        raise CheckError("with radius 0.5 no other agent is in reach, but the mask has neighbours.")
    return "Euclidean circle with its edge, the agent itself and inactive agents excluded"


# ------------------------------------------------------------------------------------------ the loss


def _loss_case(seed: int, B: int = 5, K: int = 4, nll_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    nll = torch.rand(B, K, generator=g) * 2.5 * nll_scale + 0.1
    ratings = torch.randint(1, 8, (B, K), generator=g).float()
    ratings[0] = torch.tensor([3.0, 6.0, 2.0, 5.0][:K] + [1.0] * max(0, K - 4))  # best not first
    nll[0, :4] = torch.tensor([0.2, 1.0, 3.0, 1.1])  # comparisons of both signs: clamping each term differs
    counts = torch.randint(1, K + 1, (B,), generator=g)
    counts[0], counts[1], counts[2] = K, 1, K - 1  # full, single (no comparison), padded
    mask = torch.arange(K)[None, :] < counts[:, None]
    ratings = torch.where(mask, ratings, torch.full_like(ratings, 9.0))  # padding holds garbage: a high rating
    nll_padded = torch.where(mask, nll, torch.full_like(nll, -5.0))
    return nll_padded, ratings, mask


def _variant(nll, ratings, mask, *, margin, rating_scale, ratio, max_flow, gap=True, scale=True, sign=1.0,
             clamp_each=False, include_self=False, use_worst=False, use_mask=True) -> torch.Tensor:
    """The loss with one typical mistake switched on (the default arguments give the right loss)."""
    if not use_mask:
        mask = torch.ones_like(mask)
    if use_worst:
        anchor = ratings.masked_fill(~mask, float("inf")).argmin(-1, keepdim=True)
    else:
        anchor = ratings.masked_fill(~mask, float("-inf")).argmax(-1, keepdim=True)
    others = mask.clone()
    if not include_self:
        others.scatter_(-1, anchor, False)
    g = ratings.gather(-1, anchor) - ratings if gap else torch.ones_like(ratings)
    d = sign * (nll.gather(-1, anchor) - nll) + margin * g / (rating_scale if scale else 1.0)
    if clamp_each:
        d = d.clamp(min=0)
    n = others.sum(-1)
    if max_flow:
        agg = d.masked_fill(~others, float("-inf")).max(-1).values
    else:
        agg = d.masked_fill(~others, 0.0).sum(-1) / n.clamp(min=1)
    penalty = torch.where(n > 0, agg.clamp(min=0), torch.zeros_like(agg))
    return (nll.gather(-1, anchor).squeeze(-1) + ratio * penalty).mean()


def _loss_mistakes(nll, ratings, mask, kw) -> dict[str, torch.Tensor]:
    return {
        "padded responses are used: pick the best and average the comparisons only where mask is 1 "
        "(padding may hold any rating).": _variant(nll, ratings, mask, **kw, use_mask=False),
        "the hinge has the wrong sign: penalise nll_best - nll_k + margin * gap, so that each worse response's "
        "NLL ends up *above* the best's.": _variant(nll, ratings, mask, **kw, sign=-1.0),
        "the margin is not divided by rating_scale: use margin * (r_best - r_k) / rating_scale.":
            _variant(nll, ratings, mask, **kw, scale=False),
        "the rating gap is missing from the margin: use margin * (r_best - r_k) / rating_scale.":
            _variant(nll, ratings, mask, **kw, gap=False),
        "the rating gap is missing and the margin is not scaled: use margin * (r_best - r_k) / rating_scale.":
            _variant(nll, ratings, mask, **kw, gap=False, scale=False),
        "each comparison is clamped separately: like the reference, clamp the aggregate, max(0, mean_k d_k).":
            _variant(nll, ratings, mask, **kw, clamp_each=True),
        "the best response is compared with itself: average over the *other* valid responses only.":
            _variant(nll, ratings, mask, **kw, include_self=True),
        "the SFT term uses the worst-rated response: the NLL to minimise is the best-rated one's.":
            _variant(nll, ratings, mask, **kw, use_worst=True),
        "the ratio is missing: loss = nll_best + ratio * penalty.": _variant(nll, ratings, mask, **{**kw, "ratio": 1.0}),
        "the mean or max switch is ignored: with max_flow=False average the comparisons.":
            _variant(nll, ratings, mask, **{**kw, "max_flow": not kw["max_flow"]}),
        "the per-question losses are summed: average them over the batch.":
            _variant(nll, ratings, mask, **kw) * nll.shape[0],
    }


@check
def check_stable_alignment_loss(fn) -> str:
    """``fn(nll (B,K), ratings (B,K), mask (B,K), margin, rating_scale, ratio, max_flow) -> scalar``."""
    seed = fresh_seed()
    settings = [dict(margin=1.0, rating_scale=7.0, ratio=0.5, max_flow=False),
                dict(margin=3.0, rating_scale=7.0, ratio=0.8, max_flow=False),
                dict(margin=2.0, rating_scale=5.0, ratio=0.5, max_flow=True)]
    for i, kw in enumerate(settings):
        nll, ratings, mask = _loss_case(seed + i, nll_scale=0.3 if i == 1 else 1.0)
        got = run_student(fn, nll.clone(), ratings.clone(), mask.clone(), kw["margin"], kw["rating_scale"],
                          kw["ratio"], kw["max_flow"])
        got = expect_tensor(got, (), "stable_alignment_loss")
        expected = social.stable_alignment_loss(nll, ratings, mask, **kw)
        mistakes = _loss_mistakes(nll, ratings, mask, kw)
        if kw["max_flow"]:
            mistakes = {"with max_flow=True take the largest comparison, not the mean.":
                        _variant(nll, ratings, mask, **{**kw, "max_flow": False}), **mistakes}
        diagnose(got, expected, mistakes, label=f"stable_alignment_loss ({kw})", seed=seed)
    # Gradient: it must flow to the NLLs (the loss trains the model), and only through valid responses.
    nll, ratings, mask = _loss_case(seed, nll_scale=0.3)
    leaf = nll.clone().requires_grad_(True)
    out = run_student(fn, leaf, ratings.clone(), mask.clone(), 3.0, 7.0, 0.5, False)
    if not isinstance(out, torch.Tensor) or not out.requires_grad:
        raise CheckError("stable_alignment_loss returns no gradient: keep it a torch expression of nll "
                         "(no .item(), no float()).")
    out.backward()
    if leaf.grad is None or not torch.isfinite(leaf.grad).all():
        raise CheckError("the gradient of stable_alignment_loss is missing or not finite.")
    if (leaf.grad[~mask] != 0).any():
        raise CheckError("padded responses receive gradient: they must not enter the loss.")
    # Stability: huge NLLs (a model that finds a response near impossible) stay finite.
    nll, ratings, mask = _loss_case(seed)
    got = run_student(fn, nll * 1e4, ratings.clone(), mask.clone(), 1.0, 7.0, 0.5, False)
    if not torch.isfinite(torch.as_tensor(got)).all():
        raise CheckError("stable_alignment_loss is inf/nan for large NLLs; fill padding with masked_fill or "
                         "torch.where rather than multiplying -inf or nan by 0.")
    diagnose(torch.as_tensor(got), social.stable_alignment_loss(nll * 1e4, ratings, mask), {},
             label="stable_alignment_loss with NLLs ~ 1e4", seed=seed, atol=1e-1)
    return "best response, masked comparisons, margin by rating gap, mean and max, gradient"


# ------------------------------------------------------------------------------------- satisfaction


def _sat_case(seed: int, U: int = 6, T: int = 5):
    g = torch.Generator().manual_seed(seed)
    sat = torch.rand(U, T, generator=g)
    counts = torch.randint(1, T + 1, (U,), generator=g)
    counts[0], counts[1], counts[2] = T, 1, 0  # a talkative user, a quiet one, one who asked nothing
    mask = torch.arange(T)[None, :] < counts[:, None]
    sat = torch.where(mask, sat, torch.full_like(sat, 0.77))  # padding holds garbage
    return sat, mask


@check
def check_satisfaction_aggregate(fn) -> str:
    """``fn(sat (U,T), mask (U,T)) -> (per_user (U,), overall ())``: each user counts once."""
    seed = fresh_seed()
    for i in range(3):
        sat, mask = _sat_case(seed + i, U=6 + i, T=5 + i)
        got = run_student(fn, sat.clone(), mask.clone())
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise CheckError("satisfaction_aggregate should return two tensors: (per_user, overall).")
        per_user, overall = got
        exp_user, exp_all = scai.satisfaction_aggregate(sat, mask)
        per_user = expect_tensor(per_user, tuple(exp_user.shape), "per_user")
        if torch.isnan(per_user).any():
            raise CheckError("per_user has nan: a user with no turns divides by zero; clamp the count to at "
                             "least 1 (that user's mean is 0).")
        m = mask.float()
        diagnose(per_user, exp_user, {
            "padding is counted: divide by the number of turns each user took (mask.sum), not by T.":
                (sat * m).sum(-1) / sat.shape[1],
            "padding values are included: multiply by the mask before summing.": sat.sum(-1) / m.sum(-1).clamp(min=1),
        }, label="per_user", seed=seed)
        overall = expect_tensor(torch.as_tensor(overall), (), "overall")
        n = m.sum(-1)
        diagnose(overall, exp_all, {
            "the overall mean weights users by how much they talked: average the per-user means "
            "(each user once), not all turns.": (sat * m).sum() / m.sum(),
            "users who asked nothing are counted (as 0): average only over users with at least one turn.":
                exp_user.mean(),
        }, label="overall", seed=seed)
        if n.min() > 0:
            raise CheckError("internal: the case should include a silent user")  # pragma: no cover
    # Extreme: everyone silent but one.
    sat = torch.rand(4, 3)
    mask = torch.zeros(4, 3, dtype=torch.bool)
    mask[2, :2] = True
    per_user, overall = run_student(fn, sat.clone(), mask.clone())
    if not close(torch.as_tensor(overall), sat[2, :2].mean()):
        raise CheckError("with a single user who spoke, the overall satisfaction is that user's mean.")
    if not torch.isfinite(torch.as_tensor(per_user)).all():
        raise CheckError("per_user is not finite when users asked nothing: clamp the counts to at least 1.")
    return "per-user means over their own turns, overall mean over users who spoke"
