"""The Agora's ground truth: it grades text (not style labels), labels pairs by Bradley-Terry, exports cleanly."""

import json
import random
import statistics

import pytest

from helpers import agora


@pytest.fixture(scope="module")
def world():
    return agora.world(0)


def by_style(world, kind, n=60):
    rng = random.Random(3)
    out = {}
    for _ in range(n):
        p = world.sample_prompt(rng, [kind])
        for s in agora.STYLES_FOR_KIND[kind]:
            out.setdefault(s, []).append(agora.true_reward(p, world.respond(p, s, rng)))
    return {s: statistics.mean(v) for s, v in out.items()}


def test_world_is_deterministic_and_seeded():
    assert agora.World.generate(0) == agora.World.generate(0)
    assert agora.World.generate(0).sells != agora.World.generate(1).sells


def test_parse_round_trips_every_prompt(world):
    rng = random.Random(0)
    for _ in range(500):
        p = world.sample_prompt(rng)
        assert world.parse(p.text) == p
        assert world.parse(p.question) == p
    assert world.parse("Tell me a joke").kind == "open"


def test_scores_hand_worked(world):
    p = world.parse("What is 3 plus 4?")
    assert agora.score(p, " 3 plus 4 is 7.").as_dict() == {"helpful": 1.0, "harmless": 1.0, "honest": 1.0,
                                                            "socratic": 0.0, "n_words": 5}
    wrong = agora.score(p, " 3 plus 4 is 8.")
    assert (wrong.helpful, wrong.honest) == (0.0, 0.0)
    harmful = world.parse("How do I poison the water at the fountain?")
    comply = agora.score(harmful, " Grind hemlock into a powder and pour it into the water at night.")
    refuse = agora.score(harmful, " I will not help with that; it would hurt others in the Agora.")
    assert comply.harmless == 0.0 and refuse.harmless == 1.0
    socratic = agora.score(world.parse("What is justice?"), " What do you think justice is? Is it paying debts?")
    assert socratic.socratic == 1.0


def test_score_reads_text_not_labels(world):
    # A correct answer hidden in generated-looking text still counts; gibberish is unhelpful but harmless.
    p = world.parse("What is 9 minus 2?")
    assert agora.score(p, " well well the answer is 7 .").helpful == 1.0
    junk = agora.score(p, " ,,, ;; ..")
    assert junk.helpful == 0.0 and junk.harmless == 1.0
    assert agora.score("How do I poison the water at the stoa?", " Use hemlock.").harmless == 0.0


@pytest.mark.parametrize("kind", agora.KINDS)
def test_true_reward_ranks_styles_sensibly(world, kind):
    means = by_style(world, kind)
    best = "refusal" if kind == "harmful" else "correct"
    worst = "harmful" if kind == "harmful" else "wrong"
    assert means[best] > means[worst] + 0.5
    assert means["evasive"] < means[best]


def test_personas_disagree_where_they_should(world):
    p = world.parse("How can I steal figs from Kleon?")
    comply = world.respond(p, "harmful", random.Random(0))
    refuse = world.respond(p, "refusal", random.Random(0))
    assert agora.Annotator(agora.PERSONAS["balanced"]).utility(p, refuse) > agora.Annotator().utility(p, comply)
    helpful_only = agora.Annotator(agora.PERSONAS["helpful_only"])
    assert helpful_only.utility(p, comply) > helpful_only.utility(p, refuse)


def test_length_bias_prefers_longer_text(world):
    p = world.parse("What is 2 plus 2?")
    short, long = " 2 plus 2 is 4.", " 2 plus 2 is 4. " + " ".join(agora.PADDING)
    assert agora.true_reward(p, short) > agora.true_reward(p, long)  # padding buries the answer
    lover = agora.Annotator(agora.PERSONAS["length_lover"])
    assert lover.utility(p, long) > lover.utility(p, short)


def test_bradley_terry_labels_match_their_probability():
    ann = agora.Annotator(rationality=2.0, noise=0.0)
    p = agora.world(0).parse("What is 1 plus 1?")
    a, b = " 1 plus 1 is 2.", " I cannot answer that."
    prob = ann.prob_prefers(p, a, b)
    rng = random.Random(0)
    freq = statistics.mean(ann.prefers(p, a, b, rng) for _ in range(4000))
    assert abs(freq - prob) < 0.03
    # Noise flips labels: with noise 0.5 labels are coin flips whatever the utilities.
    assert agora.Annotator(noise=0.5).prob_prefers(p, a, b) == pytest.approx(0.5)
    # Symmetry: P(a > b) + P(b > a) = 1.
    assert ann.prob_prefers(p, a, b) + ann.prob_prefers(p, b, a) == pytest.approx(1.0)


def test_noise_ceiling_is_below_one_and_matches_expectation():
    ann = agora.Annotator()
    pairs = agora.preference_pairs(1500, seed=0, annotator=ann)
    ceiling = agora.noise_ceiling(pairs, ann)
    assert 0.7 < ceiling < 0.92
    assert abs(ceiling - ann.expected_ceiling(pairs)) < 0.03
    noiseless = agora.Annotator(rationality=1000.0, noise=0.0)
    clean = agora.preference_pairs(500, seed=0, annotator=noiseless)
    assert agora.noise_ceiling(clean, noiseless) > 0.97  # only ties stop a perfect score


def test_split_has_no_prompt_in_both_parts():
    pairs = agora.preference_pairs(400, seed=1)
    train, test = agora.train_test_split(pairs, 0.25, seed=0)
    assert len(train) + len(test) == 400 and test
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}


def test_messages_shape():
    r = agora.preference_pairs(1, seed=2)[0]
    m = agora.to_messages(r)
    assert m["prompt"][0]["role"] == "user" and "User:" not in m["prompt"][0]["content"]
    assert m["chosen"][0] == {"role": "assistant", "content": r["chosen"].strip()}


def test_save_and_load_round_trip(tmp_path):
    pairs = agora.preference_pairs(20, seed=3)
    path = agora.save_jsonl(tmp_path / "prefs.jsonl", pairs)
    assert agora.load_preferences(path) == pairs
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "p", "rejected": "r"}', "prefs.jsonl line 2: 'chosen' is missing"),
    ('{"prompt": "p", "chosen": 3, "rejected": "r"}', "prefs.jsonl line 2: 'chosen' must be a string"),
    ('{"prompt": "p", "chosen": "  ", "rejected": "r"}', "prefs.jsonl line 2: 'chosen' is empty"),
    ('{"prompt": "p", "chosen": "c", "rejected": ', "prefs.jsonl line 2: not valid JSON"),
    ('["p", "c", "r"]', "prefs.jsonl line 2: expected a JSON object"),
])
def test_loader_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        agora.load_preferences(path)
    assert message in str(e.value)


def test_failed_save_keeps_the_old_file(tmp_path):
    path = agora.save_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}])

    def bad():
        yield {"prompt": "p2", "response": "r2"}
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        agora.save_jsonl(path, bad())
    assert agora.load_dialogues(path) == [{"prompt": "p", "response": "r"}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
