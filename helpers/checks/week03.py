"""Checks for week 3 (RLHF end to end): the KL-penalised per-token rewards, masked whitening, the clipped value
loss, and the adaptive KL controller's update. References: :mod:`helpers.ppo`."""

from __future__ import annotations

import math

import torch

from .. import lm, ppo
from . import CheckError, check, diagnose, expect_tensor, fresh_seed, run_student


def _response_case(seed: int, B: int = 5, T: int = 10):
    """Per-token tensors (B, T) with a response mask: a prompt before, padding after, one row without padding."""
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g) * 3
    ref_logprobs = logprobs + torch.randn(B, T, generator=g) * 0.5
    start = torch.randint(1, 4, (B,), generator=g)
    length = torch.randint(2, 6, (B,), generator=g)
    start[0], length[0] = 2, T - 2  # the first row's response runs to the last column
    pos = torch.arange(T)[None, :]
    mask = (pos >= start[:, None]) & (pos < (start + length)[:, None])  # (B, T) bool
    return logprobs, ref_logprobs, mask, g  # prompt and padding positions hold values that must be ignored


def reference_adaptive_kl_update(kl_coef: float, current_kl: float, target: float, n_steps: int,
                                 horizon: int) -> float:
    """Ziegler et al. (2019): ``e = clip(KL / target - 1, -0.2, 0.2)``; ``beta <- beta (1 + e n / horizon)``."""
    ctl = ppo.AdaptiveKLController(kl_coef, target, horizon)
    return ctl.update(current_kl, n_steps)


@check
def check_kl_penalised_rewards(fn) -> str:
    """``fn(score (B,), logprobs (B,T), ref_logprobs (B,T), mask (B,T), kl_coef) -> (rewards (B,T), kl (B,T))``."""
    seed = fresh_seed()
    logprobs, ref_logprobs, mask, g = _response_case(seed)
    B, T = mask.shape
    score = torch.randn(B, generator=g) * 2
    kl_coef = 0.1 + torch.rand((), generator=g).item()
    got = run_student(fn, score.clone(), logprobs.clone(), ref_logprobs.clone(), mask.clone(), kl_coef,
                      name="kl_penalised_rewards")
    if not (isinstance(got, tuple) and len(got) == 2):
        raise CheckError("kl_penalised_rewards should return a pair (rewards, kl), both (B, T).")
    rewards, kl = (expect_tensor(x, (B, T), f"kl_penalised_rewards' {name}") for x, name in zip(got, ("rewards", "kl")))
    exp_rewards, exp_kl = ppo.kl_penalised_rewards(score, logprobs, ref_logprobs, mask, kl_coef)
    m = mask.float()
    diagnose(kl, exp_kl, {
        "the KL has the wrong sign: k1 is log pi(a|s) - log pi_ref(a|s) (policy minus reference).": -exp_kl,
        "the KL already includes kl_coef: return the raw per-token KL (logprobs - ref_logprobs) as kl.":
            kl_coef * exp_kl,
        "this is k3, not k1: the penalty of Ziegler et al. uses log pi - log pi_ref.":
            ppo.kl_estimators(logprobs, ref_logprobs)["k3"] * m,
    }, label="kl (second output)", seed=seed)
    last_col = torch.zeros(B, T)
    last_col[:, -1] = score
    first = (m.cumsum(-1) == 1) & mask
    every = score[:, None] * m
    mistakes = {
        "the score is added at every response token; add it once, at the last response token.":
            -kl_coef * exp_kl + every,
        "the score sits in the last column; put it at each row's last *response* token (rows end at different "
        "places: use the mask).": -kl_coef * exp_kl + last_col,
        "the score sits at the first response token; it belongs to the last one (the reward arrives when the "
        "response is complete).": -kl_coef * exp_kl + first.float() * score[:, None],
        "the KL penalty has the wrong sign: rewards = -kl_coef * (logprobs - ref_logprobs), plus the score.":
            kl_coef * exp_kl + (exp_rewards + kl_coef * exp_kl),
        "kl_coef is missing: the penalty is -kl_coef * kl.": exp_rewards + kl_coef * exp_kl - exp_kl,
        "only the score is there: every response token also gets -kl_coef * kl.": exp_rewards + kl_coef * exp_kl,
        "prompt and padding positions are not zero: apply the mask to the KL before using it.":
            exp_rewards - kl_coef * (logprobs - ref_logprobs) * (1 - m),
    }
    diagnose(rewards, exp_rewards, mistakes, label="rewards (first output)", seed=seed)
    return "score at each row's last response token, -kl_coef * k1 on every response token"


@check
def check_masked_whiten(fn) -> str:
    """``fn(x (B,T), mask (B,T), shift_mean=True) -> (B,T)``: zero mean and unit variance over masked positions."""
    seed = fresh_seed()
    x, _, mask, g = _response_case(seed)
    x = (x + torch.randn(x.shape, generator=g) * 3 + 5) * mask + 100.0 * ~mask  # padding holds junk
    for shift in (True, False):
        got = expect_tensor(run_student(fn, x.clone(), mask.clone(), shift_mean=shift, name="masked_whiten"),
                            tuple(x.shape), "masked_whiten")
        expected = ppo.whiten(x, mask, shift_mean=shift)
        m = mask.float()
        plain = (x - x.mean()) / x.std(unbiased=False)
        mean = lm.masked_mean(x, mask)
        unbiased_var = ((x - mean) ** 2 * m).sum() / (m.sum() - 1)
        std_only = (x - mean) * torch.rsqrt(lm.masked_mean((x - mean) ** 2, mask) + 1e-8)
        mistakes = {
            "the statistics include prompt and padding positions: compute the mean and variance over the mask only.":
                plain * m,
            "padding positions are not zero: multiply the result by the mask.": std_only + (0 if shift else mean),
            "the variance is unbiased (divided by n - 1); use the plain mean of squared deviations over the mask.":
                (x - mean) * torch.rsqrt(unbiased_var + 1e-8) * m + (0 if shift else mean * m),
            "statistics over the mask, but the result is not masked and uses all positions' mean.":
                plain,
        }
        if shift:
            mistakes["the mean is not subtracted although shift_mean=True."] = ppo.whiten(x, mask, shift_mean=False)
        else:
            mistakes["with shift_mean=False the mean must be added back (only the scale changes)."] = \
                ppo.whiten(x, mask, shift_mean=True)
        diagnose(got, expected, mistakes, label=f"masked_whiten(shift_mean={shift})", seed=seed, atol=1e-4)
    # Stability: a constant input has variance 0; the result must be finite (0), not nan.
    const = torch.full_like(x, 3.0)
    got = run_student(fn, const, mask.clone(), shift_mean=True, name="masked_whiten")
    if not torch.isfinite(got).all():
        raise CheckError("masked_whiten returns nan/inf for a constant input (variance 0): add a small eps "
                         "inside the square root, e.g. torch.rsqrt(var + 1e-8).")
    diagnose(got, ppo.whiten(const, mask), {}, label="masked_whiten on a constant input", seed=seed, atol=1e-4)
    return "masked mean and variance, padding zero, shift_mean honoured, constant input finite"


@check
def check_clipped_value_loss(fn) -> str:
    """``fn(values, old_values, returns, mask, clip_value) -> scalar``: PPO's clipped value loss."""
    seed = fresh_seed()
    old_values, returns, mask, g = _response_case(seed)
    values = old_values + torch.randn(old_values.shape, generator=g) * 0.4
    clip_value = 0.2
    # Clipping must bind somewhere: at row 0's first response token the value moves 0.5 toward a return 1.0 away,
    # so the clipped error (0.8^2) is larger than the unclipped one (0.5^2).
    j = int(mask[0].nonzero()[0])
    returns[0, j], values[0, j] = old_values[0, j] + 1.0, old_values[0, j] + 0.5
    got = expect_tensor(run_student(fn, values.clone(), old_values.clone(), returns.clone(), mask.clone(),
                                    clip_value, name="clipped_value_loss"), (), "clipped_value_loss")
    expected = ppo.ppo_value_loss(values, old_values, returns, mask, clip_value)
    unclipped = (values - returns) ** 2
    clipped_v = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    clipped = (clipped_v - returns) ** 2
    mistakes = {
        "min instead of max: PPO takes the *larger* (pessimistic) of the clipped and unclipped losses.":
            0.5 * lm.masked_mean(torch.min(unclipped, clipped), mask),
        "the factor 1/2 is missing: 0.5 * mean[max(...)].": lm.masked_mean(torch.max(unclipped, clipped), mask),
        "no clipping: the loss is only 0.5 * (V - R)^2.": 0.5 * lm.masked_mean(unclipped, mask),
        "only the clipped term: take the max of the clipped and the unclipped squared errors.":
            0.5 * lm.masked_mean(clipped, mask),
        "the values are clipped to [-clip, clip] instead of to within clip of the old values.":
            0.5 * lm.masked_mean(torch.max(unclipped, (values.clamp(-clip_value, clip_value) - returns) ** 2), mask),
        "the mean runs over padding and prompt positions too: use a masked mean.":
            0.5 * torch.max(unclipped, clipped).mean(),
        "the new values are clipped around the returns, not around the old values.":
            0.5 * lm.masked_mean(torch.max(unclipped, (returns + torch.clamp(values - returns, -clip_value,
                                                                             clip_value) - returns) ** 2), mask),
    }
    diagnose(got, expected, mistakes, label="clipped_value_loss", seed=seed)
    # Invariant: when the new values equal the old ones, clipping changes nothing.
    same = run_student(fn, old_values.clone(), old_values.clone(), returns.clone(), mask.clone(), clip_value,
                       name="clipped_value_loss")
    diagnose(same, 0.5 * lm.masked_mean((old_values - returns) ** 2, mask), {}, label="clipped_value_loss with "
             "values == old_values (clipping must be a no-op)", seed=seed)
    # Gradients must flow to the values.
    v = values.clone().requires_grad_(True)
    loss = run_student(fn, v, old_values.clone(), returns.clone(), mask.clone(), clip_value, name="clipped_value_loss")
    if not loss.requires_grad:
        raise CheckError("clipped_value_loss does not depend on `values` through autograd (did you detach it or "
                         "call .item()?): the value head cannot learn from it.")
    loss.backward()
    if v.grad is None or (v.grad * ~mask).abs().max() > 0:
        raise CheckError("gradients reach prompt or padding positions: mask before averaging.")
    return "max of clipped and unclipped errors, 1/2, masked mean; no-op when values == old_values"


@check
def check_adaptive_kl_update(fn) -> str:
    """``fn(kl_coef, current_kl, target, n_steps, horizon) -> new kl_coef`` (Ziegler et al. 2019)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    cases = [(0.1, 6.0, 6.0, 64, 10_000), (0.1, 6.6, 6.0, 64, 10_000), (0.2, 3.0, 6.0, 256, 1000),
             (0.05, 30.0, 6.0, 512, 1000), (0.3, 0.0, 4.0, 32, 100)]
    for _ in range(6):
        u = torch.rand(5, generator=g).tolist()
        cases.append((0.01 + u[0], 20 * u[1], 0.5 + 8 * u[2], int(16 + 500 * u[3]), int(100 + 10_000 * u[4])))
    for beta, kl, target, n, horizon in cases:
        got = run_student(fn, beta, kl, target, n, horizon, name="adaptive_kl_update")
        if isinstance(got, torch.Tensor):
            got = got.item()
        if not isinstance(got, (int, float)) or not math.isfinite(got):
            raise CheckError(f"adaptive_kl_update should return a finite number, got {got!r}.")
        expected = reference_adaptive_kl_update(beta, kl, target, n, horizon)
        if math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-12):
            continue
        raw = kl / target - 1
        clipped = min(max(raw, -0.2), 0.2)
        where = f"(kl_coef={beta:.3g}, KL={kl:.3g}, target={target:.3g}, n_steps={n}, horizon={horizon}; seed {seed})"
        wrong = {
            "the error is not clipped to [-0.2, 0.2]: a KL far from the target must not move kl_coef by more "
            "than 20% of n_steps / horizon.": beta * (1 + raw * n / horizon),
            "the sign is flipped: when the KL is above target, kl_coef must grow (a stronger penalty).":
                beta * (1 - clipped * n / horizon),
            "n_steps / horizon is missing: each update moves kl_coef by e * n_steps / horizon, not by e.":
                beta * (1 + clipped),
            "the update is additive; it is multiplicative: kl_coef * (1 + e * n_steps / horizon).":
                beta + clipped * n / horizon,
            "the error is target / KL - 1; it is KL / target - 1.":
                beta * (1 + min(max(target / max(kl, 1e-12) - 1, -0.2), 0.2) * n / horizon),
        }
        for message, value in wrong.items():
            if math.isclose(got, value, rel_tol=1e-6, abs_tol=1e-12):
                raise CheckError(f"adaptive_kl_update: {message} {where}")
        raise CheckError(f"adaptive_kl_update returned {got:.6g}, expected {expected:.6g} {where}.")
    return "proportional, clipped, multiplicative, scaled by n_steps / horizon"
