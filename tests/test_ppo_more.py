"""Week 1 additions to helpers.ppo: exact KL, the exact moments of k1/k2/k3, the leave-one-out baseline."""

import math

import pytest
import torch

from helpers import ppo


def test_exact_kl_hand_worked():
    logits = torch.log(torch.tensor([0.5, 0.5]))
    ref = torch.log(torch.tensor([0.25, 0.75]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert ppo.exact_kl(logits, ref).item() == pytest.approx(expected, rel=1e-6)


def test_exact_kl_matches_torch_distributions_and_is_shift_invariant():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 4, 9, generator=g) * 2, torch.randn(3, 4, 9, generator=g) * 2
    naive = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=a),
                                              torch.distributions.Categorical(logits=b))
    torch.testing.assert_close(ppo.exact_kl(a, b), naive)
    torch.testing.assert_close(ppo.exact_kl(a + 5.0, b - 3.0), naive)  # logits are defined up to a constant
    assert (ppo.exact_kl(a, b) >= 0).all() and ppo.exact_kl(a, a).abs().max() < 1e-6


def test_kl_estimator_moments_hand_worked():
    # pi = (1/2, 1/2), ref = (1/4, 3/4): log r = ref - pi = (log 1/2, log 3/2)
    lr = torch.tensor([math.log(0.5), math.log(1.5)])
    m = ppo.kl_estimator_moments(torch.log(torch.tensor([0.5, 0.5])), torch.log(torch.tensor([0.25, 0.75])))
    k1 = -lr
    assert m["k1"][0].item() == pytest.approx(k1.mean().item(), rel=1e-6)
    assert m["k1"][1].item() == pytest.approx(k1.var(unbiased=False).item(), rel=1e-5)
    k2 = 0.5 * lr**2
    assert m["k2"][0].item() == pytest.approx(k2.mean().item(), rel=1e-6)
    k3 = (lr.exp() - 1) - lr
    assert m["k3"][0].item() == pytest.approx(k3.mean().item(), rel=1e-6)


def test_kl_estimator_moments_match_sampling():
    g = torch.Generator().manual_seed(1)
    logits, ref = torch.randn(6, generator=g), torch.randn(6, generator=g) * 0.5
    m = ppo.kl_estimator_moments(logits, ref)
    idx = torch.multinomial(logits.softmax(-1), 400_000, replacement=True, generator=g)
    lp, rlp = logits.log_softmax(-1)[idx], ref.log_softmax(-1)[idx]
    for name, k in ppo.kl_estimators(lp, rlp).items():
        assert k.mean().item() == pytest.approx(m[name][0].item(), abs=4 * (m[name][1].item() / 400_000) ** 0.5)
        assert k.var().item() == pytest.approx(m[name][1].item(), rel=0.03)


def test_k1_and_k3_are_unbiased_k2_is_not_and_k3_has_lower_variance_nearby():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 30, generator=g)
    ref = logits + 0.3 * torch.randn(50, 30, generator=g)  # close, as a policy to its reference
    m, kl = ppo.kl_estimator_moments(logits, ref), ppo.exact_kl(logits, ref)
    torch.testing.assert_close(m["k1"][0], kl, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m["k3"][0], kl, atol=1e-5, rtol=1e-4)
    assert (m["k2"][0] - kl).abs().mean() > 1e-4  # biased
    assert (m["k3"][1] < m["k1"][1]).all()


def test_leave_one_out_baseline_hand_worked_and_naive():
    torch.testing.assert_close(ppo.leave_one_out_baseline(torch.tensor([1.0, 2.0, 3.0])),
                               torch.tensor([2.5, 2.0, 1.5]))
    x = torch.randn(7, generator=torch.Generator().manual_seed(3))
    naive = torch.stack([torch.cat([x[:i], x[i + 1:]]).mean() for i in range(7)])
    torch.testing.assert_close(ppo.leave_one_out_baseline(x), naive)


def test_leave_one_out_baseline_ignores_own_score():
    x = torch.randn(5, generator=torch.Generator().manual_seed(4))
    y = x.clone()
    y[2] += 10.0
    b_x, b_y = ppo.leave_one_out_baseline(x), ppo.leave_one_out_baseline(y)
    assert b_x[2].item() == pytest.approx(b_y[2].item(), abs=1e-6)  # own score changed, own baseline did not
    torch.testing.assert_close(b_x.mean(), x.mean())
    with pytest.raises(ValueError, match="at least 2"):
        ppo.leave_one_out_baseline(torch.ones(1))
