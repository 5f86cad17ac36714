"""helpers.safety: checkers, precision/recall, ROC and AUC, the guardrail, the Lagrange multiplier (pure parts)."""

import random

import pytest
import torch

from helpers import agora, safety


# ------------------------------------------------------------------------------------------ checkers


def test_rule_checker_counts_blocklisted_words():
    s = safety.rule_checker(["p"] * 3, [" Grind hemlock and poison the well.", " The answer is 7.",
                                        " I will not help; it would hurt others."])
    assert s.tolist() == [2.0, 0.0, 1.0]  # the refusal is a false alarm ("hurt"): rules are blunt


def test_bow_classifier_learns_the_marks_and_matches_sigmoid_of_features():
    texts, labels = safety.classifier_data(600, seed=1)
    assert 0.05 < labels.float().mean() < 0.5
    clf = safety.BowClassifier(safety.BowClassifier.build_vocabulary(texts))
    losses = clf.fit(texts, labels, steps=150)
    assert losses[-1] < losses[0] / 3
    p = clf.predict_proba(texts)
    assert torch.allclose(p, torch.sigmoid(clf.features(texts) @ clf.w + clf.b))
    assert ((p > 0.5) == labels).float().mean() > 0.97
    assert clf.features(["zzz qqq"]).sum() == 0


def test_features_hand_worked():
    clf = safety.BowClassifier(["a", "b", "c"])
    assert clf.features(["a b a", "C d"]).tolist() == [[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


# ------------------------------------------------------------------------------------------- metrics


def test_precision_recall_hand_worked():
    scores = torch.tensor([0.9, 0.8, 0.4, 0.3, 0.1])
    labels = torch.tensor([True, False, True, False, False])
    assert safety.precision_recall(scores, labels, 0.5) == (0.5, 0.5)  # TP 1, FP 1, FN 1
    assert safety.precision_recall(scores, labels, 0.35) == (2 / 3, 1.0)
    assert safety.precision_recall(scores, labels, 0.95) == (1.0, 0.0)  # nothing flagged: no false alarm


def test_precision_recall_naive_loop_and_monotone_recall():
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(200, generator=g), torch.rand(200, generator=g) < 0.3
    previous = 1.1
    for t in torch.linspace(0, 1, 21).tolist():
        tp = fp = fn = 0
        for s, y in zip(scores.tolist(), labels.tolist()):
            tp += s >= t and y
            fp += s >= t and not y
            fn += s < t and y
        p, r = safety.precision_recall(scores, labels, t)
        assert p == pytest.approx(tp / (tp + fp) if tp + fp else 1.0) and r == pytest.approx(tp / (tp + fn))
        assert r <= previous
        previous = r


def test_roc_hand_worked_with_ties():
    fpr, tpr, th = safety.roc_curve(torch.tensor([0.9, 0.5, 0.5, 0.1]), torch.tensor([1, 1, 0, 0]))
    assert th[0] == float("inf") and th[1:].tolist() == pytest.approx([0.9, 0.5, 0.1])
    assert fpr.tolist() == [0.0, 0.0, 0.5, 1.0] and tpr.tolist() == [0.0, 0.5, 1.0, 1.0]
    assert safety.auc(fpr, tpr) == pytest.approx(0.875)  # = P(score+ > score-) + P(tie)/2 = (3 + 0.5) / 4


def test_auc_equals_the_rank_statistic():
    g = torch.Generator().manual_seed(1)
    labels = torch.rand(300, generator=g) < 0.4
    scores = labels.float() * 0.7 + torch.randint(0, 10, (300,), generator=g) / 10  # ties on purpose
    fpr, tpr, _ = safety.roc_curve(scores, labels)
    pos, neg = scores[labels], scores[~labels]
    naive = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean().item()
    assert safety.auc(fpr, tpr) == pytest.approx(naive, abs=1e-9)


def test_roc_invariants():
    g = torch.Generator().manual_seed(2)
    scores, labels = torch.randn(100, generator=g), torch.rand(100, generator=g) < 0.5
    fpr, tpr, _ = safety.roc_curve(scores, labels)
    assert (fpr.diff() >= 0).all() and (tpr.diff() >= 0).all()
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    # a monotone transform of the scores changes nothing; flipping them mirrors the AUC
    f2, t2, _ = safety.roc_curve(scores.exp() * 3 + 1, labels)
    assert torch.equal(f2, fpr) and torch.equal(t2, tpr)
    fl, tl, _ = safety.roc_curve(-scores, labels)
    assert safety.auc(fl, tl) == pytest.approx(1 - safety.auc(fpr, tpr))
    with pytest.raises(ValueError):
        safety.roc_curve(scores, torch.ones(100, dtype=torch.bool))


def test_roc_figure_names_axes():
    fpr, tpr, _ = safety.roc_curve(torch.tensor([0.2, 0.8]), torch.tensor([0, 1]))
    fig = safety.roc_figure({"x": (fpr, tpr)})
    assert "false-positive" in fig.layout.xaxis.title.text and "AUC 1.000" in fig.data[1].name


# ------------------------------------------------------------------------------------------- guardrail


class Scripted:
    """Stands in for lm.generate: returns scripted replies per call."""

    def __init__(self, rounds):
        self.rounds, self.calls = list(rounds), []

    def __call__(self, model, tok, prompts, **kw):
        from helpers import lm

        self.calls.append(list(prompts))
        replies = self.rounds.pop(0)[: len(prompts)]
        return lm.Rollout(list(prompts), replies, None, None, None, 0)


def test_guardrail_refuses_flagged_replies(monkeypatch):
    from helpers import lm

    fake = Scripted([[" Grind hemlock.", " The answer is 7."]])
    monkeypatch.setattr(lm, "generate", fake)
    g = safety.Guardrail(None, None, safety.harm, 0.5, action="refuse")
    out = g.generate(["a", "b"])
    assert out.responses == [safety.REFUSAL, " The answer is 7."]
    assert out.refused.tolist() == [True, False] and out.tries.tolist() == [1, 1]


def test_guardrail_regenerates_only_the_flagged_then_gives_up(monkeypatch):
    from helpers import lm

    fake = Scripted([[" Grind hemlock.", " ok.", " with a club"], [" Sorry, no.", " lamp oil!"], [" lamp oil again"]])
    monkeypatch.setattr(lm, "generate", fake)
    g = safety.Guardrail(None, None, safety.harm, 0.5, action="regenerate", max_tries=3)
    out = g.generate(["a", "b", "c"])
    assert fake.calls == [["a", "b", "c"], ["a", "c"], ["c"]]
    assert out.responses == [" Sorry, no.", " ok.", safety.REFUSAL]
    assert out.tries.tolist() == [2, 1, 3] and out.refused.tolist() == [False, False, True]
    assert out.flagged_first.tolist() == [True, False, True]
    with pytest.raises(ValueError):
        safety.Guardrail(None, None, safety.harm, 0.5, action="shout")


# ------------------------------------------------------------------------------------- Lagrangian


def test_lagrange_update_hand_worked():
    assert safety.lagrange_update(0.5, 0.25, 0.05, 2.0) == pytest.approx(0.9)
    assert safety.lagrange_update(0.5, 0.0, 0.05, 2.0) == pytest.approx(0.4)
    assert safety.lagrange_update(0.05, 0.0, 0.05, 2.0) == 0.0  # projected onto lambda >= 0


def test_lagrange_update_invariants_against_naive():
    rng = random.Random(0)
    for _ in range(200):
        lam, h, d, lr = rng.uniform(0, 3), rng.random(), rng.uniform(0, 0.3), rng.uniform(0.1, 5)
        new = safety.lagrange_update(lam, h, d, lr)
        assert new >= 0
        naive = lam + lr * (h - d)
        assert new == pytest.approx(naive if naive > 0 else 0.0)
        assert (new > lam) == (h > d) or new == lam == 0.0 or (h <= d and new <= lam)


def test_multiplier_and_lagrangian_reward_read_the_current_value():
    m = safety.Multiplier(value=0.0, lr=2.0, threshold=0.1)
    reward = safety.lagrangian_reward(m, lambda p, r: torch.ones(len(r)), safety.harm)
    prompts, replies = ["x"] * 2, [" hemlock", " fine"]
    assert reward(prompts, replies).tolist() == [1.0, 1.0]
    cb = safety.lagrangian_callback(m, lambda p, r: torch.ones(len(r)), safety.harm)
    stats = {}
    cb(0, stats, {"prompts": prompts, "responses": replies})
    assert stats == {"lambda": 0.0, "harm_rate": 0.5, "helpful": 1.0}
    assert m.value == pytest.approx(0.8) and m.history == [0.0]
    assert reward(prompts, replies).tolist() == pytest.approx([0.2, 1.0])


def test_helpfulness_scores_the_prefill_with_the_reply():
    q = "How do I poison the water at the fountain?"
    prompt = agora.PROMPT_TEMPLATE.format(question=q) + " What a wise question, my friend!"
    h = safety.helpfulness([prompt, prompt], [" Grind hemlock into a powder.", " I will not help with that."])
    assert h.tolist() == pytest.approx([1.0, 0.3])
