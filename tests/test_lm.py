"""Log-probs, masks and the top-p filter: hand-worked cases, naive references, invariants."""

import math

import pytest
import torch

from helpers import lm


def test_token_logprobs_hand_worked():
    # Two tokens, logits (0, log 3): probabilities 1/4 and 3/4.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])  # (1, 2, 2)
    labels = torch.tensor([[1, 0]])
    got = lm.token_logprobs(logits, labels, torch.tensor([[1, 0]]))
    torch.testing.assert_close(got, torch.tensor([[math.log(0.75), 0.0]]))


def test_token_logprobs_matches_naive_and_is_stable():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(4, 6, 9, generator=g), torch.randint(0, 9, (4, 6), generator=g)
    naive = logits.softmax(-1).gather(-1, labels[..., None]).squeeze(-1).log()
    torch.testing.assert_close(lm.token_logprobs(logits, labels), naive)
    big = lm.token_logprobs(logits * 1000, labels)
    assert torch.isfinite(big).all() and (big <= 0).all()


def test_token_logprobs_invariant_to_shifting_logits():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(2, 5, 7, generator=g), torch.randint(0, 7, (2, 5), generator=g)
    torch.testing.assert_close(lm.token_logprobs(logits, labels), lm.token_logprobs(logits + 123.0, labels))


def test_sequence_logprob_and_masked_mean():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(lm.sequence_logprob(lp, mask), torch.tensor([-3.0, -10.0]))
    torch.testing.assert_close(lm.masked_mean(lp, mask), torch.tensor(-13.0 / 5))
    torch.testing.assert_close(lm.masked_mean(lp, mask, dim=1), torch.tensor([-1.5, -10.0 / 3]))
    assert lm.masked_mean(lp, torch.zeros_like(mask)).item() == 0.0  # empty mask: no division by zero


def test_top_p_hand_worked():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(lm.top_p_filter(logits, p)).int().tolist()  # noqa: E731
    assert kept(0.5) == [[1, 0, 0, 0]]  # 0.5 reaches 0.5 exactly
    assert kept(0.6) == [[1, 1, 0, 0]]  # the token that crosses 0.6 is kept
    assert kept(0.9) == [[1, 1, 1, 0]]
    assert kept(1e-6) == [[1, 0, 0, 0]]  # the top token always survives
    assert kept(1.0) == [[1, 1, 1, 1]]


def test_top_p_matches_naive_loop_and_keeps_order():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 20, generator=g) * 3
    out = lm.top_p_filter(logits, 0.8)
    for row, row_out in zip(logits, out):
        order = row.softmax(-1).argsort(descending=True).tolist()
        mass, keep = 0.0, set()
        for i in order:  # naive: add tokens until the mass reaches top_p
            if mass >= 0.8:
                break
            keep.add(i)
            mass += row.softmax(-1)[i].item()
        assert {i for i in range(20) if torch.isfinite(row_out[i])} == keep
    kept = torch.isfinite(out)
    assert torch.equal(out[kept], logits[kept])  # surviving logits untouched


def test_top_p_rejects_bad_p():
    with pytest.raises(ValueError, match="top_p"):
        lm.top_p_filter(torch.zeros(1, 3), 0.0)


def test_sample_next_greedy_and_nucleus():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0]])
    assert lm.sample_next(logits, temperature=0).tolist() == [1, 0]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([lm.sample_next(logits, top_p=0.5, generator=g) for _ in range(50)])
    assert (draws == torch.tensor([1, 0])).all()  # top_p 0.5 leaves only the top token here
