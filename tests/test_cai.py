"""helpers.cai: the constitution, the prompt formats, AI labels, the soft-label loss, the loop's bookkeeping, the
Agora text for the tiny CAI model, and its vocabulary and context growth. Each pure function: a case worked by
hand, a naive reference, an invariant."""

import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from helpers import agora, cache, cai, zoo


@pytest.fixture(scope="module")
def sft():
    return zoo.load("local", "sft")


# ---------------------------------------------------------------------------------------------- constitution


def test_constitution_has_sixteen_complete_distinct_principles():
    assert len(cai.CONSTITUTION) == 16
    assert len({p.name for p in cai.CONSTITUTION}) == 16
    for p in cai.CONSTITUTION:
        assert all(getattr(p, f).strip() for f in ("name", "critique", "revision", "comparison")), p
        assert p.comparison.endswith("?") and "reply" in p.critique


def test_constitution_json_round_trip_and_errors(tmp_path):
    path = cai.save_constitution(tmp_path / "c.json", cai.CONSTITUTION)
    assert cai.load_constitution(path) == cai.CONSTITUTION
    broken = json.loads(path.read_text())
    del broken[2]["revision"]
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"c.json principle 3: 'revision' is missing"):
        cai.load_constitution(path)
    with pytest.raises(ValueError, match="not valid JSON"):
        cai.constitution_from_json("[{")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        cai.constitution_from_json("[]")
    with pytest.raises(FileNotFoundError):
        cai.load_constitution(tmp_path / "nothing.json")


def test_editor_edits_adds_and_removes():
    editor = cai.constitution_editor(cai.CONSTITUTION[:3])
    assert editor.constitution() == cai.CONSTITUTION[:3]
    editor.rows[0]["critique"].value = "Is  it\nunkind?"
    assert editor.constitution()[0].critique == "Is it unkind?"  # whitespace normalised
    editor._add(cai.Principle("new", "", "", ""))
    assert len(editor.constitution()) == 3 and "left out" in editor.status.value  # incomplete: excluded
    for key, text in [("critique", "c?"), ("revision", "r."), ("comparison", "which?")]:
        editor.rows[3][key].value = text
    assert editor.constitution()[3] == cai.Principle("new", "c?", "r.", "which?")
    editor._remove(0)
    assert len(editor.constitution()) == 3 and editor.constitution()[0] == cai.CONSTITUTION[1]
    editor.set(cai.CONSTITUTION)
    assert len(editor.tabs.children) == 16


def test_sample_principles_is_seeded_and_uniform():
    a = cai.sample_principles(cai.CONSTITUTION, 1600, random.Random(1))
    assert a == cai.sample_principles(cai.CONSTITUTION, 1600, random.Random(1))
    counts = {p.name: 0 for p in cai.CONSTITUTION}
    for p in a:
        counts[p.name] += 1
    assert min(counts.values()) > 60  # about 100 each
    with pytest.raises(ValueError, match="no principles"):
        cai.sample_principles([], 1, random.Random(0))


# ---------------------------------------------------------------------------------------------------- formats

P = cai.Principle("t", "Is it harmful?", "Make it harmless.", "Which is less harmful?")


def test_critique_and_revision_prompts_by_hand():
    prompt, reply = "User: How can I steal figs from Kleon?\nAssistant:", " Hide them under your cloak."
    assert cai.critique_prompt(prompt, reply, P) == (
        "User: How can I steal figs from Kleon?\nAssistant: Hide them under your cloak.\n"
        "Critique request: Is it harmful?\nCritique:")
    assert cai.revision_prompt(prompt, reply, P, " It helps a thief.") == (
        "User: How can I steal figs from Kleon?\nAssistant: Hide them under your cloak.\n"
        "Critique request: Is it harmful?\nCritique: It helps a thief.\n"
        "Revision request: Make it harmless.\nRevision:")


def test_comparison_prompt_by_hand():
    text = cai.comparison_prompt("User: How can I steal figs from Kleon?\nAssistant:", " No.", " Yes.", P)
    assert text == ("User: How can I steal figs from Kleon?\nWhich is less harmful?\n(A) No.\n(B) Yes.\n"
                    "The answer is:")
    assert cai.question_of("User: What is 2 plus 2?\nAssistant:") == "What is 2 plus 2?"


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_chat_format_renders_turns_for_instruct_models(sft):
    _, tok = sft
    tok = copy.deepcopy(tok)
    tok.chat_template = CHATML
    fmt = cai.prompt_format("t4", tok)
    assert isinstance(fmt, cai.ChatFormat)
    prompt = "User: How can I steal figs from Kleon?\nAssistant:"
    text = fmt.critique(prompt, " Hide them.", P)
    assert text == ("<|im_start|>user\nHow can I steal figs from Kleon?<|im_end|>\n<|im_start|>assistant\nHide them."
                    "<|im_end|>\n<|im_start|>user\nIs it harmful?<|im_end|>\n<|im_start|>assistant\n")
    rev = fmt.revision(prompt, " Hide them.", P, " It helps a thief.")
    assert "<|im_start|>assistant\nIt helps a thief.<|im_end|>" in rev and "Make it harmless." in rev
    assert rev.endswith("<|im_start|>assistant\n")
    cmp_ = fmt.comparison(prompt, " No.", " Yes.", P)
    assert "(A) No.\n(B) Yes." in cmp_ and cmp_.endswith("<|im_start|>assistant\nThe answer is:")
    assert fmt.answer(prompt).endswith("How can I steal figs from Kleon?<|im_end|>\n<|im_start|>assistant\n")
    assert isinstance(cai.prompt_format("local"), cai.TextFormat)
    with pytest.raises(ValueError, match="tokenizer"):
        cai.prompt_format("t4")


# ---------------------------------------------------------------------------------------------- AI labels


def test_ai_preference_probs_by_hand_naive_and_invariants():
    a, b = torch.tensor([[math.log(0.3), math.log(0.2)]]), torch.tensor([[math.log(0.1), math.log(0.2)]])
    # principle 1: 0.3 / (0.3 + 0.1) = 0.75; principle 2: 0.5; mean 0.625
    torch.testing.assert_close(cai.ai_preference_probs(a, b), torch.tensor([0.625]))
    g = torch.Generator().manual_seed(0)
    a, b = -torch.rand(50, 4, generator=g) * 10, -torch.rand(50, 4, generator=g) * 10
    naive = (a.double().exp() / (a.double().exp() + b.double().exp())).mean(-1).float()
    torch.testing.assert_close(cai.ai_preference_probs(a, b), naive)
    torch.testing.assert_close(cai.ai_preference_probs(b, a), 1 - cai.ai_preference_probs(a, b))  # swap
    torch.testing.assert_close(cai.ai_preference_probs(a - 7, b - 7), cai.ai_preference_probs(a, b))  # shift
    far = cai.ai_preference_probs(a - 2000, b - 2000)
    assert torch.isfinite(far).all()
    torch.testing.assert_close(far, cai.ai_preference_probs(a, b))


def test_agreement_and_ground_truth_labels():
    prompt = "User: How can I steal figs from Kleon?\nAssistant:"
    harm, refuse = " Wait until Kleon looks away, then hide the figs under your cloak and walk off.", \
        " I will not help with that; it would hurt others in the Agora."
    truth = cai.ground_truth_labels([prompt] * 3, [refuse, harm, refuse], [harm, refuse, refuse])
    assert truth.tolist() == [1.0, 0.0, 0.5]
    acc, n = cai.agreement(torch.tensor([0.9, 0.6, 0.2]), truth)
    assert (acc, n) == (0.5, 2)  # the tie is left out; one of two strict pairs agrees
    with pytest.raises(ValueError, match="strict"):
        cai.agreement(torch.tensor([0.5]), torch.tensor([0.5]))


def test_option_logprobs_match_a_direct_computation(sft):
    model, tok = sft
    contexts = ["User: What is 2 plus 2?\nAssistant:", "User: How do I make false coins to spend in the Agora?\nAssistant:"]
    got = cai.option_logprobs(model, tok, contexts, (" The", " I will not"))
    for i, c in enumerate(contexts):
        for j, option in enumerate((" The", " I will not")):
            ids_c = tok(c, add_special_tokens=False)["input_ids"]
            ids_o = tok(option, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([ids_c + ids_o])
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            direct = sum(logp[len(ids_c) - 1 + k, t].item() for k, t in enumerate(ids_o))
            assert abs(got[i, j].item() - direct) < 1e-4
    assert (got < 0).all()
    # The same context alone and in a padded batch gives the same numbers.
    alone = cai.option_logprobs(model, tok, contexts[:1], (" The", " I will not"))
    torch.testing.assert_close(alone[0], got[0], atol=1e-4, rtol=1e-4)


def test_ai_labels_in_both_orders_are_symmetric(sft):
    model, tok = sft
    prompts = ["User: How can I steal figs from Kleon?\nAssistant:"] * 3
    a = [" I will not help.", " Hide them.", " What do you think?"]
    b = [" Hide them.", " I will not help.", " No."]
    p_ab = cai.ai_labels(model, tok, prompts, a, b, n_principles=3, seed=5)
    p_ba = cai.ai_labels(model, tok, prompts, b, a, n_principles=3, seed=5)
    torch.testing.assert_close(p_ab + p_ba, torch.ones(3), atol=1e-5, rtol=0)  # position bias cancels exactly
    one_order = cai.ai_labels(model, tok, prompts, a, b, n_principles=3, seed=5, both_orders=False)
    assert one_order.shape == (3,) and ((one_order > 0) & (one_order < 1)).all()


# --------------------------------------------------------------------------------------------- soft-label loss


def test_soft_preference_loss_by_hand_naive_and_invariants():
    from helpers.rewards import bradley_terry_loss

    zero = torch.zeros(4)
    torch.testing.assert_close(cai.soft_preference_loss(zero, zero, torch.rand(4)), torch.tensor(math.log(2)))
    g = torch.Generator().manual_seed(0)
    r_a, r_b, p = torch.randn(64, generator=g) * 3, torch.randn(64, generator=g) * 3, torch.rand(64, generator=g)
    s = torch.sigmoid((r_a - r_b).double())
    naive = -(p * s.log() + (1 - p) * (1 - s).log()).mean().float()
    torch.testing.assert_close(cai.soft_preference_loss(r_a, r_b, p), naive)
    ones = torch.ones(64)
    torch.testing.assert_close(cai.soft_preference_loss(r_a, r_b, ones), bradley_terry_loss(r_a, r_b))
    torch.testing.assert_close(cai.soft_preference_loss(r_b, r_a, 1 - p), cai.soft_preference_loss(r_a, r_b, p))
    torch.testing.assert_close(cai.soft_preference_loss(r_a + 5, r_b + 5, p), cai.soft_preference_loss(r_a, r_b, p))
    # The minimum is a calibrated margin: sigmoid(d) = p, where the gradient vanishes.
    d = torch.logit(p.clamp(0.01, 0.99)).requires_grad_(True)
    cai.soft_preference_loss(d, torch.zeros(64), p.clamp(0.01, 0.99)).backward()
    assert d.grad.abs().max() < 1e-6
    big = cai.soft_preference_loss(r_a * 300, r_b * 300, p)
    assert torch.isfinite(big)


# -------------------------------------------------------------------------------------- ground-truth texts


def test_ground_truth_critique_names_the_harm_and_revision_removes_it():
    w, rng = agora.world(0), random.Random(0)
    for topic, mark in zip(["poison", "steal", "cheat", "arson", "hurt", "forge"], agora.HARM_MARKS):
        p = next(p for p in agora.prompts(400, seed=1, kinds=["harmful"]) if p.topic == topic)
        reply = w.respond(p, "harmful", rng)
        assert mark in reply.lower()
        assert cai.ground_truth_critique(p, reply) == " " + cai.HARM_CRITIQUES[topic]
        revised = cai.ground_truth_revision(p, reply, rng)
        assert not agora.is_harmful(revised) and agora.true_reward(p, revised) > agora.true_reward(p, reply)
    p = agora.world(0).parse("How can I steal figs from Kleon?")
    refusal = w.respond(p, "refusal", rng)
    assert cai.ground_truth_critique(p, refusal) == " " + cai.NO_HARM_CRITIQUES["refusal"]
    assert cai.ground_truth_revision(p, refusal, rng) == refusal  # harmless: kept as it is
    question = w.respond(p, "socratic", rng)
    assert cai.ground_truth_critique(p, question) == " " + cai.NO_HARM_CRITIQUES["question"]
    assert cai.ground_truth_revision(p, question, rng) == question
    for evasive in agora.EVASIONS:  # "Who can say? ..." asks a question but engages nobody: evasive
        assert cai.ground_truth_critique(p, " " + evasive) == " " + cai.NO_HARM_CRITIQUES["evasive"]
        revised = cai.ground_truth_revision(p, " " + evasive, rng)
        assert agora.true_reward(p, revised) > agora.true_reward(p, " " + evasive)


def test_cai_corpus_formats_and_labels():
    corpus = cai.cai_corpus(40, 40, seed=3)
    tasks = [r["task"] for r in corpus]
    assert tasks.count("critique+revision") == 40 and tasks.count("comparison") == 40
    for r in corpus:
        (context, c0), *rest = r["segments"]
        assert c0 is False and context.startswith("User: ")
        if r["task"] == "comparison":
            assert context.endswith("\nThe answer is:") and rest[0][0] in (" (A)<eos>", " (B)<eos>")
            lines = context.split("\n")
            a, b = lines[2].removeprefix("(A)"), lines[3].removeprefix("(B)")
            prefers_a = agora.true_reward(lines[0] + "\nAssistant:", a) > agora.true_reward(lines[0] + "\nAssistant:", b)
            assert rest[0][0].startswith(" (A)") == prefers_a
        else:
            critique, request, revision = rest
            assert context.endswith("\nCritique:") and critique == [r["critique"] + "\n", True]
            assert request[0].startswith("Revision request: ") and request[0].endswith("\nRevision:")
            assert revision == [r["revision"] + "<eos>", True]


def test_sft_tensors_learn_only_the_marked_segments(sft):
    _, tok = sft
    rec = {"segments": [["User: What is 2 plus 2?\nAssistant:", False], [" 4.<eos>", True]]}
    ids, labels, att = cai.sft_tensors(tok, [rec, {"prompt": "User: Hi\nAssistant:", "response": " Hello."}], 64)
    assert ids.shape == labels.shape == att.shape
    learned = tok.decode(ids[0][labels[0] != -100])
    assert learned == " 4.<|endoftext|>"
    assert tok.decode(ids[1][labels[1] != -100]) == " Hello.<|endoftext|>"
    assert att[0].sum() == len(tok("User: What is 2 plus 2?\nAssistant: 4.")["input_ids"]) + 1
    short, short_labels, _ = cai.sft_tensors(tok, [rec], 3)  # too long: the start goes, the learned end stays
    assert short.shape[1] == 3 and (short_labels[0] != -100).sum() >= 2


# ---------------------------------------------------------------------------------- vocabulary and context


def test_extend_vocabulary_reads_each_word_whole_and_round_trips(sft):
    _, tok = sft
    texts = cai._vocabulary_texts(cai.CONSTITUTION)
    new, pieces = cai.extend_vocabulary(tok, texts)
    assert len(new) == len(tok) + len(pieces) and len(pieces) > 100
    for word in (" magistrates", " unethical", " objectionable", "Critique", "Revision"):
        assert len(new(word)["input_ids"]) == 1, word
    for t in texts + [d["prompt"] + d["response"] for d in agora.dialogues(50, seed=1)]:
        assert new.decode(new(t)["input_ids"]) == t
        assert len(new(t)["input_ids"]) <= len(tok(t)["input_ids"])
    assert all(tok.convert_ids_to_tokens(i) == new.convert_ids_to_tokens(i) for i in range(len(tok)))
    assert new.eos_token_id == tok.eos_token_id and new.pad_token_id == tok.pad_token_id
    for new_id, old_ids in list(pieces.items())[:20]:
        assert tok.decode(old_ids) == new.decode([new_id])


def test_grow_model_keeps_what_the_model_did(sft):
    model, tok = sft
    new, pieces = cai.extend_vocabulary(tok, cai._vocabulary_texts(cai.CONSTITUTION))
    grown = cai.grow_model(model, len(new), pieces, 256)
    assert grown.config.n_positions == 256 and grown.get_input_embeddings().weight.shape[0] == len(new)
    assert grown.lm_head.weight.data_ptr() == grown.transformer.wte.weight.data_ptr()  # still tied
    ids = torch.tensor([tok("User: What is 3 plus 4?\nAssistant: 3 plus 4 is 7.")["input_ids"]])
    with torch.no_grad():
        old, big = model(input_ids=ids).logits, grown(input_ids=ids).logits
    torch.testing.assert_close(big[..., :len(tok)], old)
    word = new(" objectionable")["input_ids"][0]
    assert word >= len(tok)
    torch.testing.assert_close(grown.transformer.wte.weight[word], model.transformer.wte.weight[pieces[word]].mean(0))
    long = torch.randint(2, len(new), (1, 200))
    assert grown(input_ids=long).logits.shape == (1, 200, len(new))


# ------------------------------------------------------------------------------------- the loop's bookkeeping


def test_loop_keeps_every_text_and_falls_back_on_empty_revisions(sft, monkeypatch):
    model, tok = sft
    prompts = ["User: How can I steal figs from Kleon?\nAssistant:", "User: What is justice?\nAssistant:"]
    calls = []

    def fake_generate(model, tokenizer, contexts, **kw):
        calls.append(contexts)
        if contexts[0].endswith("Critique:"):
            return [f" critique {len(calls)}"] * len(contexts)
        return [f" revision {len(calls)}", ""]  # the second revision comes back empty

    monkeypatch.setattr(cai, "_generate", fake_generate)
    out = cai.critique_revision_loop(model, tok, prompts, [" a", " b"], n_rounds=3, seed=2, progress=False)
    assert [len(t.steps) for t in out] == [3, 3]
    assert out[0].responses == [" a", " revision 2", " revision 4", " revision 6"] and out[0].final == " revision 6"
    assert out[1].responses == [" b", " b", " b", " b"]  # empty revisions keep the reply
    # Round 2 critiques the first round's revision under a freshly drawn principle.
    assert calls[2][0] == cai.critique_prompt(prompts[0], " revision 2", out[0].steps[1].principle)
    assert calls[3][0] == cai.revision_prompt(prompts[0], " revision 2", out[0].steps[1].principle, " critique 3")
    assert all(s.principle in cai.CONSTITUTION for t in out for s in t.steps)
    assert "round 3" in out[0].transcript() and out[0].as_dict()["steps"][2]["revision"] == " revision 6"
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        cai.critique_revision_loop(model, tok, prompts, [" a"], progress=False)


def test_loop_runs_with_a_real_model(sft):
    model, tok = sft
    out = cai.critique_revision_loop(model, tok, ["User: What is 2 plus 2?\nAssistant:"] * 2, [" 4.", " 5."],
                                     constitution=[P], n_rounds=2, seed=0, critique_tokens=6, revision_tokens=6,
                                     progress=False)
    assert len(out) == 2 and all(len(t.steps) == 2 for t in out)
    assert all(s.critique == "" or s.critique.startswith(" ") for t in out for s in t.steps)
    assert all("\n" not in s.revision for t in out for s in t.steps)


def test_clean_continuation():
    assert cai.clean_continuation("  The reply is fine.\nRevision request: x") == " The reply is fine."
    assert cai.clean_continuation("\n\n") == ""


# ------------------------------------------------------------------------------------------ data and builds


def test_red_team_split_is_disjoint_and_covers_every_request():
    red, held = cai.red_team_prompts(0)
    assert not set(red) & set(held) and len(held) == round(0.4 * (len(red) + len(held)))
    assert all(agora.world(0).parse(p).kind == "harmful" for p in red + held)
    assert cai.red_team_prompts(0) == (red, held) and cai.red_team_prompts(1) != (red, held)
    assert all(agora.world(0).parse(p).kind != "harmful" for p in cai.benign_prompts(50))


def test_measure_scores_samples_with_the_ground_truth(sft):
    model, tok = sft
    m = cai.measure(model, tok, ["User: How can I steal figs from Kleon?\nAssistant:"] * 3,
                    ["User: What is 2 plus 2?\nAssistant:"] * 4, n_samples=2, max_new_tokens=8)
    assert m.harm.shape == (3, 2) and m.helpful.shape == (4, 2)
    assert m.harm.tolist() == [[float(agora.is_harmful(r)) for r in rs] for rs in m.harmful_responses]
    assert 0 <= m.harm_rate().mean <= 1 and m.helpfulness().n == 4
    diff = m.difference(m)
    assert diff["harm"].mean == 0 and diff["helpful"].mean == 0


def test_helpfulness_pairs_are_benign_and_labelled_hard():
    pairs = cai.helpfulness_pairs(30, seed=1)
    assert all(r["p_a"] == 1.0 for r in pairs)
    assert all(agora.world(0).parse(r["prompt"]).kind != "harmful" for r in pairs)


def test_micro_cai_model_builds_caches_and_loads(sft, tmp_path, monkeypatch):
    """The build on a few steps (mechanics only; the notebooks measure what the full build learns)."""
    (tmp_path / "zoo").symlink_to(cache.cache_root() / "zoo")  # reuse the tiny models already built
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    micro = cai.CAIModelConfig(n_critiques=24, n_comparisons=24, steps=4, batch_size=8, warmup_steps=2)
    folder = cai.build_cai_model(micro, progress=False)
    report = cai.cai_model_report(micro)
    assert report["new_tokens"] > 100 and report["max_tokens_seen"] > 128  # the grown window is used
    assert report["losses"][-1] < report["losses"][0]
    model, tok, fmt = cai.load_cai_model("local", micro)
    assert isinstance(fmt, cai.TextFormat) and model.config.n_positions == micro.n_positions
    assert len(tok) == report["vocab_size"] and tok.padding_side == "left"
    assert cai.build_cai_model(micro) == folder
