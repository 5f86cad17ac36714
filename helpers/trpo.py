"""Trust-region policy optimisation for a language-model policy, as small functions (taught in week 1).

TRPO (Schulman et al. 2015) maximises the importance-weighted surrogate ``L(theta) = mean[ratio * A]`` subject to
``KL(pi_old || pi_theta) <= max_kl``. With a linear model of ``L`` (gradient ``g``) and a quadratic model of the KL
(its Hessian at ``theta_old`` is the Fisher information ``F``), the best step is ``sqrt(2 max_kl / s^T F s) * s``
with ``s = F^-1 g``. We never build ``F``: :func:`conjugate_gradient` solves ``F s = g`` from Fisher-vector
products alone, and :func:`fisher_vector_product` gets ``F v`` by differentiating the KL twice (double backprop,
Schulman et al. 2015, appendix C). :func:`backtracking_line_search` then shrinks the step until the surrogate really
improves and the *measured* KL is within the bound, because the quadratic model is only a model.

How this deviates from the paper, and why:

- the KL is the exact KL between the two next-token distributions over the whole vocabulary, averaged over response
  tokens (:func:`categorical_kl`), not a sampled estimate: a language model gives us every probability for free;
- ``damping * v`` is added to every Fisher-vector product (as in the reference implementation), which keeps CG
  stable when ``F`` is near-singular (a large vocabulary and a few hundred tokens give a low-rank ``F``);
- notebooks apply TRPO to a subset of the parameters (the last transformer block), so products stay cheap.

Shapes: ``params`` is a list of tensors; flat vectors have ``n = sum(p.numel())`` entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .lm import masked_mean

Params = Sequence[torch.Tensor]


# ---------------------------------------------------------------------------------------------- flat vectors


def flat_grad(y: torch.Tensor, params: Params, *, create_graph: bool = False,
              retain_graph: bool | None = None) -> torch.Tensor:
    """Gradient of the scalar ``y`` with respect to ``params``, as one flat vector (zeros where unused)."""
    grads = torch.autograd.grad(y, list(params), create_graph=create_graph, retain_graph=retain_graph,
                                allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def get_flat(params: Params) -> torch.Tensor:
    """The parameters as one flat (detached) vector."""
    return torch.cat([p.detach().reshape(-1) for p in params])


@torch.no_grad()
def set_flat(params: Params, flat: torch.Tensor) -> None:
    """Copy a flat vector back into ``params`` (in place, no autograd history)."""
    i = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[i:i + n].view_as(p))
        i += n
    if i != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, the parameters {i}")


# ------------------------------------------------------------------------------------------ conjugate gradient


def conjugate_gradient(Avp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, n_iters: int = 10,
                       tol: float = 1e-10, callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
                       ) -> torch.Tensor:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` known only through ``Avp(v) = A @ v``.

    Starts at ``x = 0``, so the residual ``r = b - A x`` starts at ``b``; each iteration moves along a search
    direction ``p`` that is A-conjugate to the previous ones::

        alpha = r.r / p.Ap;  x += alpha p;  r -= alpha Ap;  beta = r_new.r_new / r.r;  p = r + beta p

    In exact arithmetic it solves an ``n``-dimensional system in ``n`` iterations. Stops early once ``r.r < tol``
    (which also avoids 0/0 when ``b = 0`` or the system is already solved). Costs one ``Avp`` per iteration.
    ``callback(i, x, r)``, if given, sees the iterate and its residual after each iteration ``i = 1, 2, ...``.
    """
    x = torch.zeros_like(b)
    r = b.clone()  # residual b - A x at x = 0
    p = r.clone()  # first search direction: steepest descent
    rr = r @ r
    for i in range(n_iters):
        if rr < tol:
            break
        Ap = Avp(p)
        alpha = rr / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
        if callback is not None:
            callback(i + 1, x, r)
    return x


# ----------------------------------------------------------------------------------------- KL and the Fisher


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the softmax; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def categorical_kl(old_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of the exact ``KL(softmax(old_logits) || softmax(logits))``, summed over the
    vocabulary. (B, T, V), (B, T, V), (B, T) 0/1 -> scalar. Gradients flow into ``logits`` only.

    Only the masked positions go through the softmax (``logits[mask]``, shape (N, V)), so prompt and padding
    positions add nothing to it, nor to the double backward of :func:`fisher_vector_product`.
    """
    m = mask.bool()
    old_logp = F.log_softmax(_upcast(old_logits.detach()[m]), -1)  # (N, V)
    logp = F.log_softmax(_upcast(logits[m]), -1)  # (N, V)
    kl = (old_logp.exp() * (old_logp - logp)).sum(-1)  # (N,)
    return kl.mean() if kl.numel() else logits.sum() * 0.0


def fisher_vector_product(kl: torch.Tensor, params: Params, damping: float = 0.0
                          ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``v -> (H + damping I) v`` where ``H`` is the Hessian of the scalar ``kl`` with respect to ``params``.

    ``kl`` must be ``KL(pi_old || pi_theta)`` computed *at* ``theta = theta_old`` with the old distribution held fixed:
    there its gradient is 0 and its Hessian is the Fisher information matrix. Double backprop: ``g = dKL/dtheta``
    with a graph, then ``Hv = d(g . v)/dtheta``. The first gradient is computed once and reused by every call.
    """
    grad_kl = flat_grad(kl, params, create_graph=True)

    def fvp(v: torch.Tensor) -> torch.Tensor:
        hv = flat_grad(grad_kl @ v.detach(), params, retain_graph=True)
        return hv + damping * v

    return fvp


def fisher_matrix(logits_fn: Callable[[], torch.Tensor], params: Params, mask: torch.Tensor) -> torch.Tensor:
    """The Fisher information matrix built explicitly (slow; for tests and small demos):

    ``F = mean over masked positions of sum_a pi(a) grad log pi(a) grad log pi(a)^T`` (an ``n x n`` matrix).
    ``logits_fn()`` returns (B, T, V) logits computed from ``params``.
    """
    logits = logits_fn()
    logp = F.log_softmax(_upcast(logits), -1)  # (B, T, V)
    probs = logp.detach().exp()
    m = mask.bool()
    n = sum(p.numel() for p in params)
    fisher = torch.zeros(n, n, dtype=logp.dtype)
    positions = m.nonzero().tolist()
    for b, t in positions:
        for a in range(logp.shape[-1]):
            g = flat_grad(logp[b, t, a], params, retain_graph=True)
            fisher += probs[b, t, a] * torch.outer(g, g)
    return fisher / max(1, len(positions))


# ----------------------------------------------------------------------------------------------- the step


def surrogate_objective(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
    """TRPO's surrogate ``mean[exp(logprobs - old_logprobs) * A]`` over masked tokens (to *maximise*).
    Its gradient at ``logprobs = old_logprobs`` is the policy gradient."""
    return masked_mean(torch.exp(logprobs - old_logprobs.detach()) * advantages.detach(), mask)


@dataclass
class LineSearchResult:
    accepted: bool
    """False when no step in the schedule improved the surrogate within the KL bound (parameters left unchanged)."""
    step_frac: float
    """Fraction of the full step taken (0 when rejected)."""
    improvement: float
    """Measured increase of the surrogate."""
    kl: float
    """Measured KL(old || new) at the accepted parameters (0 when rejected)."""
    n_backtracks: int
    tried: list = field(default_factory=list)
    """``(step_frac, improvement, kl)`` for every step size tried."""


Evaluate = Callable[[], tuple[torch.Tensor, torch.Tensor]]
"""``evaluate() -> (surrogate, kl)`` at the current parameters, both scalars from one forward pass:
``surrogate`` to maximise (:func:`surrogate_objective`) and ``KL(pi_old || pi_theta)`` with ``pi_old`` held fixed."""


@torch.no_grad()
def backtracking_line_search(params: Params, full_step: torch.Tensor, expected_improvement: float,
                             evaluate: Evaluate, max_kl: float, *, base: float | None = None,
                             max_backtracks: int = 10, shrink: float = 0.5,
                             accept_ratio: float = 0.1) -> LineSearchResult:
    """Try ``theta_old + frac * full_step`` for ``frac = 1, shrink, shrink^2, ...``; accept the first one whose
    measured KL is at most ``max_kl`` and whose surrogate improvement is positive and at least ``accept_ratio``
    times the first-order prediction ``frac * expected_improvement``. If none passes, restore ``theta_old``.

    ``base`` is the surrogate at ``theta_old`` (evaluated here if not given).
    """
    old = get_flat(params)
    if base is None:
        base = float(evaluate()[0])
    tried = []
    frac = 1.0
    for k in range(max_backtracks):
        set_flat(params, old + frac * full_step)
        surrogate, kl = evaluate()
        improvement, kl = float(surrogate) - base, float(kl)
        tried.append((frac, improvement, kl))
        if kl <= max_kl and improvement > 0 and improvement >= accept_ratio * frac * expected_improvement:
            return LineSearchResult(True, frac, improvement, kl, k, tried)
        frac *= shrink
    set_flat(params, old)
    return LineSearchResult(False, 0.0, 0.0, 0.0, max_backtracks, tried)


@dataclass
class TRPOStats:
    accepted: bool
    step_frac: float
    improvement: float
    expected_improvement: float
    kl: float
    """Measured KL(old || new) after the step: at most ``max_kl`` whenever ``accepted``."""
    cg_residual: float
    """``|F s - g| / |g|``: how well CG solved the system."""
    grad_norm: float
    n_backtracks: int


def natural_gradient(params: Params, evaluate: Evaluate, *, damping: float = 0.1, cg_iters: int = 10,
                     cg: Callable = conjugate_gradient):
    """The pieces of a TRPO step before the line search, at the current parameters ``theta_old``.

    Returns ``(g, s, fvp, surrogate)``: the surrogate's gradient ``g``, the CG solution ``s ~ (F + damping I)^-1 g``,
    the Fisher-vector product ``fvp`` (for more products, e.g. ``s . F s``), and the surrogate's value.
    """
    params = list(params)
    # Double backprop needs attention written in differentiable ops: the fused CPU/flash kernels have no
    # second derivative, the "math" implementation of scaled-dot-product attention does.
    with sdpa_kernel([SDPBackend.MATH]):
        surrogate, kl = evaluate()
    g = flat_grad(surrogate, params, retain_graph=True)
    fvp = fisher_vector_product(kl, params, damping)
    s = cg(fvp, g, cg_iters)
    return g, s, fvp, float(surrogate.detach())


def trpo_step(params: Params, evaluate: Evaluate, max_kl: float = 0.01, *, damping: float = 0.1,
              cg_iters: int = 10, max_backtracks: int = 10, accept_ratio: float = 0.1,
              cg: Callable = conjugate_gradient) -> TRPOStats:
    """One TRPO update of ``params`` in place.

    1. ``g = grad L`` at ``theta_old``, and ``s = F^-1 g`` by conjugate gradient on Fisher-vector products of the
       KL (double backprop): :func:`natural_gradient`;
    2. scale to the trust region: ``full_step = sqrt(2 max_kl / s^T F s) * s`` (where the quadratic model of the
       KL equals ``max_kl``), predicted improvement ``g . full_step``;
    3. backtracking line search on the measured surrogate and KL.

    ``evaluate()`` returns ``(surrogate, kl)`` from one forward pass (see :data:`Evaluate`). ``cg`` lets you plug
    in your own conjugate-gradient solver with the same signature as :func:`conjugate_gradient`.
    """
    params = list(params)
    g, s, fvp, base = natural_gradient(params, evaluate, damping=damping, cg_iters=cg_iters, cg=cg)
    Fs = fvp(s)
    sFs = float(s @ Fs)
    grad_norm = float(g.norm())
    cg_residual = float((Fs - g).norm() / g.norm().clamp(min=1e-12))
    if not sFs > 0 or grad_norm == 0.0:  # no direction to move in (zero gradient, or CG failed)
        return TRPOStats(False, 0.0, 0.0, 0.0, 0.0, cg_residual, grad_norm, 0)
    beta = (2 * max_kl / sFs) ** 0.5
    full_step = beta * s
    expected = float(g @ full_step)
    ls = backtracking_line_search(params, full_step, expected, evaluate, max_kl, base=base,
                                  max_backtracks=max_backtracks, accept_ratio=accept_ratio)
    return TRPOStats(ls.accepted, ls.step_frac, ls.improvement, expected, ls.kl, cg_residual, grad_norm,
                     ls.n_backtracks)


# ------------------------------------------------------------------------------------------ parameter subset


def train_last_block(model) -> list[torch.nn.Parameter]:
    """Freeze every parameter of ``model`` except those of its last transformer block, and return those.

    The block list is found as the longest ``nn.ModuleList`` in the model (``transformer.h`` in GPT-2 and GPT-Neo,
    ``model.layers`` in Llama and Qwen2), so the same code serves the tiny models and the hub ones. Backward passes
    then stop at that block, which keeps Fisher-vector products cheap.
    """
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks (nn.ModuleList)")
    block = max(lists, key=len)[-1]
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(block.parameters())
    for p in params:
        p.requires_grad_(True)
    return params
