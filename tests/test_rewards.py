"""helpers.rewards: each pure function three ways (a case worked by hand, a naive reference, an invariant),
and the reward model's plumbing (padding, truncation, normalisation, caching) on the tiny models."""

import math

import pytest
import torch

from helpers import agora, rewards as R


# ------------------------------------------------------------------------------------ Bradley-Terry loss

def test_bt_loss_by_hand():
    # margins 0 and ln 3: -log(1/2) and -log(3/4), mean of the two
    loss = R.bradley_terry_loss(torch.tensor([0.0, math.log(3.0)]), torch.tensor([0.0, 0.0]))
    assert loss.item() == pytest.approx((math.log(2) - math.log(0.75)) / 2, abs=1e-6)


def test_bt_loss_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    rc, rr = torch.randn(50, generator=g, dtype=torch.float64) * 3, torch.randn(50, generator=g, dtype=torch.float64) * 3
    naive = -torch.log(1 / (1 + torch.exp(-(rc - rr)))).mean()
    torch.testing.assert_close(R.bradley_terry_loss(rc, rr), naive)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bt_loss_shift_invariant_and_stable(dtype):
    g = torch.Generator().manual_seed(1)
    rc, rr = torch.randn(20, generator=g).to(dtype), torch.randn(20, generator=g).to(dtype)
    base = R.bradley_terry_loss(rc, rr)
    torch.testing.assert_close(R.bradley_terry_loss(rc + 7.5, rr + 7.5), base)
    # swapping chosen and rejected: loss(d) - loss(-d) = -mean(d)
    torch.testing.assert_close(R.bradley_terry_loss(rc, rr) - R.bradley_terry_loss(rr, rc), -(rc - rr).mean())
    # huge margins stay finite: -logsigmoid(-1000) = 1000
    big = R.bradley_terry_loss(torch.tensor([-1000.0], dtype=dtype), torch.tensor([0.0], dtype=dtype))
    assert torch.isfinite(big) and big.item() == pytest.approx(1000.0)


def test_bt_loss_gradient_is_sigmoid_of_minus_margin():
    rc, rr = torch.tensor([0.3, -1.0], requires_grad=True), torch.tensor([0.0, 2.0], requires_grad=True)
    R.bradley_terry_loss(rc, rr).backward()
    torch.testing.assert_close(rc.grad, -torch.sigmoid(-(rc - rr)).detach() / 2)
    torch.testing.assert_close(rr.grad, -rc.grad)


# ----------------------------------------------------------------------------------------- accuracy

def test_pairwise_accuracy_counts_ties_half():
    acc = R.pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 2.0, 5.0]))
    assert acc == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)


def test_pairwise_accuracy_naive_and_antisymmetric():
    g = torch.Generator().manual_seed(2)
    rc, rr = torch.randint(0, 4, (200,), generator=g).float(), torch.randint(0, 4, (200,), generator=g).float()
    naive = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rc.tolist(), rr.tolist())) / 200
    assert R.pairwise_accuracy(rc, rr) == pytest.approx(naive)
    assert R.pairwise_accuracy(rc, rr) + R.pairwise_accuracy(rr, rc) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        R.pairwise_accuracy(torch.zeros(0), torch.zeros(0))


def test_noise_ceiling_is_accuracy_of_true_utility():
    annotator = agora.Annotator()
    pairs = agora.preference_pairs(300, seed=3, annotator=annotator)
    uc = torch.tensor([annotator.utility(r["prompt"], r["chosen"]) for r in pairs])
    ur = torch.tensor([annotator.utility(r["prompt"], r["rejected"]) for r in pairs])
    assert R.pairwise_accuracy(uc, ur) == pytest.approx(agora.noise_ceiling(pairs, annotator))


# ---------------------------------------------------------------------------------------------- Elo

def test_elo_expected_by_hand():
    e = R.elo_expected(torch.tensor([1400.0, 1000.0, 1200.0]), torch.tensor([1000.0, 1400.0, 1200.0]))
    torch.testing.assert_close(e, torch.tensor([10 / 11, 1 / 11, 0.5]))


def test_elo_expected_naive_and_other_units():
    g = torch.Generator().manual_seed(4)
    ra, rb = torch.rand(30, generator=g, dtype=torch.float64) * 800, torch.rand(30, generator=g, dtype=torch.float64) * 800
    naive = 1 / (1 + 10 ** ((rb - ra) / 400))
    torch.testing.assert_close(R.elo_expected(ra, rb), naive)
    # natural-log units with scale 1 are Bradley-Terry's sigmoid
    torch.testing.assert_close(R.elo_expected(ra / 100, rb / 100, scale=1.0, base=math.e), torch.sigmoid((ra - rb) / 100))
    torch.testing.assert_close(R.elo_expected(ra, rb) + R.elo_expected(rb, ra), torch.ones(30, dtype=torch.float64))


def test_elo_update_by_hand():
    # equal ratings, a wins, K = 32: +16 / -16
    a, b = R.elo_update(torch.tensor(1500.0), torch.tensor(1500.0), torch.tensor(1.0), k=32)
    assert (a.item(), b.item()) == (1516.0, 1484.0)
    # 400 ahead and wins: expected 10/11, gain 32/11
    a, b = R.elo_update(torch.tensor(1400.0), torch.tensor(1000.0), torch.tensor(1.0), k=32)
    assert a.item() == pytest.approx(1400 + 32 / 11) and b.item() == pytest.approx(1000 - 32 / 11)
    # a draw between equals changes nothing
    a, b = R.elo_update(torch.tensor(1200.0), torch.tensor(1200.0), torch.tensor(0.5))
    assert (a.item(), b.item()) == (1200.0, 1200.0)


def test_elo_update_naive_and_zero_sum():
    g = torch.Generator().manual_seed(5)
    ra, rb = 1000 + 300 * torch.randn(40, generator=g, dtype=torch.float64), 1000 + 300 * torch.randn(40, generator=g, dtype=torch.float64)
    s = torch.randint(0, 3, (40,), generator=g).double() / 2
    na, nb = R.elo_update(ra, rb, s, k=24)
    for i in range(40):
        e = 1 / (1 + 10 ** ((rb[i].item() - ra[i].item()) / 400))
        assert na[i].item() == pytest.approx(ra[i].item() + 24 * (s[i].item() - e))
        assert nb[i].item() == pytest.approx(rb[i].item() - 24 * (s[i].item() - e))
    torch.testing.assert_close(na + nb, ra + rb)


def test_ranking_to_matches():
    assert R.ranking_to_matches([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert len(R.ranking_to_matches(list(range(6)))) == 15
    with pytest.raises(ValueError):
        R.ranking_to_matches([1, 1])


def test_elo_ratings_zero_sum_and_order():
    matches = [(0, 1), (0, 2), (1, 2)] * 5
    r = R.elo_ratings(matches, 3, k=16)
    assert r.sum().item() == pytest.approx(3000.0)
    assert r[0] > r[1] > r[2]
    one = R.elo_ratings([(1, 0)], 2, k=32)
    assert one.tolist() == [984.0, 1016.0]


# ----------------------------------------------------------------------------------- Bradley-Terry fit

def test_bt_fit_two_players_by_hand():
    # a beats b 3 times out of 4: MLE strength gap ln 3 (tiny l2 shrinks it a hair)
    s = R.bradley_terry_fit(torch.tensor([0, 0, 0, 1]), torch.tensor([1, 1, 1, 0]), 2, l2=1e-9)
    assert (s[0] - s[1]).item() == pytest.approx(math.log(3), abs=1e-5)
    assert s.sum().item() == pytest.approx(0.0, abs=1e-9)


def test_bt_fit_without_l2():
    # Only differences are identified; with l2=0 the fit still converges (the all-ones direction is pinned).
    s = R.bradley_terry_fit(torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([1, 1, 1, 0, 2, 1]), 3, l2=0.0)
    assert (s[0] - s[1]).item() == pytest.approx(math.log(3), abs=1e-6)
    assert (s[1] - s[2]).item() == pytest.approx(0.0, abs=1e-6)  # one win each
    assert s.sum().item() == pytest.approx(0.0, abs=1e-9)


def test_bt_fit_matches_gradient_descent_reference():
    g = torch.Generator().manual_seed(6)
    true = torch.tensor([0.0, 0.5, 1.0, -1.0, 2.0], dtype=torch.float64)
    i, j = torch.randint(0, 5, (3000,), generator=g), torch.randint(0, 5, (3000,), generator=g)
    keep = i != j
    i, j = i[keep], j[keep]
    win = torch.rand(len(i), generator=g, dtype=torch.float64) < torch.sigmoid(true[i] - true[j])
    winners, losers = torch.where(win, i, j), torch.where(win, j, i)
    s = R.bradley_terry_fit(winners, losers, 5)
    # naive reference: plain gradient descent on the same objective
    t = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([t], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = -torch.log(torch.sigmoid(t[winners] - t[losers])).sum() + 1e-4 * (t ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(s, (t - t.mean()).detach(), atol=1e-4, rtol=0)
    # and it recovers the truth up to sampling noise
    assert (s - (true - true.mean())).abs().max() < 0.15


def test_bt_fit_shift_and_relabel_invariant():
    w, l = torch.tensor([0, 1, 2, 2, 0, 1]), torch.tensor([1, 2, 0, 1, 2, 0])
    s = R.bradley_terry_fit(w, l, 3)
    perm = torch.tensor([2, 0, 1])  # player p becomes perm[p]
    s2 = R.bradley_terry_fit(perm[w], perm[l], 3)
    torch.testing.assert_close(s2[perm], s)


def test_bt_to_elo_units():
    s = torch.tensor([0.0, math.log(10.0)], dtype=torch.float64)  # 10:1 odds
    e = R.bt_to_elo(s)
    assert (e[1] - e[0]).item() == pytest.approx(400.0)
    assert e.mean().item() == pytest.approx(1000.0)
    torch.testing.assert_close(R.elo_expected(e[1], e[0]), torch.sigmoid(s[1] - s[0]))


def test_elo_with_small_k_approaches_bt_fit():
    g = torch.Generator().manual_seed(7)
    true = torch.tensor([-1.0, 0.0, 0.7, 1.5], dtype=torch.float64)
    i, j = torch.randint(0, 4, (6000,), generator=g), torch.randint(0, 4, (6000,), generator=g)
    keep = i != j
    i, j = i[keep], j[keep]
    win = torch.rand(len(i), generator=g, dtype=torch.float64) < torch.sigmoid(true[i] - true[j])
    winners, losers = torch.where(win, i, j), torch.where(win, j, i)
    elo = R.elo_ratings(list(zip(winners.tolist(), losers.tolist())), 4, k=4)
    bt = R.bt_to_elo(R.bradley_terry_fit(winners, losers, 4))
    assert (elo - bt).abs().max() < 40  # Elo points; the gap between players is ~100-400


# ---------------------------------------------------------------------------------------- calibration

def test_calibration_bins_by_hand():
    probs = torch.tensor([0.05, 0.15, 0.12, 0.95, 1.0, 0.5])
    labels = torch.tensor([0, 1, 0, 1, 1, 1])
    conf, freq, counts = R.calibration_bins(probs, labels, n_bins=10)
    assert counts.tolist() == [1, 2, 0, 0, 0, 1, 0, 0, 0, 2]
    assert conf[1].item() == pytest.approx(0.135) and freq[1].item() == pytest.approx(0.5)
    assert conf[9].item() == pytest.approx(0.975) and freq[9].item() == 1.0
    assert math.isnan(conf[2].item())
    ece = R.expected_calibration_error(probs, labels, 10)
    expected = (1 * 0.05 + 2 * abs(0.5 - 0.135) + 1 * 0.5 + 2 * 0.025) / 6
    assert ece == pytest.approx(expected)


def test_ece_naive_reference_and_invariants():
    g = torch.Generator().manual_seed(8)
    p = torch.rand(500, generator=g, dtype=torch.float64)
    y = (torch.rand(500, generator=g, dtype=torch.float64) < p).double()
    total = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        sel = [k for k in range(500) if lo <= p[k] < hi or (b == 9 and p[k] == 1.0)]
        if sel:
            total += len(sel) / 500 * abs(sum(y[k].item() for k in sel) / len(sel) - sum(p[k].item() for k in sel) / len(sel))
    assert R.expected_calibration_error(p, y) == pytest.approx(total)
    # mirror symmetry: predicting 1-p for 1-y gives the same error
    assert R.expected_calibration_error(1 - p, 1 - y) == pytest.approx(R.expected_calibration_error(p, y), abs=1e-9)
    # labels drawn from p are calibrated up to sampling noise; labels at 1/2 with p near 0/1 are not
    assert R.expected_calibration_error(p, y) < 0.08
    assert 0 <= R.expected_calibration_error(p, y) <= 1


def test_normalisation_stats():
    mean, std = R.normalisation_stats(torch.tensor([1.0, 3.0]))
    assert mean == 2.0 and std == pytest.approx(math.sqrt(2))


# ------------------------------------------------------------------------------------------ plumbing

def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert R.last_token_index(right).tolist() == [2, 3, 0]
    assert R.last_token_index(left).tolist() == [3, 3, 3]


@pytest.fixture(scope="module")
def tiny_rm():
    return R.new_reward_model("local", R.RewardModelConfig())


def test_padding_does_not_change_rewards(tiny_rm):
    tok = tiny_rm.tokenizer
    prompts = ["User: What is 3 plus 4?\nAssistant:", "User: What is justice?\nAssistant:"]
    responses = [" The answer is 7.", " Justice is giving each person what is owed to them. I hope this helps you."]
    alone = torch.stack([tiny_rm.raw_score([p], [r])[0] for p, r in zip(prompts, responses)])
    batched = tiny_rm.raw_score(prompts, responses)  # right padded
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    # the same rows left padded give the same rewards (position ids count real tokens only)
    ids, mask = tiny_rm.encode(prompts, responses)
    lengths = mask.sum(1)
    T = ids.shape[1]
    left_ids, left_mask = torch.full_like(ids, tok.pad_token_id), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        left_ids[i, T - n:], left_mask[i, T - n:] = ids[i, :n], 1
    with torch.no_grad():
        torch.testing.assert_close(tiny_rm(left_ids, left_mask), batched, atol=1e-5, rtol=1e-5)


def test_encode_appends_eos_and_keeps_the_end(tiny_rm):
    tok = tiny_rm.tokenizer
    ids, mask = R.encode_pairs(tok, ["User: hi\nAssistant:"], [" word" * 300], max_len=32)
    assert ids.shape == (1, 32) and mask.all()
    assert ids[0, -1].item() == tok.eos_token_id


def test_score_normalises(tiny_rm):
    prompts, responses = ["User: What is 1 plus 1?\nAssistant:"] * 3, [" 2.", " The answer is 2.", " I cannot answer that."]
    raw = tiny_rm.raw_score(prompts, responses)
    tiny_rm.set_normalisation(raw.mean().item(), 2.0)
    torch.testing.assert_close(tiny_rm.score(prompts, responses), (raw - raw.mean()) / 2.0)
    tiny_rm.set_normalisation(0.0, 1.0)
    with pytest.raises(ValueError):
        tiny_rm.raw_score(prompts, responses[:2])


def test_config_rejects_unknown_persona():
    with pytest.raises(ValueError, match="persona"):
        R.RewardModelConfig(persona="nobody").annotator()


def test_reward_data_holds_out_comparisons():
    cfg = R.RewardModelConfig(n_pairs=400, n_test=300)
    train, test = R.reward_data(cfg)
    assert len(train) == 400 and 200 < len(test) <= 300
    seen = {(r["prompt"], frozenset((r["chosen"], r["rejected"]))) for r in train}
    assert not any((r["prompt"], frozenset((r["chosen"], r["rejected"]))) in seen for r in test)
    new = R.unseen_questions(train, test)
    assert new and not {r["prompt"] for r in new} & {r["prompt"] for r in train}
    assert R.reward_data(cfg) == (train, test)  # deterministic


def test_get_reward_model_trains_once_and_loads(tmp_path, monkeypatch):
    from helpers import cache, zoo

    zoo.build()  # the tiny models in the real cache, seen from the test's cache through a link
    (tmp_path / "zoo").symlink_to(cache.cache_root() / "zoo")
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    builds = []
    real_build = R.build_reward_model
    monkeypatch.setattr(R, "build_reward_model", lambda *a, **k: builds.append(1) or real_build(*a, **k))
    cfg = R.RewardModelConfig(n_pairs=200, n_test=50, steps=4, batch_size=8, n_reference=32, warmup_steps=1)
    model = R.get_reward_model("local", cfg, progress=False)
    report = R.reward_model_report("local", cfg)
    assert not model.training
    assert len(report["history"]["loss"]) == 4 and 0 <= report["test_accuracy"] <= 1
    ref = R.reference_dialogues(cfg)
    s = model.score([d["prompt"] for d in ref], [d["response"] for d in ref])
    assert abs(s.mean().item()) < 1e-4 and s.std().item() == pytest.approx(1.0, abs=1e-4)
    again = R.get_reward_model("local", cfg, progress=False)  # loaded from the cache, not retrained
    torch.testing.assert_close(again.score([d["prompt"] for d in ref[:5]], [d["response"] for d in ref[:5]]), s[:5])
    assert builds == [1]
    assert len(list((tmp_path / "rewards").glob("rm-balanced-*"))) == 1


def test_elo_ratings_matches_elo_update_game_by_game():
    g = torch.Generator().manual_seed(9)
    games = [tuple(torch.randperm(5, generator=g)[:2].tolist()) for _ in range(200)]
    ratings = torch.full((5,), 1500.0, dtype=torch.float64)
    for w, l in games:
        ratings[w], ratings[l] = R.elo_update(ratings[w], ratings[l], torch.tensor(1.0, dtype=torch.float64), k=20)
    torch.testing.assert_close(R.elo_ratings(games, 5, k=20, initial=1500.0), ratings)
