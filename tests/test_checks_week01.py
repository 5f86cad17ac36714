"""Both directions for the week 1 checks: the references pass; a stub and typical mistakes, written the way a
student would write them, fail with the mistake named."""


import pytest
import torch

from helpers import ppo, trpo
from check_harness import both_directions, run_quiet
from helpers.checks import CheckError, week01
from helpers.lm import masked_mean


# ------------------------------------------------------------------------------------------------- GAE
def gae_student(rewards, values, mask, gamma, lam, *, mask_next=True, mask_running=True, lam_only=False,
                forwards=False, returns_adv=False, f32=False):
    """A student's GAE loop with switches for the typical mistakes."""
    m = mask.float() if not f32 else mask.to(torch.float32)
    B, T = rewards.shape
    adv = torch.zeros(B, T) if f32 else torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=adv.dtype)
    next_v = torch.zeros(B, dtype=adv.dtype)
    order = range(T) if forwards else reversed(range(T))
    for t in order:
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = delta + (lam if lam_only else gamma * lam) * running
        if mask_running:
            running = running * m[:, t]
        adv[:, t] = running
        next_v = values[:, t] * m[:, t] if mask_next else values[:, t]
    adv = adv * m
    ret = adv if returns_adv else (adv + values) * m
    return adv, ret


def gae_vectorised_no_mask(rewards, values, mask, gamma, lam):
    """Ignores the mask entirely."""
    B, T = rewards.shape
    nxt = torch.cat([values[:, 1:], torch.zeros(B, 1, dtype=values.dtype)], 1)
    delta = rewards + gamma * nxt - values
    adv = torch.zeros_like(rewards)
    running = torch.zeros(B, dtype=rewards.dtype)
    for t in reversed(range(T)):
        running = delta[:, t] + gamma * lam * running
        adv[:, t] = running
    return adv, adv + values


def gae_sign(rewards, values, mask, gamma, lam):
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    return -adv, (values - adv) * mask.float()


def gae_returns_unmasked(rewards, values, mask, gamma, lam):
    adv, _ = ppo.gae(rewards, values, mask, gamma, lam)
    return adv, adv + values


# -------------------------------------------------------------------------------------------- PPO loss
def ppo_student(logprobs, old_logprobs, advantages, mask, clip_coef, *, use_max=False, flip=False, plain_mean=False,
                no_clip=False, exp_ratio=False, detach=False):
    if exp_ratio:
        ratio = logprobs.exp() / old_logprobs.exp()
    else:
        ratio = torch.exp(logprobs - old_logprobs)
    if detach:
        ratio = ratio.detach()
    surr1 = ratio * advantages
    surr2 = torch.clamp(ratio, 1 - clip_coef, 1 + clip_coef) * advantages
    obj = surr1 if no_clip else (torch.max(surr1, surr2) if use_max else torch.min(surr1, surr2))
    mean = obj.mean() if plain_mean else (obj * mask).sum() / mask.sum()
    return mean if flip else -mean


def ppo_reference(logprobs, old_logprobs, advantages, mask, clip_coef):
    return ppo.ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_coef)[0]


def ppo_per_sequence(logprobs, old_logprobs, advantages, mask, clip_coef):
    ratio = torch.exp(logprobs - old_logprobs)
    obj = torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)
    per_seq = (obj * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return -per_seq[mask.sum(-1) > 0].mean()


def ppo_item(logprobs, old_logprobs, advantages, mask, clip_coef):
    return torch.tensor(ppo_reference(logprobs, old_logprobs, advantages, mask, clip_coef).item())


# ---------------------------------------------------------------------------------- conjugate gradient
def cg_student(Avp, b, n_iters, *, residual_plus=False, steepest=False, no_tol=False, double_product=False,
               beta_inverted=False):
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = torch.dot(r, r)
    for _ in range(n_iters):
        if not no_tol and rr < 1e-10:
            break
        Ap = Avp(p)
        alpha = rr / torch.dot(p, Avp(p) if double_product else Ap)
        x = x + alpha * p
        r = r + alpha * Ap if residual_plus else r - alpha * Ap
        rr_new = torch.dot(r, r)
        beta = rr / rr_new if beta_inverted else rr_new / rr
        p = r if steepest else r + beta * p
        rr = rr_new
    return x


# ---------------------------------------------------------------------------------------- KL estimators
def kl_student(logprobs, ref_logprobs, *, flip=False, no_half=False, ratio_wrong_way=False, exp_minus_one=False,
               mean=False):
    log_r = ref_logprobs - logprobs
    if flip:
        log_r = -log_r
    k1 = -log_r
    k2 = log_r**2 if no_half else 0.5 * log_r**2
    lr3 = (logprobs - ref_logprobs) if ratio_wrong_way else log_r
    k3 = (torch.exp(lr3) - 1 - lr3) if exp_minus_one else (torch.expm1(lr3) - lr3)
    out = {"k1": k1, "k2": k2, "k3": k3}
    return {k: v.mean() for k, v in out.items()} if mean else out


def kl_tuple(logprobs, ref_logprobs):
    k = ppo.kl_estimators(logprobs, ref_logprobs)
    return k["k1"], k["k2"], k["k3"]


CASES = [
    (week01.check_gae, ppo.gae, [
        (gae_vectorised_no_mask, "not zero outside the mask"),
        (lambda *a: gae_student(*a, mask_next=False, mask_running=False), "done/padding mask is missing"),
        (lambda *a: gae_student(*a, mask_next=False), "bootstraps from the value of the padding"),
        (lambda *a: gae_student(*a, mask_running=False), "running advantage is not reset"),
        (lambda *a: gae_student(*a, lam_only=True), "lam alone"),
        (lambda *a: gae_student(*a, forwards=True), "forwards"),
        (lambda *a: gae_student(*a, returns_adv=True), "advantages + values"),
        (gae_sign, "sign is flipped"),
        (gae_returns_unmasked, "returns are not zero outside the mask"),
        (lambda *a: gae_student(*a, f32=True), "float64"),
    ]),
    (week01.check_ppo_loss, ppo_reference, [
        (lambda *a: ppo_student(*a, use_max=True), "max instead of min"),
        (lambda *a: ppo_student(*a, flip=True), "sign is flipped"),
        (lambda *a: ppo_student(*a, plain_mean=True), "padding"),
        (lambda *a: ppo_student(*a, no_clip=True), "no clipping"),
        (lambda *a: ppo_student(*a, exp_ratio=True), "log-probs ~ -100"),
        (lambda *a: ppo_student(*a, detach=True), "gradient"),
        (ppo_per_sequence, "per sequence"),
        (ppo_item, "no gradient"),
        (lambda lp, old, adv, m, eps: ppo_reference(old, lp, adv, m, eps), "inverted"),
        (lambda lp, old, adv, m, eps: (torch.min(torch.exp(lp - old) * adv, torch.exp(lp - old).clamp(
            1 - eps, 1 + eps) * adv) * m), "scalar"),
    ]),
    (week01.check_conjugate_gradient, trpo.conjugate_gradient, [
        (lambda *a: cg_student(*a, residual_plus=True), "residual update has the wrong sign"),
        (lambda *a: cg_student(*a, steepest=True), "steepest descent"),
        (lambda *a: cg_student(*a, beta_inverted=True), "beta is inverted"),
        (lambda *a: cg_student(*a, double_product=True), "one matrix-vector"),
        (lambda *a: cg_student(*a, no_tol=True), "nan/inf"),
        (lambda Avp, b, n: b.clone(), "wrong values"),
    ]),
    (week01.check_kl_estimators, ppo.kl_estimators, [
        (lambda *a: kl_student(*a, flip=True), "sign is flipped"),
        (lambda *a: kl_student(*a, no_half=True), "1/2 is missing"),
        (lambda *a: kl_student(*a, ratio_wrong_way=True), "upside down"),
        (lambda *a: kl_student(*a, exp_minus_one=True), "expm1"),
        (lambda *a: kl_student(*a, mean=True), "single number"),
        (kl_tuple, "dict"),
    ]),
]


test_reference_passes, test_stub_says_not_implemented, test_planted_mistake_is_named = both_directions(CASES)


@pytest.mark.parametrize("check,reference", [(c, r) for c, r, _ in CASES], ids=lambda x: getattr(x, "__name__", ""))
def test_reference_passes_on_many_seeds(check, reference, monkeypatch):
    """The checks draw fresh inputs every run: the reference must pass whatever they draw."""
    seeds = iter(range(1000, 1020))
    monkeypatch.setattr(week01, "fresh_seed", lambda: next(seeds))
    for _ in range(20):
        run_quiet(check, reference)


@pytest.mark.parametrize("check,wrong,hint", [(c, w, h) for c, _, ms in CASES for w, h in ms[:3]],
                         ids=lambda x: x if isinstance(x, str) else getattr(x, "__name__", ""))
def test_planted_mistakes_are_named_on_many_seeds(check, wrong, hint, monkeypatch):
    seeds = iter(range(2000, 2010))
    monkeypatch.setattr(week01, "fresh_seed", lambda: next(seeds))
    for _ in range(10):
        with pytest.raises(CheckError, match=hint):
            run_quiet(check, wrong)


def test_equivalent_student_solutions_pass():
    """Correct code written differently from the reference passes too."""
    def gae_vectorised_mask(rewards, values, mask, gamma, lam):
        m = mask.to(values.dtype)
        nxt = torch.cat([values[:, 1:] * m[:, 1:], torch.zeros_like(values[:, :1])], 1)
        delta = (rewards + gamma * nxt - values) * m
        adv = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[:, 0])
        for t in range(rewards.shape[1] - 1, -1, -1):
            running = delta[:, t] + gamma * lam * running * m[:, t]
            adv[:, t] = running
        return adv * m, (adv + values) * m

    def ppo_where(logprobs, old_logprobs, advantages, mask, clip_coef):
        ratio = (logprobs - old_logprobs).exp()
        loss = -torch.min(ratio * advantages, ratio.clamp(1 - clip_coef, 1 + clip_coef) * advantages)
        return masked_mean(loss, mask)

    def kl_plain(logprobs, ref_logprobs):
        lr = ref_logprobs - logprobs
        return {"k1": logprobs - ref_logprobs, "k2": lr.pow(2) / 2, "k3": lr.expm1() - lr}

    def cg_initial_residual(Avp, b, n_iters, tol=1e-10):
        x = torch.zeros_like(b)
        r = b - Avp(x)  # one extra product for the initial residual is allowed
        p = r.clone()
        for _ in range(n_iters):
            rr = r @ r
            if rr < tol:
                break
            Ap = Avp(p)
            alpha = rr / (p @ Ap)
            x += alpha * p
            r -= alpha * Ap
            p = r + (r @ r) / rr * p
        return x

    for check, fn in ((week01.check_gae, gae_vectorised_mask), (week01.check_ppo_loss, ppo_where),
                      (week01.check_kl_estimators, kl_plain),
                      (week01.check_conjugate_gradient, cg_initial_residual)):
        assert "PASS" in run_quiet(check, fn)


def test_failure_message_names_the_seed():
    with pytest.raises(CheckError, match=r"seed \d+"):
        run_quiet(week01.check_gae, lambda *a: gae_student(*a, lam_only=True))
