"""TRPO pieces: conjugate gradient, Fisher-vector products, the line search and the step.

Each function gets a case worked by hand, a naive reference (explicit matrices, torch.linalg.solve,
torch.autograd.functional.hessian) and an invariant (n iterations solve an n-dim system; the Hessian of the KL at
the old parameters is the Fisher; an accepted step never exceeds the KL bound).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers import ppo, trpo


def spd(n, seed=0, cond=50.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ q.T


# ----------------------------------------------------------------------------------------- conjugate gradient
def test_cg_hand_worked_two_by_two():
    A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 2.0], dtype=torch.float64)
    # Iteration 1: p = r = b, A b = (6, 7), alpha = b.b / b.Ab = 5 / 20, x = b / 4.
    torch.testing.assert_close(trpo.conjugate_gradient(lambda v: A @ v, b, 1),
                               torch.tensor([0.25, 0.5], dtype=torch.float64))
    # Two iterations solve the 2-dim system exactly: x = (1/11, 7/11).
    torch.testing.assert_close(trpo.conjugate_gradient(lambda v: A @ v, b, 2),
                               torch.tensor([1 / 11, 7 / 11], dtype=torch.float64))


def test_cg_matches_linalg_solve():
    A = spd(20, seed=1)
    b = torch.randn(20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_star = torch.linalg.solve(A, b)
    # n iterations solve it up to the rounding that erodes the directions' conjugacy; a few more finish the job
    torch.testing.assert_close(trpo.conjugate_gradient(lambda v: A @ v, b, 20, tol=1e-30), x_star, atol=1e-5, rtol=0)
    torch.testing.assert_close(trpo.conjugate_gradient(lambda v: A @ v, b, 30, tol=1e-30), x_star, atol=1e-12,
                               rtol=0)


def test_cg_error_in_A_norm_never_grows_and_one_product_per_iteration():
    A, n = spd(12, seed=3), 12
    b = torch.randn(n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x_star = torch.linalg.solve(A, b)
    errors = []
    for k in range(n + 1):
        calls = []
        x = trpo.conjugate_gradient(lambda v: calls.append(1) or A @ v, b, k, tol=1e-30)
        assert len(calls) == k
        e = x - x_star
        errors.append(float(e @ A @ e))  # CG minimises this over the Krylov space of size k
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-12 * errors[0]


def test_cg_zero_rhs_and_extra_iterations_stay_finite():
    A = spd(5, seed=5)
    assert torch.equal(trpo.conjugate_gradient(lambda v: A @ v, torch.zeros(5, dtype=torch.float64), 10),
                       torch.zeros(5, dtype=torch.float64))
    b = torch.ones(5, dtype=torch.float64)
    x = trpo.conjugate_gradient(lambda v: A @ v, b, 50)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(x, torch.linalg.solve(A, b))


# ---------------------------------------------------------------------------------------------- flat vectors
def test_flat_round_trip_and_size_error():
    params = [torch.randn(2, 3), torch.randn(4)]
    flat = trpo.get_flat(params)
    assert flat.shape == (10,)
    trpo.set_flat(params, flat * 2)
    torch.testing.assert_close(trpo.get_flat(params), flat * 2)
    with pytest.raises(ValueError, match="11 entries"):
        trpo.set_flat(params, torch.zeros(11))


def test_flat_grad_hand_worked_with_unused_param():
    a, b = torch.tensor([1.0, 2.0], requires_grad=True), torch.tensor([3.0], requires_grad=True)
    unused = torch.zeros(2, requires_grad=True)
    g = trpo.flat_grad((a**2).sum() + 5 * b.sum(), [a, b, unused])
    torch.testing.assert_close(g, torch.tensor([2.0, 4.0, 5.0, 0.0, 0.0]))


# ----------------------------------------------------------------------------------- KL and Fisher products
class LinearPolicy(torch.nn.Module):
    """logits (B, T, V) = features (B, T, D) @ W (D, V): a policy small enough for explicit matrices."""

    def __init__(self, D=3, V=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(D, V, generator=g, dtype=torch.float64))

    def forward(self, x):
        return x @ self.W


def linear_case(seed=0, B=2, T=3, D=3, V=4):
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[1, 2] = 0
    return LinearPolicy(D, V, seed), x, mask


def test_categorical_kl_hand_worked_and_matches_exact_kl():
    old = torch.log(torch.tensor([[[0.5, 0.5]]]))
    new = torch.log(torch.tensor([[[0.25, 0.75]]]))
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert trpo.categorical_kl(old, new, torch.ones(1, 1)).item() == pytest.approx(expected, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 7, generator=g), torch.randn(3, 5, 7, generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.4).float()
    mask[0, 0] = 1
    torch.testing.assert_close(trpo.categorical_kl(a, b, mask), ppo.masked_mean(ppo.exact_kl(a, b), mask))


def test_kl_gradient_vanishes_at_old_params():
    model, x, mask = linear_case()
    old = model(x).detach()
    g = trpo.flat_grad(trpo.categorical_kl(old, model(x), mask), list(model.parameters()))
    assert g.abs().max() < 1e-12


def test_fvp_matches_explicit_hessian_and_fisher():
    model, x, mask = linear_case(seed=1)
    params = list(model.parameters())
    old = model(x).detach()
    W0 = model.W.detach().clone()

    def kl_of(W):
        return trpo.categorical_kl(old, x @ W, mask)

    H = torch.autograd.functional.hessian(kl_of, W0).reshape(W0.numel(), W0.numel())
    Fm = trpo.fisher_matrix(lambda: model(x), params, mask)
    torch.testing.assert_close(H, Fm)  # the KL's curvature at theta_old is the Fisher information
    fvp = trpo.fisher_vector_product(trpo.categorical_kl(old, model(x), mask), params, damping=0.1)
    v = torch.randn(W0.numel(), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(fvp(v), H @ v + 0.1 * v)
    torch.testing.assert_close(fvp(2 * v), 2 * fvp(v))  # linear, and reusable call after call


def test_surrogate_gradient_at_ratio_one_is_the_policy_gradient():
    g = torch.Generator().manual_seed(4)
    lp = torch.randn(2, 5, generator=g).requires_grad_()
    adv, mask = torch.randn(2, 5, generator=g), torch.ones(2, 5)
    mask[1, 3:] = 0
    surr = trpo.surrogate_objective(lp, lp.detach(), adv, mask)
    torch.testing.assert_close(surr, ppo.masked_mean(adv, mask))
    (grad,) = torch.autograd.grad(surr, lp)
    torch.testing.assert_close(grad, adv * mask / mask.sum())  # = grad of mean[A log pi] over masked tokens


# ------------------------------------------------------------------------------------------ line search, step
def test_line_search_hand_worked_backtracks_to_the_kl_bound():
    theta = torch.zeros(1)
    evaluate = lambda: (theta[0], theta[0] ** 2)  # noqa: E731  surrogate improves linearly along +theta
    res = trpo.backtracking_line_search([theta], torch.tensor([1.0]), 1.0, evaluate, max_kl=0.1)
    # frac 1 -> KL 1, 0.5 -> 0.25, 0.25 -> 0.0625 <= 0.1: accepted after two backtracks
    assert res.accepted and res.step_frac == 0.25 and res.n_backtracks == 2
    assert theta.item() == pytest.approx(0.25) and res.kl == pytest.approx(0.0625)
    assert [t[0] for t in res.tried] == [1.0, 0.5, 0.25]


def test_line_search_restores_params_when_nothing_is_acceptable():
    theta = torch.tensor([0.3])
    res = trpo.backtracking_line_search([theta], torch.tensor([1.0]), 1.0, lambda: (-theta[0], theta[0] * 0),
                                        max_kl=1.0, max_backtracks=5)
    assert not res.accepted and res.step_frac == 0.0 and len(res.tried) == 5
    assert theta.item() == pytest.approx(0.3)


def linear_trpo_problem(seed):
    model, x, mask = linear_case(seed=seed, B=4, T=5, D=3, V=6)
    params = list(model.parameters())
    with torch.no_grad():
        old_logits = model(x)
        actions = torch.distributions.Categorical(logits=old_logits).sample()
    old_lp = F.log_softmax(old_logits, -1).gather(-1, actions[..., None]).squeeze(-1)
    adv = torch.randn(actions.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def evaluate():
        logits = model(x)
        lp = F.log_softmax(logits, -1).gather(-1, actions[..., None]).squeeze(-1)
        return trpo.surrogate_objective(lp, old_lp, adv, mask), trpo.categorical_kl(old_logits, logits, mask)

    return model, params, x, mask, evaluate


@pytest.mark.parametrize("seed", range(5))
def test_trpo_step_improves_within_the_kl_bound(seed):
    model, params, x, mask, evaluate = linear_trpo_problem(seed)
    before = evaluate()[0].item()
    stats = trpo.trpo_step(params, evaluate, max_kl=0.01, damping=1e-3, cg_iters=20)
    assert stats.accepted
    surrogate, kl = evaluate()
    assert 0 < stats.kl <= 0.01 and kl.item() == pytest.approx(stats.kl)
    assert surrogate.item() - before == pytest.approx(stats.improvement) and stats.improvement > 0
    assert stats.cg_residual < 1e-3  # CG stops once r.r < 1e-10


def test_trpo_step_is_the_natural_gradient_direction():
    model, params, x, mask, evaluate = linear_trpo_problem(7)
    W0 = model.W.detach().clone()
    g = trpo.flat_grad(evaluate()[0], params)
    Fm = trpo.fisher_matrix(lambda: model(x), params, mask) + 1e-3 * torch.eye(W0.numel(), dtype=torch.float64)
    natural = torch.linalg.solve(Fm, g)
    stats = trpo.trpo_step(params, evaluate, max_kl=1e-4, damping=1e-3, cg_iters=W0.numel())
    assert stats.accepted
    step = (model.W.detach() - W0).reshape(-1)
    cos = F.cosine_similarity(step, natural, dim=0)
    assert cos > 0.999
    # its size puts the quadratic model of the KL at max_kl (times the accepted fraction squared) ...
    assert 0.5 * step @ Fm @ step == pytest.approx(stats.step_frac**2 * 1e-4, rel=1e-3)
    # ... and for so small a step the model is accurate: the measured KL agrees with it
    assert stats.kl == pytest.approx(0.5 * float(step @ Fm @ step), rel=0.05)


def test_trpo_step_with_zero_advantages_does_not_move():
    model, params, x, mask, _ = linear_trpo_problem(8)
    W0 = model.W.detach().clone()
    old_logits = model(x).detach()

    def evaluate():
        logits = model(x)
        zero = torch.zeros(mask.shape, dtype=logits.dtype)
        return (trpo.surrogate_objective(logits[..., 0], old_logits[..., 0], zero, mask),
                trpo.categorical_kl(old_logits, logits, mask))

    stats = trpo.trpo_step(params, evaluate, max_kl=0.01)
    assert not stats.accepted and torch.equal(model.W.detach(), W0)


def test_trpo_step_on_a_tiny_transformer_respects_the_bound():
    """Double backprop through attention (the math SDPA path) on a random GPT-2, last block only."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=17, n_positions=16, n_embd=16, n_layer=2, n_head=2))
    params = trpo.train_last_block(model)
    assert [p for p in model.parameters() if p.requires_grad] == params
    assert sum(p.numel() for p in params) == sum(p.numel() for p in model.transformer.h[1].parameters())
    ids = torch.randint(0, 17, (4, 9))
    mask = torch.zeros(4, 8)
    mask[:, 3:] = 1
    with torch.no_grad():
        old_logits = model(ids).logits[:, :-1]
    old_lp = F.log_softmax(old_logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    adv = torch.randn(4, 8)

    def evaluate():
        logits = model(ids).logits[:, :-1]
        lp = F.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return trpo.surrogate_objective(lp, old_lp, adv, mask), trpo.categorical_kl(old_logits, logits, mask)

    stats = trpo.trpo_step(params, evaluate, max_kl=0.005, cg_iters=5)
    assert stats.accepted and 0 < stats.kl <= 0.005 and stats.improvement > 0


def test_cg_callback_sees_every_iteration():
    A = spd(4, seed=9)
    b = torch.ones(4, dtype=torch.float64)
    seen = []
    x = trpo.conjugate_gradient(lambda v: A @ v, b, 3, callback=lambda i, x, r: seen.append((i, (b - A @ x - r).norm())))
    assert [i for i, _ in seen] == [1, 2, 3]
    assert all(err < 1e-12 for _, err in seen)  # r is the residual b - A x of the iterate
    assert x.shape == b.shape


def test_train_last_block_finds_the_blocks_of_other_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=1))
    params = trpo.train_last_block(model)
    expected = list(model.model.layers[2].parameters())
    assert len(params) == len(expected) and all(a is b for a, b in zip(params, expected))
    assert sum(p.requires_grad for p in model.parameters()) == len(expected)
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        trpo.train_last_block(torch.nn.Linear(2, 2))


def test_natural_gradient_solves_the_damped_fisher_system():
    model, params, x, mask, evaluate = linear_trpo_problem(11)
    g_expected = trpo.flat_grad(evaluate()[0], params)
    Fm = trpo.fisher_matrix(lambda: model(x), params, mask) + 0.05 * torch.eye(g_expected.numel(), dtype=torch.float64)
    exact_cg = lambda A, b, n: trpo.conjugate_gradient(A, b, n, tol=1e-30)  # noqa: E731  no early stop
    g, s, fvp, surrogate = trpo.natural_gradient(params, evaluate, damping=0.05, cg_iters=60, cg=exact_cg)
    torch.testing.assert_close(g, g_expected)
    torch.testing.assert_close(s, torch.linalg.solve(Fm, g), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(fvp(s), Fm @ s)
    assert surrogate == pytest.approx(evaluate()[0].item())  # at theta_old: the masked mean of the advantages
