"""Policy-gradient building blocks for text, as pure functions of tensors (taught in weeks 1 and 3).

Shapes: ``B`` sequences, ``T`` token positions. Per-token tensors are (B, T) with a ``mask`` (B, T) that is 1 on
response tokens and 0 on prompt and padding; every reduction is a masked one (never a mean over padding).

References for the details: PPO (Schulman et al. 2017, eq. 7 and 9), GAE (Schulman et al. 2016, eq. 16),
the three KL estimators (Schulman, "Approximating KL divergence", 2020), the adaptive KL controller
(Ziegler et al. 2019, section 2.2), and the implementation details collected by Huang et al. (2022,
"The 37 implementation details of PPO"): advantage whitening, value clipping, masked means.
"""

from __future__ import annotations

import torch

from .lm import masked_mean


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean if ``shift_mean``) over the masked positions only."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Reward-to-go ``G_t = r_t + gamma * G_{t+1}`` inside each masked span, 0 outside. (B, T) -> (B, T)."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    m = mask.to(rewards.dtype)
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * m[:, t]
        out[:, t] = running
    return out


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the response tokens of each sequence.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, where the value after
    the last response token (the end of the episode) is 0. Returns ``(advantages, returns)``, both (B, T) and 0
    outside ``mask``; ``returns = advantages + values`` is the value target.
    """
    m = mask.to(values.dtype)
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    for t in reversed(range(T)):
        # A position outside the mask neither contributes nor passes value back (episode boundary).
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        advantages[:, t] = last
        next_value = values[:, t] * m[:, t]
    returns = (advantages + values) * m
    return advantages, returns


def kl_estimators(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token estimates of KL(policy || ref) from samples of the policy, with ``log r = ref - policy``:

    - ``k1 = -log r`` (unbiased, high variance, can be negative);
    - ``k2 = (log r)^2 / 2`` (biased, low variance, >= 0);
    - ``k3 = (r - 1) - log r`` (unbiased, low variance, >= 0).
    """
    log_ratio = ref_logprobs - logprobs
    return {"k1": -log_ratio, "k2": 0.5 * log_ratio**2, "k3": torch.expm1(log_ratio) - log_ratio}


def reinforce_loss(logprobs: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   baseline: torch.Tensor | float = 0.0) -> torch.Tensor:
    """REINFORCE with a baseline: ``-mean[(G_t - b) * log pi(a_t | s_t)]`` over masked tokens (a scalar)."""
    return -masked_mean((returns - baseline).detach() * logprobs, mask)


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_coef: float = 0.2) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate, negated for minimisation:

    ``L = -mean[min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)]``, ``ratio = exp(logprobs - old_logprobs)``.
    Returns the loss and stats: ``clipfrac`` (share of tokens where clipping is active) and ``approx_kl`` (k3
    between old and new policy).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_coef)
    pg_loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)  # max of negatives = min of the objectives
    with torch.no_grad():
        clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
        approx_kl = masked_mean(torch.expm1(-log_ratio) + log_ratio, mask)
    return pg_loss, {"clipfrac": clipfrac.item(), "approx_kl": approx_kl.item()}


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_value: float = 0.2) -> torch.Tensor:
    """Clipped value loss: ``0.5 * mean[max((V - R)^2, (V_clipped - R)^2)]``, ``V_clipped`` within
    ``clip_value`` of the old value."""
    clipped = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def kl_penalised_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for RLHF: ``-kl_coef * k1`` at every response token, plus the sequence's ``score`` (B,)
    at its last response token. Returns ``(rewards, kl)``, both (B, T), 0 outside ``mask``."""
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m
    rewards = -kl_coef * kl
    last = (m.cumsum(-1) == m.sum(-1, keepdim=True)) & mask.bool()  # the last masked position of each row
    rewards = rewards + last.to(rewards.dtype) * score[:, None]
    return rewards, kl


class AdaptiveKLController:
    """Ziegler et al. (2019): move ``kl_coef`` so the measured KL tracks ``target``.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``kl_coef <- kl_coef * (1 + e * n_steps / horizon)``.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int = 10_000):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


class FixedKLController:
    """A constant ``kl_coef`` (same interface as :class:`AdaptiveKLController`)."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


# ------------------------------------------------------------------------------ exact KL, baselines (week 1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the softmax; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def exact_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(pi || pi_ref) = sum_a pi(a) (log pi(a) - log pi_ref(a))`` of each next-token distribution.

    (..., V), (..., V) -> (...). A language model gives the whole distribution at every position, so the KL that
    :func:`kl_estimators` estimates from one sampled token can also be computed exactly (the reference to judge
    the estimators against).
    """
    logp = torch.log_softmax(_upcast(logits), -1)
    ref_logp = torch.log_softmax(_upcast(ref_logits), -1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def kl_estimator_moments(logits: torch.Tensor, ref_logits: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact mean and variance of the per-token estimators k1, k2, k3 when the token is sampled from ``pi``.

    For each position, ``E[k] = sum_a pi(a) k(a)`` and ``Var[k] = sum_a pi(a) k(a)^2 - E[k]^2``, where ``k(a)`` is
    the estimator evaluated at token ``a`` (:func:`kl_estimators`). (..., V), (..., V) -> {name: (mean, var)}, each
    (...). ``mean - exact_kl`` is an estimator's bias: 0 for k1 and k3, not for k2.
    """
    logp = torch.log_softmax(_upcast(logits), -1)
    ref_logp = torch.log_softmax(_upcast(ref_logits), -1)
    probs = logp.exp()
    out = {}
    for name, k in kl_estimators(logp, ref_logp).items():  # each (..., V): the estimator at every token
        mean = (probs * k).sum(-1)
        var = ((probs * (k - mean[..., None]) ** 2).sum(-1)).clamp(min=0)
        out[name] = (mean, var)
    return out


def leave_one_out_baseline(scores: torch.Tensor) -> torch.Tensor:
    """The baseline for each sample: the mean score of the *other* samples of the batch (B,) -> (B,).

    Unlike the batch mean, it does not depend on the sample's own score, so ``E[(R_i - b_i) grad log pi_i]`` stays
    the policy gradient exactly (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free").
    """
    n = scores.shape[0]
    if n < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples in the batch")
    return (scores.sum() - scores) / (n - 1)
