"""Checks for week 0: per-token log-probs, the log-prob of a response, and the top-p (nucleus) filter."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import lm
from . import CheckError, check, diagnose, expect_tensor, fresh_seed, run_student


def _logits_case(seed: int, B: int = 3, T: int = 7, V: int = 11, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * scale
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    lengths[0] = T - 2  # at least one padded row
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) right padding
    return logits, labels, mask


@check
def check_token_logprobs(fn) -> str:
    """``fn(logits (B,T,V), labels (B,T), mask (B,T)) -> (B,T)``: log p(label), 0 on padding."""
    seed = fresh_seed()
    for scale in (1.0, 4.0):
        logits, labels, mask = _logits_case(seed, scale=scale)
        got = expect_tensor(run_student(fn, logits.clone(), labels.clone(), mask.clone()), labels.shape,
                            "token_logprobs")
        expected = lm.token_logprobs(logits, labels, mask)
        unmasked = lm.token_logprobs(logits, labels)
        mistakes = {
            "padding positions are not zero: multiply by the mask (or use torch.where) after gathering.": unmasked,
            "these look like probabilities, not log-probabilities: use log_softmax, not softmax.":
                F.softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1) * mask,
            "these are the raw logits of the labels: normalise with log_softmax over the vocabulary first.":
                logits.gather(-1, labels[..., None]).squeeze(-1) * mask,
            "the softmax runs over the wrong dimension: normalise over the vocabulary (dim=-1).":
                F.log_softmax(logits, 1).gather(-1, labels[..., None]).squeeze(-1) * mask,
            "the sign is flipped: return log-probabilities (<= 0), not negative log-likelihoods.": -expected,
        }
        diagnose(got, expected, mistakes, label="token_logprobs", seed=seed)
    # Numerical stability: huge logits overflow exp(); softmax-then-log underflows to -inf.
    logits, labels, mask = _logits_case(seed, scale=1.0)
    logits = logits * 200
    got = run_student(fn, logits.clone(), labels.clone(), mask.clone())
    if not torch.isfinite(got).all():
        raise CheckError("token_logprobs gives inf/nan for large logits (|logit| ~ 500): softmax followed by log "
                         "underflows; use torch.log_softmax, which subtracts the maximum first.")
    diagnose(got, lm.token_logprobs(logits, labels, mask), {}, label="token_logprobs with large logits",
             seed=seed, atol=1e-3)
    return "matches the reference on random and extreme logits, padding masked"


def _response_case(seed: int, B: int = 4, T: int = 9, V: int = 13):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    input_ids = torch.randint(0, V, (B, T), generator=g)
    prompt_len = torch.randint(2, 5, (B,), generator=g)
    resp_len = torch.randint(1, T - 4, (B,), generator=g)
    pos = torch.arange(T)[None, :]
    response_mask = (pos >= prompt_len[:, None]) & (pos < (prompt_len + resp_len)[:, None])
    return logits, input_ids, response_mask


def reference_response_logprob(logits, input_ids, response_mask):
    """log P(response | prompt): logits at t-1 score token t; sum over the response tokens."""
    lp = lm.token_logprobs(logits[:, :-1], input_ids[:, 1:], response_mask[:, 1:])
    return lp.sum(-1)


@check
def check_response_logprob(fn) -> str:
    """``fn(logits (B,T,V), input_ids (B,T), response_mask (B,T)) -> (B,)``: log P(response | prompt)."""
    seed = fresh_seed()
    logits, ids, rmask = _response_case(seed)
    got = expect_tensor(run_student(fn, logits.clone(), ids.clone(), rmask.clone()), (ids.shape[0],),
                        "response_logprob")
    expected = reference_response_logprob(logits, ids, rmask)
    all_lp = lm.token_logprobs(logits[:, :-1], ids[:, 1:])
    noshift = lm.token_logprobs(logits, ids, rmask)
    mistakes = {
        "no shift: the logits at position t predict token t+1, so pair logits[:, :-1] with input_ids[:, 1:].":
            noshift.sum(-1),
        "shifted the wrong way: pair logits[:, :-1] with input_ids[:, 1:] and the mask's [:, 1:].":
            (lm.token_logprobs(logits[:, 1:], ids[:, :-1]) * rmask[:, :-1]).sum(-1),
        "prompt and padding tokens are counted: only sum where response_mask is 1.": all_lp.sum(-1),
        "the mask is shifted differently from the tokens: use response_mask[:, 1:] with input_ids[:, 1:].":
            (all_lp * rmask[:, :-1]).sum(-1),
        "this is a mean over tokens; log P(response) is the sum of the per-token log-probs.":
            expected / rmask[:, 1:].sum(-1).clamp(min=1),
        "no shift and a mean instead of a sum.": noshift.sum(-1) / rmask.sum(-1).clamp(min=1),
    }
    diagnose(got, expected, mistakes, label="response_logprob", seed=seed)
    big = logits * 300
    got = run_student(fn, big, ids.clone(), rmask.clone())
    if not torch.isfinite(got).all():
        raise CheckError("response_logprob gives inf/nan for large logits: use log_softmax, not log(softmax).")
    diagnose(got, reference_response_logprob(big, ids, rmask), {}, label="response_logprob with large logits",
             seed=seed, atol=1e-2)
    return "shift, response mask and sum are right"


@check
def check_top_p_filter(fn) -> str:
    """``fn(logits (B,V), top_p) -> (B,V)``: logits kept inside the nucleus, -inf outside."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 17, generator=g) * 2
    for top_p in (0.9, 0.5, 1.0, 1e-4):
        got = expect_tensor(run_student(fn, logits.clone(), top_p), tuple(logits.shape), "top_p_filter")
        expected = lm.top_p_filter(logits, top_p)
        kept_got, kept_exp = torch.isfinite(got), torch.isfinite(expected)
        if torch.equal(kept_got, kept_exp) and torch.allclose(got[kept_got], logits[kept_got]):
            continue
        probs = logits.softmax(-1)
        sp, order = probs.sort(-1, descending=True)
        exclusive = (sp.cumsum(-1) > top_p).scatter(-1, order, sp.cumsum(-1) > top_p)
        if torch.equal(kept_got, ~exclusive):
            raise CheckError(f"top_p_filter(top_p={top_p}) drops the token that crosses top_p: the nucleus is the "
                             "smallest set whose mass reaches top_p, so that token belongs in it (compare the "
                             "mass *before* each token with top_p).")
        if not kept_got.any(-1).all():
            raise CheckError(f"top_p_filter(top_p={top_p}) removes every token of a row: the most likely token "
                             "must always stay (keep a token when the mass *before* it is below top_p).")
        if (got == 0).any() and not (logits == 0).any():
            raise CheckError(f"top_p_filter(top_p={top_p}) sets removed tokens to 0; a logit of 0 still has "
                             "probability. Set them to float('-inf').")
        if torch.isfinite(got).all() and torch.allclose(got.sum(-1), torch.ones(5), atol=1e-4):
            raise CheckError("top_p_filter returns probabilities; return the filtered logits (-inf outside).")
        sorted_exp = expected.sort(-1, descending=True).values
        if torch.equal(torch.isfinite(got), torch.isfinite(sorted_exp)):
            raise CheckError("the result is in sorted order: scatter the mask back to the vocabulary order "
                             "(or index with the sort permutation) before applying it.")
        if torch.equal(kept_got, kept_exp):
            raise CheckError("the right tokens are kept, but their logits changed: return the original logits "
                             "inside the nucleus (no renormalising, no temperature).")
        n_got, n_exp = kept_got.sum().item(), kept_exp.sum().item()
        raise CheckError(f"top_p_filter(top_p={top_p}) keeps {n_got} tokens in all, the nucleus has {n_exp} "
                         f"(seed {seed}). Sort by probability, accumulate, and keep tokens until the mass reaches "
                         "top_p.")
    # Stability: extreme logits must not produce nan.
    extreme = logits * 1000
    got = run_student(fn, extreme.clone(), 0.9)
    if torch.isnan(got).any():
        raise CheckError("top_p_filter gives nan for extreme logits: compute probabilities with softmax "
                         "(which is stable), not exp(logits) / sum.")
    if not torch.equal(torch.isfinite(got), torch.isfinite(lm.top_p_filter(extreme, 0.9))):
        raise CheckError("top_p_filter keeps the wrong tokens for extreme logits (|logit| ~ 4000).")
    return "nucleus matches for top_p in {1e-4, 0.5, 0.9, 1.0} and extreme logits"
