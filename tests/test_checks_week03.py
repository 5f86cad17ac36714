"""Week 3 checks, both directions: the reference passes; a stub and typical mistakes fail with the mistake named."""


import pytest
import torch

from helpers import lm, ppo
from check_harness import both_directions
from helpers.checks import week03


def _last(mask):
    m = mask.float()
    return ((m.cumsum(-1) == m.sum(-1, keepdim=True)) & mask.bool()).float()


# --- kl_penalised_rewards
def kl_every_token(score, lp, ref, mask, beta):
    kl = (lp - ref) * mask
    return -beta * kl + score[:, None] * mask, kl


def kl_last_column(score, lp, ref, mask, beta):
    kl = (lp - ref) * mask
    r = -beta * kl
    r[:, -1] += score
    return r, kl


def kl_flipped(score, lp, ref, mask, beta):
    kl = (ref - lp) * mask
    return -beta * kl + _last(mask) * score[:, None], kl


def kl_unmasked(score, lp, ref, mask, beta):
    kl = (lp - ref) * mask
    return -beta * (lp - ref) + _last(mask) * score[:, None], kl


def kl_no_coef(score, lp, ref, mask, beta):
    kl = (lp - ref) * mask
    return -kl + _last(mask) * score[:, None], kl


# --- masked_whiten
def wh_unmasked_stats(x, mask, shift_mean=True):
    out = (x - x.mean()) / x.std(unbiased=False)
    return out * mask


def wh_no_eps(x, mask, shift_mean=True):
    mean = lm.masked_mean(x, mask)
    out = (x - mean) / lm.masked_mean((x - mean) ** 2, mask).sqrt()
    return (out + (0 if shift_mean else mean)) * mask


def wh_ignores_shift(x, mask, shift_mean=True):
    return ppo.whiten(x, mask, shift_mean=True)


def wh_unbiased(x, mask, shift_mean=True):
    m = mask.float()
    mean = lm.masked_mean(x, mask)
    var = ((x - mean) ** 2 * m).sum() / (m.sum() - 1)
    return ((x - mean) * torch.rsqrt(var + 1e-8) + (0 if shift_mean else mean)) * m


def wh_no_mask_out(x, mask, shift_mean=True):
    mean = lm.masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(lm.masked_mean((x - mean) ** 2, mask) + 1e-8)
    return out + (0 if shift_mean else mean)


# --- clipped value loss
def vl_min(v, old, ret, mask, c):
    clipped = old + (v - old).clamp(-c, c)
    return 0.5 * lm.masked_mean(torch.min((v - ret) ** 2, (clipped - ret) ** 2), mask)


def vl_no_half(v, old, ret, mask, c):
    return 2 * ppo.ppo_value_loss(v, old, ret, mask, c)


def vl_abs_clip(v, old, ret, mask, c):
    return 0.5 * lm.masked_mean(torch.max((v - ret) ** 2, (v.clamp(-c, c) - ret) ** 2), mask)


def vl_plain_mean(v, old, ret, mask, c):
    clipped = old + (v - old).clamp(-c, c)
    return 0.5 * torch.max((v - ret) ** 2, (clipped - ret) ** 2).mean()


def vl_detached(v, old, ret, mask, c):
    return ppo.ppo_value_loss(v.detach(), old, ret, mask, c)


# --- adaptive KL
def akl_unclipped(beta, kl, target, n, horizon):
    return beta * (1 + (kl / target - 1) * n / horizon)


def akl_flipped(beta, kl, target, n, horizon):
    return beta * (1 - min(max(kl / target - 1, -0.2), 0.2) * n / horizon)


def akl_no_scale(beta, kl, target, n, horizon):
    return beta * (1 + min(max(kl / target - 1, -0.2), 0.2))


def akl_additive(beta, kl, target, n, horizon):
    return beta + min(max(kl / target - 1, -0.2), 0.2) * n / horizon


CASES = [
    (week03.check_kl_penalised_rewards, ppo.kl_penalised_rewards, [
        (kl_every_token, "every response token"), (kl_last_column, "last column"), (kl_flipped, "wrong sign"),
        (kl_unmasked, "not zero"), (kl_no_coef, "kl_coef is missing"),
        (lambda s, lp, ref, m, b: ppo.kl_penalised_rewards(s, lp, ref, m, b)[0], "pair"),
    ]),
    (week03.check_masked_whiten, ppo.whiten, [
        (wh_unmasked_stats, "over the mask"), (wh_no_eps, "eps"), (wh_ignores_shift, "added back"),
        (wh_unbiased, "unbiased"), (wh_no_mask_out, "multiply the result by the mask"),
    ]),
    (week03.check_clipped_value_loss, ppo.ppo_value_loss, [
        (vl_min, "min instead of max"), (vl_no_half, "1/2"), (vl_abs_clip, "[-clip, clip]"),
        (vl_plain_mean, "masked mean"), (vl_detached, "autograd"),
        (lambda v, old, ret, m, c: 0.5 * lm.masked_mean((v - ret) ** 2, m), "no clipping"),
    ]),
    (week03.check_adaptive_kl_update, week03.reference_adaptive_kl_update, [
        (akl_unclipped, "not clipped"), (akl_flipped, "sign is flipped"), (akl_no_scale, "n_steps / horizon"),
        (akl_additive, "multiplicative"), (lambda *a: float("nan"), "finite number"),
    ]),
]


test_reference_passes, test_stub_says_not_implemented, test_planted_mistake_is_named = both_directions(CASES)


def test_reference_update_hand_worked():
    # KL 10% above target: e = 0.1, beta = 0.1 * (1 + 0.1 * 100 / 1000) = 0.101.
    assert week03.reference_adaptive_kl_update(0.1, 6.6, 6.0, 100, 1000) == pytest.approx(0.101)
    # KL far below target: e is clipped at -0.2.
    assert week03.reference_adaptive_kl_update(0.1, 0.0, 6.0, 100, 1000) == pytest.approx(0.098)
