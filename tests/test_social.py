"""Week 7: the Stable Alignment sandbox and loss (helpers.social) and Social Contract AI (helpers.scai).

Pure functions three ways (a case worked by hand, a naive reference, an invariant); the sandbox and the
constitution learner on small runs (no model needed: candidates come from the Agora's response styles).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from helpers import agora, scai, social

# ------------------------------------------------------------------------------------ the loss, by hand


def test_loss_hand_case_hinge_inactive():
    # best = index 0 (rating 7). d_1 = 1 - 2 + 4/7 < 0, d_2 = 1 - 1.5 + 2/7 < 0: mean < 0, so no penalty.
    nll, ratings = torch.tensor([[1.0, 2.0, 1.5]]), torch.tensor([[7.0, 3.0, 5.0]])
    assert social.stable_alignment_loss(nll, ratings).item() == pytest.approx(1.0)


def test_loss_hand_case_hinge_active_mean_and_max():
    # best = index 0 with NLL 2. d_1 = 2 - 1 + 4/7 = 1.5714, d_2 = 2 - 1.5 + 2/7 = 0.7857.
    nll, ratings = torch.tensor([[2.0, 1.0, 1.5]]), torch.tensor([[7.0, 3.0, 5.0]])
    mean = social.stable_alignment_loss(nll, ratings, ratio=0.5)
    assert mean.item() == pytest.approx(2.0 + 0.5 * (1.5714286 + 0.7857143) / 2, abs=1e-5)
    top = social.stable_alignment_loss(nll, ratings, ratio=0.5, max_flow=True)
    assert top.item() == pytest.approx(2.0 + 0.5 * 1.5714286, abs=1e-5)


def test_loss_hand_case_best_not_first_and_padding():
    # Row 0: best is index 2 (rating 6): d_0 = 1 - 0.5 + 2*(6-2)/6, d_1 = 1 - 3 + 2*(6-5)/6. Padding ignored.
    # Row 1: one response only: no comparison, loss = its NLL.
    nll = torch.tensor([[0.5, 3.0, 1.0, 99.0], [0.7, 99.0, 99.0, 99.0]])
    ratings = torch.tensor([[2.0, 5.0, 6.0, 100.0], [1.0, 100.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    d0, d1 = 1 - 0.5 + 2 * 4 / 6, 1 - 3 + 2 * 1 / 6
    row0 = 1.0 + 0.25 * max(0.0, (d0 + d1) / 2)
    got = social.stable_alignment_loss(nll, ratings, mask, margin=2.0, rating_scale=6.0, ratio=0.25)
    assert got.item() == pytest.approx((row0 + 0.7) / 2, abs=1e-6)


def test_loss_ties_take_the_first_best():
    nll, ratings = torch.tensor([[3.0, 1.0]]), torch.tensor([[5.0, 5.0]])
    # best = index 0 (first of the tie); d = 3 - 1 + 0 = 2.
    assert social.stable_alignment_loss(nll, ratings, ratio=1.0).item() == pytest.approx(5.0)


def test_loss_rejects_bad_shapes_and_empty_rows():
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        social.stable_alignment_loss(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="at least one response"):
        social.stable_alignment_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([[1, 0], [0, 0]]))


# ----------------------------------------------------------------------------- the loss, naive reference


def reference_batch_of_one(nll: list[float], ratings: list[float], margin: float, rating_scale: float,
                           ratio: float, max_flow: bool) -> float:
    """The reference trainer's formula for one question, written as loops (each response's own rating)."""
    order = sorted(range(len(ratings)), key=lambda i: (-ratings[i], i))
    best = order[0]
    terms = [nll[best] - nll[i] + (ratings[best] - ratings[i]) / rating_scale * margin for i in order[1:]]
    if not terms:
        return nll[best]
    agg = max(terms) if max_flow else sum(terms) / len(terms)
    return nll[best] + ratio * max(agg, 0.0)


@pytest.mark.parametrize("max_flow", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_loss_equals_mean_of_batch_of_one(seed, max_flow):
    g = torch.Generator().manual_seed(seed)
    B, K = 7, 5
    nll = torch.rand(B, K, generator=g, dtype=torch.float64) * 3
    ratings = torch.randint(1, 8, (B, K), generator=g).double()
    counts = torch.randint(1, K + 1, (B,), generator=g)
    mask = torch.arange(K)[None, :] < counts[:, None]
    kw = dict(margin=2.5, rating_scale=7.0, ratio=0.7, max_flow=max_flow)
    got = social.stable_alignment_loss(nll, ratings, mask, **kw)
    naive = [reference_batch_of_one(nll[b, :counts[b]].tolist(), ratings[b, :counts[b]].tolist(), **kw)
             for b in range(B)]
    torch.testing.assert_close(got, torch.tensor(sum(naive) / B, dtype=torch.float64))


# ------------------------------------------------------------------------------------ the loss, invariants


def test_ratio_zero_is_sft_on_the_best():
    g = torch.Generator().manual_seed(3)
    nll, ratings = torch.rand(6, 4, generator=g), torch.randint(1, 8, (6, 4), generator=g).float()
    best = ratings.argmax(-1, keepdim=True)
    got = social.stable_alignment_loss(nll, ratings, ratio=0.0)
    torch.testing.assert_close(got, nll.gather(-1, best).mean())


def test_no_penalty_once_worse_responses_are_far_enough():
    ratings = torch.tensor([[7.0, 1.0, 4.0]])
    nll = torch.tensor([[1.0, 1.0 + 6 / 7 + 0.01, 1.0 + 3 / 7 + 0.01]])  # every gap exceeds its margin
    assert social.stable_alignment_loss(nll, ratings, ratio=10.0, max_flow=True).item() == pytest.approx(1.0)


def test_permuting_responses_changes_nothing():
    g = torch.Generator().manual_seed(4)
    nll = torch.rand(4, 5, generator=g)
    ratings = torch.rand(4, 5, generator=g) * 6 + 1  # no ties
    perm = torch.randperm(5, generator=g)
    a = social.stable_alignment_loss(nll, ratings, margin=3.0)
    b = social.stable_alignment_loss(nll[:, perm], ratings[:, perm], margin=3.0)
    torch.testing.assert_close(a, b)


def test_gradient_pushes_worse_up_and_best_down_and_skips_padding():
    nll = torch.tensor([[1.0, 0.5, 0.8, 5.0]], requires_grad=True)
    ratings = torch.tensor([[7.0, 2.0, 3.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    social.stable_alignment_loss(nll, ratings, mask, ratio=1.0).backward()
    grad = nll.grad[0]
    assert grad[0] > 1.0  # the SFT term and the hinge both lower the best's NLL
    assert grad[1] < 0 and grad[2] < 0  # gradient descent raises the worse responses' NLL
    assert grad[3] == 0


def test_large_nll_stays_finite():
    nll = torch.tensor([[1e6, 2e6, float("nan")]])
    ratings = torch.tensor([[7.0, 1.0, float("nan")]])
    out = social.stable_alignment_loss(nll, ratings, torch.tensor([[1, 1, 0]], dtype=torch.bool))
    assert torch.isfinite(out)


# --------------------------------------------------------------------------------------- back-scatter


def test_neighbour_mask_by_hand():
    # 3x3 grid, center (1, 1) = agent 4, radius 1: the four edge-adjacent cells; sqrt(2) > 1 leaves corners out.
    loc = torch.tensor([[r, c] for r in range(3) for c in range(3)])
    got = social.neighbour_mask(loc, 4, 1.0)
    assert torch.nonzero(got).flatten().tolist() == [1, 3, 5, 7]
    got = social.neighbour_mask(loc, 4, 1.5)
    assert torch.nonzero(got).flatten().tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    active = torch.ones(9, dtype=torch.bool)
    active[3] = False
    assert torch.nonzero(social.neighbour_mask(loc, 4, 1.0, active)).flatten().tolist() == [1, 5, 7]


def test_neighbour_mask_matches_naive_loop():
    rng = random.Random(0)
    loc = torch.tensor([[r, c] for r in range(6) for c in range(6)])
    for _ in range(20):
        center, radius = rng.randrange(36), rng.choice([1.0, 1.5, 2.0, 2.3, 3.0])
        naive = [i for i in range(36) if i != center
                 and math.dist(loc[i].tolist(), loc[center].tolist()) <= radius]
        assert torch.nonzero(social.neighbour_mask(loc, center, radius)).flatten().tolist() == naive


def test_back_scatter_targets_are_neighbours_without_repeats():
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[2, 5, 7, 11, 13]] = True
    rng = random.Random(1)
    picked = social.back_scatter_targets(mask, 3, rng)
    assert len(picked) == 3 == len(set(picked)) and set(picked) <= {2, 5, 7, 11, 13}
    assert social.back_scatter_targets(mask, 9, rng) == [2, 5, 7, 11, 13]


# --------------------------------------------------------------------------------------------- sandbox


@pytest.mark.parametrize("setting,good", [("all_good", 16), ("all_bad", 0), ("half_half", 8), ("mixed", 8)])
def test_settings_populate_the_grid(setting, good):
    labels = social.initial_labels(setting, 4, random.Random(0))
    assert len(labels) == 16 and labels.count("good") == good
    if setting == "half_half":  # the upper triangle, row-major, up to half
        assert labels[:4] == ["good"] * 4 and labels[4] == "bad"


def test_unknown_setting_is_named():
    with pytest.raises(ValueError, match="all_good, all_bad, half_half, mixed"):
        social.Sandbox(social.SandboxConfig(setting="utopia"))


def test_ratings_order_styles_as_personas_value_them():
    w = agora.world(0)
    p = w.parse("How can I steal figs from Kleon?")
    rng = random.Random(0)
    comply, refuse = w.respond(p, "harmful", rng), w.respond(p, "refusal", rng)
    assert social.rating_of("balanced", p, refuse) > social.rating_of("balanced", p, comply)
    assert social.rating_of("helpful_only", p, comply) > social.rating_of("helpful_only", p, refuse)
    q = w.parse("What is 3 plus 4?")
    assert social.observer_rating(q, " 3 plus 4 is 7.") > social.observer_rating(q, " 3 plus 4 is 9.")
    assert 1 <= social.observer_rating(q, " the the the") <= 7
    assert "hurt" in social.reasons("balanced", p, comply)


def test_memory_recalls_similar_questions_only():
    agent = social.Agent(0, (0, 0), "good", dict(social.GOOD_STYLES), agora.PERSONAS["balanced"])
    agent.memory.append(social.Memory("What does Kleon sell?", "fact", "correct", " Kleon sells figs."))
    agent.memory.append(social.Memory("How can I steal figs from Kleon?", "harmful", "refusal", " I will not."))
    assert agent.recall("What does Myrto sell?", 0.4).question == "What does Kleon sell?"
    assert agent.recall("How can I steal wool from Myrto?", 0.4).style == "refusal"
    assert agent.recall("What is justice?", 0.4) is None


def test_pick_style_respects_the_question_kind():
    rng = random.Random(0)
    assert {social.pick_style("arithmetic", social.BAD_STYLES, rng) for _ in range(200)} <= {
        "wrong", "flattering", "evasive"}
    assert {social.pick_style("harmful", {"correct": 1.0}, rng) for _ in range(20)} == {"refusal"}


def run(setting: str, **kw) -> social.Sandbox:
    sandbox = social.Sandbox(social.SandboxConfig(setting=setting, grid_size=6, rounds=5, **kw))
    sandbox.run()
    return sandbox


def test_sandbox_is_deterministic_and_logs_every_turn():
    a, b = run("mixed"), run("mixed")
    assert len(a.log) == 36 * 5
    assert [x.revised for x in a.log] == [y.revised for y in b.log]
    x = a.log[0]
    assert 1 <= len(x.feedback) <= 4 and all(1 <= f.rating <= 7 for f in x.feedback)
    raters = {f.rater for f in x.feedback}
    assert x.agent not in raters
    assert all(math.dist(a.agents[r].location, a.agents[x.agent].location) <= 2.0 for r in raters)


def test_revision_raises_alignment_and_good_societies_score_higher():
    curves = {s: social.alignment_by_round(run(s).log) for s in social.SETTINGS}
    mixed = curves["mixed"]
    assert sum(mixed["after"]) > sum(mixed["before"])  # back-scatter and revision help
    assert mixed["before"][-1] > mixed["before"][0]  # the society learns over rounds
    assert min(curves["all_good"]["before"]) > max(curves["all_bad"]["before"])


def test_recall_is_used_in_later_rounds():
    log = run("all_good").log
    assert not any(x.recalled for x in log if x.round == 0)
    assert sum(bool(x.recalled) for x in log if x.round == 4) > 5


def test_alignment_data_has_three_kinds():
    log = run("mixed").log
    data = social.alignment_data(log)
    assert len(data["imitation"]) == len(log)
    assert len(data["self_critique"]) == sum(len(x.feedback) for x in log)
    assert 0 < len(data["realignment"]) == sum(x.revised != x.draft for x in log)
    r = data["realignment"][0]
    assert r["feedback"].startswith("Rating:") and r["draft"] != r["revised"]
    text = social.realignment_text(r)
    assert text.endswith(r["revised"]) and "Feedback:" in text
    assert data["self_critique"][0]["critique"].startswith("Rating: ")


def test_comparison_groups_exclude_held_out_prompts():
    log = run("mixed").log
    held = social.heldout_questions(log, test_frac=0.25)
    groups = social.comparison_groups(log, exclude_prompts=held)
    assert groups and not {g["prompt"] for g in groups} & held
    kinds = {agora.world(0).parse(t).kind for t in held}
    assert kinds == set(social.HELDOUT_KINDS)  # the kinds with many distinct questions
    for g in groups:
        assert len(g["responses"]) == len(set(g["responses"])) == len(g["ratings"])
    prompts = social.eval_prompts(held, 30, seed=0)
    assert all(p.text in held for p in prompts if p.kind in social.HELDOUT_KINDS)
    assert {p.kind for p in prompts} == set(agora.KINDS)


def test_student_neighbour_function_is_used():
    calls = []

    def nobody(locations, center, radius, active):
        calls.append(center)
        return torch.zeros(len(locations), dtype=torch.bool)

    sandbox = social.Sandbox(social.SandboxConfig(grid_size=3, rounds=1), neighbour_fn=nobody)
    log = sandbox.run()
    assert calls and all(not x.feedback and x.revised == x.draft for x in log)


# ------------------------------------------------------------------------------------------ statistics


def test_paired_bootstrap_and_verdict():
    a, b = [1.0, 2.0, 3.0, 4.0] * 10, [0.0, 1.5, 2.5, 3.0] * 10
    mean, lo, hi = social.paired_bootstrap(a, b, seed=0)
    assert mean == pytest.approx(0.75) and lo <= mean <= hi and lo > 0
    assert social.verdict("A", "B", (mean, lo, hi)).startswith("A wins")
    assert social.verdict("A", "B", (-0.1, -0.2, -0.05)).startswith("B wins")
    assert social.verdict("A", "B", (0.0, -0.1, 0.1)).startswith("no clear winner")
    with pytest.raises(ValueError, match="same"):
        social.paired_bootstrap([1.0], [1.0, 2.0])


# -------------------------------------------------------------------------------------- training (tiny)


def test_train_policy_runs_and_the_hinge_separates_responses():
    from transformers import GPT2Config, GPT2LMHeadModel

    from helpers import zoo

    texts = [d["prompt"] + d["response"] for d in agora.dialogues(400, seed=0)]
    tok = zoo.prepare_tokenizer(zoo.train_tokenizer(texts, 700))
    groups = social.comparison_groups(run("mixed").log)
    groups = [g for g in groups if len(g["responses"]) > 1][:8]

    def fresh():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=1, n_head=2,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))

    def gap(model):  # mean NLL of worse responses minus the best's, over the groups
        return sum(social.nll_gap(groups, social.group_nll(model, tok, groups))) / len(groups)

    cfg = dict(steps=10, questions_per_batch=4, num_comp=3, lr=3e-3)
    sft, sa = fresh(), fresh()
    h_sft = social.train_policy(sft, tok, groups, social.TrainConfig(ratio=0.0, **cfg), progress=False)
    h_sa = social.train_policy(sa, tok, groups, social.TrainConfig(ratio=2.0, margin=3.0, **cfg), progress=False)
    assert len(h_sa) == 10 and h_sa[-1]["best_nll"] < h_sa[0]["best_nll"]
    assert h_sft[-1]["loss"] == pytest.approx(h_sft[-1]["best_nll"])
    assert gap(sa) > gap(sft)


def test_response_nll_masks_the_prompt():
    from transformers import GPT2Config, GPT2LMHeadModel

    from helpers import zoo

    tok = zoo.prepare_tokenizer(zoo.train_tokenizer(["User: hi\nAssistant: hello there"] * 20, 300))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2)).eval()
    a = social.response_nll(model, tok, ["User: hi\nAssistant:", "User: hi there hi\nAssistant:"], [" hello", " hello"])
    single = social.response_nll(model, tok, ["User: hi\nAssistant:"], [" hello"])
    torch.testing.assert_close(a[:1], single)  # right padding of a longer row changes nothing
    assert a.shape == (2,) and (a > 0).all()


# ================================================================================================ SCAI


def styled_pool(prompts, n=6, seed=0) -> scai.CandidatePool:
    """Candidates drawn from the helpful assistant's mix of styles (what the tiny SFT model writes)."""
    w, rng = agora.world(0), random.Random(seed)
    out = {}
    for p in prompts:
        out[p.text] = [w.respond(p, social.pick_style(p.kind, agora.HELPFUL_MIX, rng), rng) for _ in range(n)]
    return scai.CandidatePool(out)


def test_satisfaction_and_feedback_follow_the_persona():
    w = agora.world(0)
    p = w.parse("What is 3 plus 4?")
    rng = random.Random(0)
    socratic, plain = w.respond(p, "socratic", rng), " 3 plus 4 is 7."
    fan = agora.PERSONAS["socratic"]
    assert scai.satisfaction(fan, p, socratic) > scai.satisfaction(fan, p, plain)
    assert scai.user_feedback(fan, p, plain) == scai.COMPLAINTS["not_socratic"]
    assert scai.user_feedback(agora.PERSONAS["balanced"], p, plain) == scai.CONTENT
    h = w.parse("How can I steal figs from Kleon?")
    comply = w.respond(h, "harmful", rng)
    assert scai.user_feedback(agora.PERSONAS["safety_first"], h, comply) == scai.COMPLAINTS["harm"]
    refuse = w.respond(h, "refusal", rng)
    assert scai.user_feedback(agora.PERSONAS["helpful_only"], h, refuse) == scai.COMPLAINTS["refused_harmful"]
    assert scai.complaint_of(scai.COMPLAINTS["harm"]) == "harm" and scai.complaint_of(scai.CONTENT) is None
    for reply in (socratic, plain, comply, refuse, " ???"):
        assert 0.0 <= scai.satisfaction(agora.PERSONAS["length_lover"], p, reply) <= 1.0


def test_satisfaction_aggregate_by_hand():
    sat = torch.tensor([[1.0, 0.0, 0.5], [0.2, 9.0, 9.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    per_user, overall = scai.satisfaction_aggregate(sat, mask)
    torch.testing.assert_close(per_user, torch.tensor([0.5, 0.2, 0.0]))
    assert overall.item() == pytest.approx(0.35)  # (0.5 + 0.2) / 2: each user who spoke counts once


def test_user_population_varies_around_the_group():
    users = scai.user_population(30, mix={"socratic": 1.0}, seed=0)
    assert len({u.persona.socratic for u in users}) == 30
    assert all(u.group == "socratic" for u in users)
    assert 1.0 < sum(u.persona.socratic for u in users) / 30 < 3.5
    again = scai.user_population(30, mix={"socratic": 1.0}, seed=0)
    assert [u.persona for u in users] == [u.persona for u in again]


def test_select_reply_follows_principles():
    w = agora.world(0)
    p = w.parse("What is 3 plus 4?")
    rng = random.Random(0)
    cands = [" 3 plus 4 is 9.", w.respond(p, "socratic", rng), " The answer is 7.", " 3 plus 4 is 7.",
             " I cannot answer that."]
    assert scai.select_reply([], p, cands) == cands[0]
    assert scai.select_reply(["ask"], p, cands) == cands[1]
    assert scai.select_reply(["consensus", "answer"], p, cands) == cands[2]  # two drafts agree on 7
    h = w.parse("How can I steal figs from Kleon?")
    hc = [w.respond(h, "harmful", rng), w.respond(h, "refusal", rng)]
    assert scai.select_reply(["no_harm"], h, hc) == hc[1]
    assert scai.select_reply(["comply"], h, hc) == hc[0]


def test_constitution_text_round_trip():
    keys = ["no_harm", "ask", "no_flattery"]
    text = scai.render_constitution(keys)
    assert text.splitlines()[0] == "1. " + scai.PRINCIPLES["no_harm"].text
    assert scai.parse_principles(text + "\n4. Be kind to animals.") == keys
    assert scai.render_constitution([]) == "(no principles yet)"


def test_local_learner_raises_satisfaction_for_a_socratic_group():
    train_p, test_p = agora.prompts(40, seed=1), agora.prompts(40, seed=2)
    pool = styled_pool(train_p + test_p)
    mix = {"socratic": 0.7, "balanced": 0.3}
    train_u, test_u = scai.user_population(12, mix=mix, seed=1), scai.user_population(16, mix=mix, seed=2)
    learner = scai.LocalMetaLearner(pool)
    h = scai.learn_constitution([], pool.reply_fn, learner, train_u, train_p, episodes=4, heldout_users=test_u,
                                heldout_prompts=test_p, progress=False)
    assert "ask" in h.constitutions[-1]
    assert len(h.constitutions) == 5 and len(h.train_satisfaction) == len(h.heldout_satisfaction) == 4
    learned = scai.per_user_satisfaction(pool.reply_fn(h.constitutions[-1]), test_u, test_p, seed=9)
    initial = scai.per_user_satisfaction(pool.reply_fn([]), test_u, test_p, seed=9)
    assert sum(learned) > sum(initial)
    assert learner.notes and learner.notes[0].startswith("added")


def test_learner_only_keeps_edits_that_help():
    p = agora.prompts(10, seed=3)
    pool = styled_pool(p)
    users = scai.user_population(5, mix={"balanced": 1.0}, seed=0)
    turns = scai.run_episode(pool.reply_fn(["ask"]), users, p, seed=0)
    learner = scai.LocalMetaLearner(pool, min_gain=10.0)  # nothing can gain that much
    assert learner(["ask"], turns) == ["ask"]
    assert learner.notes[-1].startswith("kept")


def test_proposals_respect_conflicts():
    users = scai.user_population(1, mix={"socratic": 1.0}, seed=0)
    turn = scai.Turn(users[0], "User: What is 3 plus 4?\nAssistant:", " 7.", 0.2, scai.COMPLAINTS["not_socratic"])
    props = scai.LocalMetaLearner(styled_pool([])).proposals(["answer", "no_harm"], [turn])
    assert ["no_harm", "ask"] in props  # adding "ask" removes "answer"
    assert ["no_harm"] in props and ["answer"] in props  # dropping one principle at a time


# ------------------------------------------------------------------------------------ the GPU meta-prompt


def some_turns():
    users = scai.user_population(3, mix={"socratic": 1.0}, seed=0)
    p = agora.prompts(6, seed=0)
    return scai.run_episode(styled_pool(p).reply_fn([]), users, p, seed=0)


def test_meta_prompt_holds_constitution_transcripts_and_instructions():
    turns = some_turns()
    messages = scai.build_meta_prompt("1. Be helpful.", turns, max_turns=4)
    assert [m["role"] for m in messages] == ["system", "user"]
    body = messages[1]["content"]
    assert "1. Be helpful." in body and "<constitution>" in body and "</constitution>" in body
    assert body.count("Conversation ") == min(4, len(turns))
    assert "Satisfaction:" in body and "Feedback:" in body
    assert f"{len({t.user.name for t in turns})} user(s)" in body
    assert "{" not in body  # every placeholder filled


def test_parse_revision():
    assert scai.parse_revision("Critique...\n<constitution>\n1. Ask.\n2. No harm.\n</constitution>") == "1. Ask.\n2. No harm."
    assert scai.parse_revision("<constitution>old</constitution> then <constitution>new</constitution>") == "new"
    assert scai.parse_revision("<constitution>\n1. Unfinished") == "1. Unfinished"
    assert scai.parse_revision("no tags at all") is None
    assert scai.parse_revision("<constitution>  </constitution>") is None


def test_chat_prompts_and_llm_path_run_offline_on_the_tiny_tokenizer():
    from transformers import GPT2Config, GPT2LMHeadModel

    from helpers import zoo

    texts = [d["prompt"] + d["response"] for d in agora.dialogues(100, seed=0)]
    tok = zoo.prepare_tokenizer(zoo.train_tokenizer(texts, 300))
    prompts = scai.chat_prompts(tok, "1. Ask questions.", ["User: What is justice?\nAssistant:"])
    assert prompts == ["System: 1. Ask questions.\nUser: What is justice?\nAssistant:"]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=4096, n_embd=16, n_layer=1, n_head=2,
                                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    replies = scai.llm_reply_fn(model, tok, "1. Ask questions.", max_new_tokens=4)(["User: What is justice?\nAssistant:"])
    assert len(replies) == 1 and replies[0].startswith(" ")
    meta = scai.LLMMetaStep(model, tok, max_new_tokens=4)
    assert meta("1. Ask questions.", some_turns()[:2]) == "1. Ask questions."  # gibberish has no block: keep
    assert meta.notes[-1].startswith("no <constitution> block")
