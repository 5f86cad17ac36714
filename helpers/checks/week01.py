"""Checks for week 1: GAE with masks, PPO's clipped loss, conjugate gradient, and the KL estimators k1, k2, k3.

The references are :func:`helpers.ppo.gae`, :func:`helpers.ppo.ppo_policy_loss`, :func:`helpers.trpo.conjugate_gradient`
and :func:`helpers.ppo.kl_estimators`. Each check tries the student's function on fresh random inputs shaped like a
batch of text (prompt positions and right padding outside the mask, with garbage values there, as real batches
have), compares it with the typical mistakes written out below, and ends with a numerical-stability case.
"""

from __future__ import annotations

import math

import torch

from .. import ppo, trpo
from ..lm import masked_mean
from . import CheckError, check, close, diagnose, expect_tensor, fresh_seed, run_student

# ------------------------------------------------------------------------------------------------------- GAE


def _text_mask(g: torch.Generator, B: int, T: int) -> torch.Tensor:
    """(B, T) float mask: 1 on a response span after a prompt, then right padding. Row 0 ends at the last column,
    row 1 is padded on the right, and one row (if B > 3) is an empty response."""
    mask = torch.zeros(B, T)
    for i in range(B):
        start = int(torch.randint(1, max(2, T // 3), (1,), generator=g))
        end = T if i == 0 else int(torch.randint(start + 1, T, (1,), generator=g))
        mask[i, start:end] = 1
    if B > 3:
        mask[B - 1] = 0
    return mask


def _gae_case(seed: int, B: int = 5, T: int = 12, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = _text_mask(g, B, T).to(dtype)
    # Garbage outside the mask (what a batch holds at prompt and padding positions): a correct GAE ignores it.
    rewards = torch.randn(B, T, generator=g, dtype=dtype)
    values = torch.randn(B, T, generator=g, dtype=dtype)
    return rewards, values, mask


def _gae_unmasked_recursion(rewards, values, mask, gamma, lam, *, cut_values=False, cut_advantages=False,
                            lam_only=False, no_gamma_in_delta=False):
    """GAE with the episode boundary handled wrongly in one of several ways (outputs multiplied by the mask)."""
    m = mask.to(values.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    next_value = torch.zeros(B, dtype=values.dtype)
    for t in reversed(range(T)):
        nv = next_value if no_gamma_in_delta else gamma * next_value
        delta = rewards[:, t] + nv - values[:, t]
        last = delta + (lam if lam_only else gamma * lam) * last
        if cut_advantages:
            last = last * m[:, t]
        adv[:, t] = last
        next_value = values[:, t] * m[:, t] if cut_values else values[:, t]
    return adv * m


def _gae_forward(rewards, values, mask, gamma, lam):
    m = mask.to(values.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    for t in range(T):
        nv = values[:, t + 1] * m[:, t + 1] if t + 1 < T else torch.zeros(B, dtype=values.dtype)
        delta = rewards[:, t] + gamma * nv - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv


def _gae_mistakes(r, v, m, gamma, lam, expected_adv):
    """Advantages the typical mistakes produce on these inputs."""
    mistakes = {
        "advantages are not zero outside the mask (prompt and padding positions): multiply by the mask, and "
        "cut the recursion where it is 0.": _gae_unmasked_recursion(r, v, torch.ones_like(m), gamma, lam),
        "the done/padding mask is missing inside the recursion: the last response token bootstraps from the value "
        "(and inherits the advantage) of the padding after it. After the episode ends V = 0 and A = 0: zero "
        "next_value and the running advantage where mask is 0.": _gae_unmasked_recursion(r, v, m, gamma, lam),
        "the running advantage is not reset where the mask is 0: garbage rewards at padding positions flow into "
        "the last response token. Multiply the running advantage by the mask at every step.":
            _gae_unmasked_recursion(r, v, m, gamma, lam, cut_values=True),
        "the last response token bootstraps from the value of the padding position after it: the value after the "
        "episode ends must be 0 (multiply next_value by the mask, the done mask).":
            _gae_unmasked_recursion(r, v, m, gamma, lam, cut_advantages=True),
        "the recursion uses lam alone: A_t = delta_t + gamma * lam * A_{t+1}.":
            ppo_gae_variant(r, v, m, gamma, lam, lam_only=True),
        "delta is missing gamma: delta_t = r_t + gamma * V_{t+1} - V_t.":
            ppo_gae_variant(r, v, m, gamma, lam, no_gamma_in_delta=True),
        "the sign is flipped: delta_t = r_t + gamma * V_{t+1} - V_t (reward plus next value minus this value).":
            -expected_adv,
        "the recursion runs forwards in time: A_t depends on A_{t+1}, so loop over t from the end backwards.":
            _gae_forward(r, v, m, gamma, lam),
    }
    return mistakes


def ppo_gae_variant(rewards, values, mask, gamma, lam, *, lam_only=False, no_gamma_in_delta=False):
    """The reference recursion (masks right) with one formula wrong."""
    m = mask.to(values.dtype)
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype)
    next_value = torch.zeros(B, dtype=values.dtype)
    for t in reversed(range(T)):
        delta = rewards[:, t] + (1.0 if no_gamma_in_delta else gamma) * next_value - values[:, t]
        last = (delta + (lam if lam_only else gamma * lam) * last) * m[:, t]
        adv[:, t] = last
        next_value = values[:, t] * m[:, t]
    return adv


def _gae_credit_probe(fn) -> None:
    """A reward only at the last response token and V = 0: GAE must pass credit back to every earlier token,
    ``A_t = (gamma lam)^(end - t) r_end``. A loop that runs forwards in time leaves the earlier tokens at 0."""
    mask = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])
    rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]])
    got = run_student(fn, rewards, torch.zeros_like(rewards), mask, 1.0, 0.5, name="gae")
    if isinstance(got, (tuple, list)) and isinstance(got[0], torch.Tensor) and got[0].shape == rewards.shape:
        early = got[0][0, 2:5]
        if torch.allclose(early, torch.zeros(3), atol=1e-6) and abs(float(got[0][0, 5]) - 1.0) < 1e-6:
            raise CheckError("gae: a reward at the last token gives no advantage to the tokens before it: the "
                             "recursion runs forwards in time. A_t depends on A_{t+1}, so loop over t from the end "
                             "backwards.")


def _unpack_gae(got, shape, label):
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise CheckError(f"{label} should return a tuple (advantages, returns), got {type(got).__name__}.")
    adv = expect_tensor(got[0], shape, f"{label}: advantages")
    ret = expect_tensor(got[1], shape, f"{label}: returns")
    return adv, ret


@check
def check_gae(fn) -> str:
    """``fn(rewards (B,T), values (B,T), mask (B,T), gamma, lam) -> (advantages, returns)``, both (B,T), 0 outside
    the mask; ``returns = advantages + values`` on the mask."""
    seed = fresh_seed()
    for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (0.99, 1.0)):
        r, v, m = _gae_case(seed)
        adv, ret = _unpack_gae(run_student(fn, r.clone(), v.clone(), m.clone(), gamma, lam, name="gae"),
                               r.shape, "gae")
        exp_adv, exp_ret = ppo.gae(r, v, m, gamma, lam)
        label = f"gae(gamma={gamma}, lam={lam}): advantages"
        try:
            diagnose(adv, exp_adv, _gae_mistakes(r, v, m, gamma, lam, exp_adv), label=label, seed=seed)
        except CheckError as e:
            if "wrong values" in str(e):
                _gae_credit_probe(fn)
            raise
        ret_mistakes = {
            "returns should be advantages + values (the value target), not the advantages alone.": exp_adv,
            "returns are not zero outside the mask: multiply (advantages + values) by the mask.": exp_adv + v,
            "returns look like the discounted reward-to-go; here they are advantages + values (the lambda-return).":
                ppo.discounted_returns(r, m, gamma),
        }
        diagnose(ret, exp_ret, ret_mistakes, label=f"gae(gamma={gamma}, lam={lam}): returns", seed=seed)
    # A boolean mask, as tokenizers and generate() give.
    r, v, m = _gae_case(seed + 1)
    adv, _ = _unpack_gae(run_student(fn, r.clone(), v.clone(), m.bool(), 0.95, 0.9, name="gae"), r.shape, "gae")
    diagnose(adv, ppo.gae(r, v, m, 0.95, 0.9)[0], {}, label="gae with a boolean mask", seed=seed)
    # Precision: a long response in float64 with large values; float32 buffers would lose digits.
    r, v, m = _gae_case(seed + 2, B=3, T=300, dtype=torch.float64)
    v = v * 1e4
    adv, ret = _unpack_gae(run_student(fn, r.clone(), v.clone(), m.clone(), 1.0, 1.0, name="gae"), r.shape, "gae")
    if adv.dtype != torch.float64:
        raise CheckError(f"gae returns {adv.dtype} advantages for float64 inputs: create buffers with "
                         "torch.zeros_like(rewards) so they keep the inputs' dtype (float32 loses digits here).")
    diagnose(adv, ppo.gae(r, v, m, 1.0, 1.0)[0], {}, label="gae on a 300-token float64 batch (values ~1e4)",
             seed=seed, atol=1e-8)
    return "matches the reference with prompt/padding masks, three (gamma, lam), bool masks and float64"


# ------------------------------------------------------------------------------------------------ PPO loss


def _ppo_case(seed: int, B: int = 5, T: int = 10, spread: float = 0.4, offset: float = 0.0):
    g = torch.Generator().manual_seed(seed)
    mask = _text_mask(g, B, T)
    old = -torch.rand(B, T, generator=g) * 4 - offset
    logprobs = old + torch.randn(B, T, generator=g) * spread  # ratios on both sides of [1 - eps, 1 + eps]
    adv = torch.randn(B, T, generator=g)
    # Padding positions hold garbage advantages and log-probs: a masked mean must ignore them.
    pad = mask == 0
    adv = torch.where(pad, adv * 3 + 1, adv)
    logprobs = torch.where(pad, logprobs + 1.0, logprobs)
    return logprobs, old, adv, mask


def _ppo_mistakes(lp, old, adv, mask, eps, expected):
    ratio = torch.exp(lp - old)
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps)
    obj_min = torch.min(ratio * adv, clipped * adv)
    obj_max = torch.max(ratio * adv, clipped * adv)
    m = mask.float()
    per_seq = (obj_min * m).sum(-1) / m.sum(-1).clamp(min=1)
    has = m.sum(-1) > 0
    return {
        "max instead of min: PPO takes the *smaller* (pessimistic) of the clipped and unclipped objectives, "
        "i.e. the larger of the two *losses*.": -masked_mean(obj_max, mask),
        "the sign is flipped: return the loss to minimise, -mean(min(ratio * A, clip(ratio) * A)).": -expected,
        "the mean runs over padding and prompt positions too: average over masked tokens only "
        "(sum(x * mask) / sum(mask)).": -obj_min.mean(),
        "the objective is averaged per sequence, then over sequences: average over all masked tokens of the batch "
        "(one token-level mean).": -per_seq[has].mean(),
        "the sum over tokens is returned; take the mean over masked tokens.": -(obj_min * m).sum(),
        "no clipping: the loss is -mean(ratio * A); add the clipped term and take the min.":
            -masked_mean(ratio * adv, mask),
        "the advantage is clipped instead of the ratio: clip(ratio, 1 - eps, 1 + eps) * A.":
            -masked_mean(torch.min(ratio * adv, ratio * adv.clamp(-eps, eps)), mask),
        "the ratio is inverted: ratio = exp(logprobs - old_logprobs), new over old.":
            ppo.ppo_policy_loss(old, lp, adv, mask, eps)[0],
        "the ratio is the log-ratio: exponentiate, ratio = exp(logprobs - old_logprobs).":
            -masked_mean(torch.min((lp - old) * adv, (lp - old).clamp(1 - eps, 1 + eps) * adv), mask),
        "the ratio is clipped to [-eps, eps] instead of [1 - eps, 1 + eps].":
            -masked_mean(torch.min(ratio * adv, ratio.clamp(-eps, eps) * adv), mask),
    }


@check
def check_ppo_loss(fn) -> str:
    """``fn(logprobs (B,T), old_logprobs (B,T), advantages (B,T), mask (B,T), clip_coef) -> scalar loss``."""
    seed = fresh_seed()
    for eps in (0.2, 0.1):
        lp, old, adv, mask = _ppo_case(seed)
        lp_var = lp.clone().requires_grad_(True)
        got = run_student(fn, lp_var, old.clone(), adv.clone(), mask.clone(), eps, name="ppo_loss")
        if not isinstance(got, torch.Tensor):
            raise CheckError(f"ppo_loss should return a scalar torch.Tensor (to call .backward() on), got "
                             f"{type(got).__name__}.")
        if got.numel() != 1:
            raise CheckError(f"ppo_loss should return a scalar (one number for the batch), got shape "
                             f"{tuple(got.shape)}: average over the masked tokens.")
        got = got.reshape(())
        expected = ppo.ppo_policy_loss(lp, old, adv, mask, eps)[0]
        diagnose(got, expected, _ppo_mistakes(lp, old, adv, mask, eps, expected),
                 label=f"ppo_loss(clip_coef={eps})", seed=seed)
        if got.grad_fn is None:
            raise CheckError("ppo_loss has no gradient: it was detached from logprobs (avoid .item(), .detach(), "
                             "torch.tensor(...) and Python floats inside the loss).")
        (grad,) = torch.autograd.grad(got, lp_var)
        lp_ref = lp.clone().requires_grad_(True)
        (grad_ref,) = torch.autograd.grad(ppo.ppo_policy_loss(lp_ref, old, adv, mask, eps)[0], lp_ref)
        if not close(grad, grad_ref, atol=1e-6):
            raise CheckError("ppo_loss has the right value but the wrong gradient: old_logprobs and the clipped "
                             f"ratio must not be detached differently from the reference (seed {seed}).")
    # At ratio 1 clipping is a no-op: the loss is -mean(A) over the mask.
    lp, _, adv, mask = _ppo_case(seed + 1)
    got = run_student(fn, lp.clone(), lp.clone(), adv.clone(), mask.clone(), 0.2, name="ppo_loss")
    diagnose(torch.as_tensor(got).reshape(()), -masked_mean(adv, mask), {}, label="ppo_loss at ratio 1", seed=seed)
    # Stability: rare tokens have log-probs near -100, where exp() underflows to 0 in float32.
    lp, old, adv, mask = _ppo_case(seed + 2, spread=2.0, offset=100.0)
    got = run_student(fn, lp.clone(), old.clone(), adv.clone(), mask.clone(), 0.2, name="ppo_loss")
    got = torch.as_tensor(got).reshape(())
    if not torch.isfinite(got):
        raise CheckError("ppo_loss is inf/nan for rare tokens (log-probs ~ -100, where exp() underflows to 0): "
                         "compute the ratio as exp(logprobs - old_logprobs), not exp(logprobs) / exp(old_logprobs).")
    expected = ppo.ppo_policy_loss(lp, old, adv, mask, 0.2)[0]
    if not math.isclose(got.item(), expected.item(), rel_tol=1e-4, abs_tol=1e-5):
        raise CheckError(f"ppo_loss for rare tokens (log-probs ~ -100): got {got.item():.6g}, expected "
                         f"{expected.item():.6g} (seed {seed}).")
    return "value and gradient match, padding ignored, min not max, stable for log-probs ~ -100"


# -------------------------------------------------------------------------------------- conjugate gradient


def _spd(seed: int, n: int, cond: float = 20.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T


def _cg_variant(Avp, b, n_iters, *, residual_plus=False, beta_inverted=False, steepest=False, alpha_no_A=False,
                x_minus=False, Ar=False):
    """Conjugate gradient with one typical mistake."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    for _ in range(n_iters):
        if rr < 1e-20:
            break
        Ap = Avp(r if Ar else p)
        alpha = rr / (p @ p) if alpha_no_A else rr / (p @ Ap)
        x = x - alpha * p if x_minus else x + alpha * p
        r = r + alpha * Ap if residual_plus else r - alpha * Ap
        rr_new = r @ r
        if steepest:
            p = r.clone()
        else:
            p = r + ((rr / rr_new) if beta_inverted else (rr_new / rr)) * p
        rr = rr_new
    return x


class _Counted:
    """``v -> A v`` that counts its calls and refuses anything but a vector of the right size."""

    def __init__(self, A: torch.Tensor):
        self.A, self.calls = A, 0

    def __call__(self, v):
        self.calls += 1
        if not isinstance(v, torch.Tensor) or v.shape != (self.A.shape[0],):
            raise CheckError(f"Avp was called with {getattr(v, 'shape', type(v).__name__)}; it takes a vector of "
                             f"shape ({self.A.shape[0]},), like b.")
        return self.A @ v


def _run_cg(fn, A, b, n_iters):
    Avp = _Counted(A)
    got = run_student(fn, Avp, b.clone(), n_iters, name="conjugate_gradient")
    got = expect_tensor(got, tuple(b.shape), "conjugate_gradient")
    return got, Avp.calls


@check
def check_conjugate_gradient(fn) -> str:
    """``fn(Avp, b, n_iters) -> x`` with ``A x ~ b``; ``A`` symmetric positive definite, seen only via ``Avp``."""
    seed = fresh_seed()
    n = 8
    A = _spd(seed, n)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    # After 3 iterations CG's iterate is unique (from x = 0): compare it with the typical mistakes.
    got, calls = _run_cg(fn, A, b, 3)
    if calls > 4:
        raise CheckError(f"conjugate_gradient called Avp {calls} times in 3 iterations: CG needs one matrix-vector "
                         "product per iteration (reuse Ap for both the step size and the residual update).")
    Avp = lambda v: A @ v  # noqa: E731
    expected = trpo.conjugate_gradient(Avp, b, 3)
    mistakes = {
        "the residual update has the wrong sign: r <- r - alpha * A p (the residual is b - A x).":
            _cg_variant(Avp, b, 3, residual_plus=True),
        "beta is inverted: beta = (r_new . r_new) / (r . r).": _cg_variant(Avp, b, 3, beta_inverted=True),
        "the search direction is just the residual (steepest descent): p <- r_new + beta * p keeps the directions "
        "A-conjugate.": _cg_variant(Avp, b, 3, steepest=True),
        "the step size ignores A: alpha = (r . r) / (p . A p).": _cg_variant(Avp, b, 3, alpha_no_A=True),
        "x moves the wrong way: x <- x + alpha * p.": _cg_variant(Avp, b, 3, x_minus=True),
        "A is applied to the residual instead of the search direction: compute A p.":
            _cg_variant(Avp, b, 3, Ar=True),
    }
    diagnose(got, expected, mistakes, label="conjugate_gradient after 3 iterations", seed=seed, atol=1e-6)
    # n iterations solve an n-dimensional system.
    got, _ = _run_cg(fn, A, b, n)
    solution = torch.linalg.solve(A, b)
    if not close(got, solution, atol=1e-6, rtol=1e-5):
        err = (got - solution).norm() / solution.norm()
        raise CheckError(f"after n = {n} iterations CG should solve an {n}-dimensional system; relative error "
                         f"{err:.2g} (seed {seed}).")
    # Float32, a Fisher-like (damped, low-rank) matrix, as in TRPO.
    g = torch.Generator().manual_seed(seed + 2)
    J = torch.randn(3, 30, generator=g)
    A32 = J.T @ J / 3 + 0.1 * torch.eye(30)
    b32 = torch.randn(30, generator=g)
    got, _ = _run_cg(fn, A32, b32, 10)
    diagnose(got, trpo.conjugate_gradient(lambda v: A32 @ v, b32, 10), {}, label="conjugate_gradient on a damped "
             "low-rank float32 matrix", seed=seed, atol=1e-4)
    # Stability: b = 0 (a zero policy gradient) and more iterations than dimensions must not divide 0 by 0.
    for label, bb, iters in (("b = 0", torch.zeros(n, dtype=torch.float64), 5),
                             (f"{3 * n} iterations for an {n}-dimensional system", b, 3 * n)):
        got, _ = _run_cg(fn, A, bb, iters)
        if not torch.isfinite(got).all():
            raise CheckError(f"conjugate_gradient returns nan/inf for {label}: once the residual is (near) zero, "
                             "p . A p is 0 too; stop when r . r < tol instead of dividing by it.")
        if not close(got, torch.linalg.solve(A, bb), atol=1e-6, rtol=1e-5):
            raise CheckError(f"conjugate_gradient gives a wrong answer for {label} (seed {seed}).")
    return "iterates match CG exactly, solves in n steps, one Avp per iteration, no 0/0 at convergence"


# ----------------------------------------------------------------------------------------- KL estimators


def _kl_case(seed: int, B: int = 4, T: int = 9, spread: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(B, T, generator=g) * 5
    ref_logprobs = logprobs + torch.randn(B, T, generator=g) * spread
    return logprobs, ref_logprobs


def _kl_mistakes(lp, ref):
    x = ref - lp  # log r, r = pi_ref / pi
    return {
        "k1": {"the sign is flipped: k1 = -log r = log pi - log pi_ref (positive on average when sampling from pi).":
               x},
        "k2": {"the 1/2 is missing: k2 = (log r)^2 / 2.": x**2,
               "k2 squares the ratio, not its log: k2 = (log r)^2 / 2.": 0.5 * torch.exp(x) ** 2},
        "k3": {"the ratio is upside down: r = pi_ref / pi, i.e. log r = ref_logprobs - logprobs. With samples "
               "from pi this is what makes k3 unbiased.": torch.expm1(-x) + x,
               "the sign is flipped: k3 = (r - 1) - log r, which is never negative.": -(torch.expm1(x) - x),
               "r is a ratio of log-probabilities; it is a ratio of probabilities: r = exp(ref_logprobs - logprobs).":
                   (ref / lp - 1) - torch.log((ref / lp).abs()),
               "k3 = (r - 1) - log r: the log r term is missing or added.": torch.expm1(x)},
    }


@check
def check_kl_estimators(fn) -> str:
    """``fn(logprobs (B,T), ref_logprobs (B,T)) -> {"k1", "k2", "k3"}``, each (B,T): per-token KL(pi || pi_ref)."""
    seed = fresh_seed()
    lp, ref = _kl_case(seed)
    got = run_student(fn, lp.clone(), ref.clone(), name="kl_estimators")
    if not isinstance(got, dict) or not {"k1", "k2", "k3"} <= set(got):
        have = sorted(got) if isinstance(got, dict) else type(got).__name__
        raise CheckError(f"kl_estimators should return a dict with keys 'k1', 'k2', 'k3'; got {have}.")
    expected = ppo.kl_estimators(lp, ref)
    mistakes = _kl_mistakes(lp, ref)
    for name in ("k1", "k2", "k3"):
        if isinstance(got[name], torch.Tensor) and got[name].numel() == 1 and lp.numel() > 1:
            raise CheckError(f"{name} is a single number: return the per-token estimates, shape {tuple(lp.shape)} "
                             "(average them over tokens later, with the mask).")
        value = expect_tensor(got[name], tuple(lp.shape), f"kl_estimators()['{name}']")
        diagnose(value, expected[name], mistakes[name], label=f"kl_estimators: {name}", seed=seed)
    # Stability: tiny log-ratios (a policy close to the reference). exp(x) - 1 rounds to 0 in float32 and k3 goes
    # negative; expm1 does not.
    g = torch.Generator().manual_seed(seed + 1)
    x = (torch.rand(200, generator=g) * 2 - 1) * 10 ** (-2 - 2 * torch.rand(200, generator=g))  # |x| in 1e-4..1e-2
    lp = -torch.rand(200, generator=g) * 3
    got = run_student(fn, lp.clone(), lp + x, name="kl_estimators")
    k3, exp_k3 = got["k3"], ppo.kl_estimators(lp, lp + x)["k3"]
    if (k3 < 0).any():
        raise CheckError("k3 is negative for log-ratios near 0 (|log r| ~ 1e-4): in float32, exp(x) - 1 loses "
                         "the digits that matter. k3 = (r - 1) - log r is never negative; compute it as "
                         "torch.expm1(log_r) - log_r.")
    if not torch.allclose(k3.double(), exp_k3.double(), rtol=2e-2, atol=1e-12):
        raise CheckError("k3 is inaccurate for log-ratios near 0 (|log r| ~ 1e-4): compute (r - 1) with "
                         "torch.expm1(log_r), which keeps the small digits that exp(log_r) - 1 rounds away.")
    return "k1, k2, k3 match per token; k3 stays accurate and >= 0 for tiny log-ratios"
