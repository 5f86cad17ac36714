"""PPO building blocks: hand-worked cases, naive references, invariants."""

import math

import pytest
import torch

from helpers import ppo


def naive_gae(rewards, values, gamma, lam):
    """One sequence, no mask: the textbook double loop."""
    T = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < T else 0.0) - values[t] for t in range(T)]
    return [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, T)) for t in range(T)]


def test_gae_hand_worked():
    # Two steps, gamma = lam = 1: A_1 = r_1 - V_1 = 1 - 0.5; A_0 = r_0 + V_1 - V_0 + A_1... = 0 + 1 - 0 = 1.
    adv, ret = ppo.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0, 0.5]]), torch.ones(1, 2), 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 0.5]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0]]))


def test_gae_matches_naive_and_respects_the_mask():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    mask = torch.zeros(3, 8)
    spans = [(2, 8), (1, 5), (3, 4)]  # prompt before, padding after
    for i, (a, b) in enumerate(spans):
        mask[i, a:b] = 1
    adv, _ = ppo.gae(r, v, mask, gamma=0.9, lam=0.8)
    for i, (a, b) in enumerate(spans):
        expected = naive_gae(r[i, a:b].tolist(), v[i, a:b].tolist(), 0.9, 0.8)
        torch.testing.assert_close(adv[i, a:b], torch.tensor(expected))
        assert (adv[i, :a] == 0).all() and (adv[i, b:] == 0).all()


def test_gae_with_lambda_one_is_return_minus_value():
    g = torch.Generator().manual_seed(1)
    r, v, m = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g), torch.ones(2, 6)
    adv, _ = ppo.gae(r, v, m, gamma=0.97, lam=1.0)
    torch.testing.assert_close(adv, ppo.discounted_returns(r, m, 0.97) - v)


def test_kl_estimators_hand_worked_and_unbiased():
    lp, ref = torch.tensor([0.0]), torch.tensor([-1.0])  # log r = -1
    k = ppo.kl_estimators(lp, ref)
    torch.testing.assert_close(k["k1"], torch.tensor([1.0]))
    torch.testing.assert_close(k["k2"], torch.tensor([0.5]))
    torch.testing.assert_close(k["k3"], torch.tensor([math.exp(-1.0)]))  # (e^-1 - 1) + 1
    # Sampled from p, k1 and k3 average to KL(p || q); k2 and k3 are never negative.
    p = torch.distributions.Normal(0.0, 1.0)
    q = torch.distributions.Normal(0.1, 1.0)  # close to p, as in RLHF
    x = p.sample(torch.Size([200_000]))
    est = ppo.kl_estimators(p.log_prob(x), q.log_prob(x))
    true = torch.distributions.kl_divergence(p, q)
    assert abs(est["k1"].mean() - true) < 0.01 and abs(est["k3"].mean() - true) < 0.01
    assert (est["k2"] >= 0).all() and (est["k3"] >= 0).all()
    assert est["k3"].var() < est["k1"].var()


def test_ppo_loss_is_policy_gradient_at_ratio_one():
    g = torch.Generator().manual_seed(2)
    lp = torch.randn(2, 5, generator=g).requires_grad_()
    adv, mask = torch.randn(2, 5, generator=g), torch.ones(2, 5)
    loss, stats = ppo.ppo_policy_loss(lp, lp.detach(), adv, mask)
    assert stats["clipfrac"] == 0.0 and abs(stats["approx_kl"]) < 1e-7  # ratio 1: clipping is a no-op
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, -adv / 10)  # d/dlp of -mean(ratio * A) at ratio 1


def test_ppo_loss_clips_hand_worked():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.5, 0.5]]))  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = ppo.ppo_policy_loss(new, old, adv, torch.ones(1, 2), clip_coef=0.2)
    # token 1: min(1.5, 1.2) * 1 = 1.2; token 2: min(-0.5, -0.8) = -0.8; loss = -(1.2 - 0.8) / 2
    assert loss.item() == pytest.approx(-0.2)
    assert stats["clipfrac"] == 1.0


def test_masked_losses_ignore_padding():
    lp, adv = torch.tensor([[0.1, 0.2, 99.0]]), torch.tensor([[1.0, 1.0, 99.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, _ = ppo.ppo_policy_loss(lp, lp, adv, mask)
    assert loss.item() == pytest.approx(-1.0)
    v = ppo.ppo_value_loss(torch.tensor([[1.0, 2.0, 50.0]]), torch.tensor([[1.0, 2.0, 0.0]]),
                           torch.tensor([[2.0, 2.0, 0.0]]), mask)
    assert v.item() == pytest.approx(0.5 * 1.0 / 2)


def test_value_loss_clipping_hand_worked():
    # V moved from 0 to 1 towards a return of 1, clip 0.2: clipped V is 0.2, its error 0.64 is the max.
    v = ppo.ppo_value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert v.item() == pytest.approx(0.5 * 0.64)


def test_kl_penalised_rewards_puts_score_on_last_response_token():
    lp, ref = torch.tensor([[0.0, -1.0, -1.0, 0.0]]), torch.tensor([[0.0, -2.0, -1.5, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    rewards, kl = ppo.kl_penalised_rewards(torch.tensor([3.0]), lp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.0, 1.0, 0.5, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.1, 3.0 - 0.05, 0.0]]))


def test_whiten_masked():
    x, mask = torch.tensor([[1.0, 3.0, 1000.0]]), torch.tensor([[1, 1, 0]])
    w = ppo.whiten(x, mask)
    torch.testing.assert_close(w, torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-4, rtol=0)


def test_adaptive_kl_controller_moves_toward_target():
    c = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert c.update(12.0, 10) == pytest.approx(0.1 * 1.02)  # KL too high: error clipped at 0.2
    c = ppo.AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert c.update(3.0, 10) == pytest.approx(0.1 * (1 - 0.02))
    assert ppo.FixedKLController(0.3).update(100.0, 10) == 0.3
