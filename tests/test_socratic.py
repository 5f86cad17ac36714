"""helpers.socratic: written dialogues, the Plato loader (offline, on a fixture in the e-book format), LoRA SFT with
versioned adapters, the turn stop, hybrid PPO on an adapter, and adapters switched in place."""

from __future__ import annotations

import json
import statistics
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from helpers import agora, lm, rlhf, socratic, zoo
from helpers.checks import week05

FIXTURE = Path(__file__).parent / "fixtures" / "plato" / "pg99999-kleon.txt"


# ----------------------------------------------------------------------------------------------- dialogues


def test_dialogues_are_deterministic_and_in_the_agora_format(tmp_path):
    a, b = socratic.socratic_dialogues(20, seed=3), socratic.socratic_dialogues(20, seed=3)
    assert a == b and a != socratic.socratic_dialogues(20, seed=4)
    for turns in a:
        assert turns[0][0] == "User" and turns[1][0] == "Assistant"
        assert [s for s, _ in turns] == ["User", "Assistant"] * (len(turns) // 2)
    pairs = socratic.socratic_pairs(50, seed=0)
    for p in pairs:
        assert p["prompt"].startswith("User: ") and p["prompt"].endswith("\nAssistant:")
        assert p["response"].startswith(" ") and "\n" not in p["response"]
        assert p["kind"] in agora.KINDS
    firsts = [p for p in pairs if p["turn"] == 1]
    assert all(p["prompt"].count("\n") == 1 for p in firsts)  # one question, then the reply
    assert all(agora.world(0).parse(p["prompt"]).kind == p["kind"] for p in firsts)
    # the pairs round-trip through the Agora's dialogue files
    agora.save_jsonl(tmp_path / "socratic.jsonl", pairs)
    assert agora.load_dialogues(tmp_path / "socratic.jsonl") == pairs


def test_question_rate_sets_how_socratic_the_data_is():
    def mean_socratic(rate):
        pairs = [p for p in socratic.socratic_pairs(300, seed=1, question_rate=rate) if p["turn"] == 1]
        return statistics.mean(agora.score(p["prompt"], p["response"]).socratic for p in pairs)

    low, mid, high = mean_socratic(0.0), mean_socratic(0.6), mean_socratic(1.0)
    assert low < 0.1 < mid - 0.2 and mid < high - 0.2 and high > 0.6


def test_dialogue_pairs_context_and_continuation():
    turns = [("U", "q1"), ("S", "a1"), ("U", "q2"), ("S", "a2"), ("U", "q3"), ("S", "a3")]
    pairs = socratic.dialogue_pairs(turns, socrates="S", max_context_turns=3)
    assert [p["prompt"] for p in pairs] == ["User: q1\nAssistant:", "User: q1\nAssistant: a1\nUser: q2\nAssistant:",
                                            "User: q2\nAssistant: a2\nUser: q3\nAssistant:"]
    assert [p["response"] for p in pairs] == [" a1", " a2", " a3"]
    assert [p["continues"] for p in pairs] == [True, True, False]
    with pytest.raises(ValueError, match="question_rate"):
        socratic.socratic_dialogue(agora.world(0).parse("What is justice?"), __import__("random").Random(0),
                                   question_rate=2)
    with pytest.raises(ValueError, match="no Socratic dialogue"):
        socratic.socratic_dialogue(agora.Prompt("open", "Hello?"), __import__("random").Random(0))


# ---------------------------------------------------------------------------------------------------- Plato


def test_strip_ebook_removes_header_and_footer():
    text = FIXTURE.read_text()
    body = socratic.strip_ebook(text)
    assert "Project Gutenberg" not in body and "START OF" not in body and "END OF" not in body
    assert body.lstrip().startswith("KLEON") and body.rstrip().endswith("for you?")
    old = ("Header\n*** START OF THIS PROJECT GUTENBERG EBOOK MENO ***\nA: b\n"
           "End of the Project Gutenberg EBook of Meno\nlicence")
    assert socratic.strip_ebook(old) == "A: b"
    assert socratic.strip_ebook("no markers\r\nat all") == "no markers\nat all"


def test_parse_turns_on_the_fixture():
    turns = socratic.parse_turns(socratic.strip_ebook(FIXTURE.read_text()))
    speakers = [s for s, _ in turns]
    assert set(speakers) == {"SOCRATES", "KLEON"}  # not SCENE, not the introduction's quoted label
    assert speakers[0] == "KLEON" and len(turns) == 18
    assert speakers.count("SOCRATES") == 9
    # wrapped lines are joined; an unlabelled paragraph continues the turn before it
    assert turns[1][1] == ("You know me well, Kleon. Tell me, when you set the price of a jar, how do you know that "
                           "the price is fair?")
    trap = [t for s, t in turns if t.startswith("No trap")][0]
    assert trap.endswith("He would be asking the price of good olives for bad ones, would he not?")
    assert all("footer" not in t for _, t in turns)
    assert socratic.parse_turns("AB: x\n\nCD: y", speakers=["AB"]) == [("AB", "x CD: y")]


def test_plato_pairs_from_the_fixture():
    pairs = socratic.plato_pairs(FIXTURE)
    assert len(pairs) == 8  # nine turns of Socrates; "True." is shorter than three words
    first = pairs[0]
    assert first["prompt"].startswith("User: Good morning, Socrates.") and first["prompt"].endswith("\nAssistant:")
    assert first["response"].startswith(" You know me well, Kleon.")
    assert pairs[-1]["continues"] is False and all(p["continues"] for p in pairs[:-1])
    assert all(p["dialogue"] == FIXTURE.name for p in pairs)
    # from text as well as from a path; the context keeps up to max_context_turns turns
    again = socratic.plato_pairs(FIXTURE.read_text(), max_context_turns=3)
    assert again[1]["prompt"].count("\n") == 3
    with pytest.raises(ValueError, match="no turns by 'SOCRATES'.*KLEON"):
        socratic.plato_pairs("KLEON: one\n\nKLEON: two\n")


def test_fetch_plato_downloads_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            hits.append(self.path)
            data = FIXTURE.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/pg99999.txt"
        path = socratic.fetch_plato("kleon", url=url)
        assert path.read_bytes() == FIXTURE.read_bytes() and len(socratic.plato_pairs(path)) == 8
        assert socratic.fetch_plato("kleon", url=url) == path and hits == ["/pg99999.txt"]
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(ValueError, match="unknown dialogue"):
        socratic.fetch_plato("timaeus-b")


# ------------------------------------------------------------------------------------------------- turn stop


def naive_turn_mask(tokens, stop, eos):
    out = torch.zeros_like(tokens, dtype=torch.bool)
    for i, row in enumerate(tokens.tolist()):
        for t, tok in enumerate(row):
            out[i, t] = True
            if tok == eos or (len(stop) and t >= len(stop) - 1 and row[t - len(stop) + 1:t + 1] == list(stop)):
                break
    return out


def test_turn_mask_by_hand():
    tokens = torch.tensor([[5, 1, 2, 6, 1, 2],    # stop at 1-2 -> keep 0..2
                           [5, 1, 6, 1, 2, 7],    # a lone 1 is no stop; the stop ends at 4
                           [5, 0, 1, 2, 6, 6],    # EOS first
                           [5, 6, 7, 8, 9, 5]])   # neither
    expected = [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert socratic.turn_mask(tokens, [1, 2], 0).int().tolist() == expected


def test_turn_mask_matches_a_naive_scan_and_is_a_prefix():
    g = torch.Generator().manual_seed(0)
    for stop in ([1], [1, 2], [1, 2, 1]):
        tokens = torch.randint(0, 5, (64, 20), generator=g)
        got = socratic.turn_mask(tokens, stop, eos_id=0)
        assert torch.equal(got, naive_turn_mask(tokens, stop, 0))
        assert (got[:, 1:] <= got[:, :-1]).all()  # once the turn is over it stays over
        assert got[:, 0].all()
    assert socratic.turn_mask(torch.tensor([[3, 4]]), [1, 2, 3], 0).all()  # stop longer than the row


def test_turn_stop_criterion_on_token_ids_and_text():
    crit = socratic._stopping_criteria(prompt_len=2, stops=[[1, 2]], eos_id=0, tokenizer=None, stop_strings=())[0]
    ids = torch.tensor([[9, 9, 5, 1, 2], [9, 9, 5, 1, 6], [9, 9, 0, 4, 4], [9, 9, 1, 2, 4]])
    assert crit(ids, None).tolist() == [True, False, True, True]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = zoo.load_tiny("base")
    return model, tokenizer


def test_generate_turn_equals_generate_then_cut(tiny):
    model, tokenizer = tiny
    prompts = [p.text for p in agora.prompts(12, seed=0)]
    stop = (".",)
    got = socratic.generate_turn(model, tokenizer, prompts, max_new_tokens=20, seed=3, stop_strings=stop)
    ref = rlhf.truncate_at_stop(lm.generate(model, tokenizer, prompts, max_new_tokens=20, seed=3), tokenizer, stop)
    assert got.responses == ref.responses
    assert all("." not in r for r in got.responses)
    n = got.response_mask.sum(-1)
    assert torch.equal(n, ref.response_mask.sum(-1))
    for row, m, ref_row, ref_m in zip(got.input_ids, got.response_mask, ref.input_ids, ref.response_mask):
        assert row[m.bool()].tolist() == ref_row[ref_m.bool()].tolist()
    assert got.input_ids.shape[1] <= ref.input_ids.shape[1]  # stopped as soon as every row's turn was over


def test_generate_turn_text_stop_and_greedy(tiny):
    model, tokenizer = tiny
    prompts = [p.text for p in agora.prompts(6, seed=1)]
    a = socratic.generate_turn(model, tokenizer, prompts, temperature=0.0, max_new_tokens=16)
    b = socratic.generate_turn(model, tokenizer, prompts, temperature=0.0, max_new_tokens=16)
    assert a.responses == b.responses
    assert socratic.run_on_rate(a.responses) == 0.0
    assert socratic.run_on_rate([" a\nUser: b", " c"]) == 0.5
    left = tokenizer.padding_side
    tokenizer.padding_side = "right"
    try:
        with pytest.raises(ValueError, match="left-padded"):
            socratic.generate_turn(model, tokenizer, prompts)
    finally:
        tokenizer.padding_side = left


# -------------------------------------------------------------------------------------------------- LoRA SFT


def test_lora_parameter_count_matches_peft():
    for family, model, target_sets in week05._tiny_models():
        for targets in target_sets:
            for r in (1, 8):
                assert socratic.lora_parameter_count(model, targets, r) == week05._peft_count(model, targets, r), \
                    (family, targets, r)
    gpt2 = week05._tiny_models()[0][1]
    # GPT-2 (24 wide, 2 layers): c_attn is 24 -> 72, so r * (24 + 72) per layer
    assert socratic.lora_parameter_count(gpt2, ["c_attn"], 4) == 2 * 4 * (24 + 72)
    assert socratic.lora_parameter_count(gpt2, ["nothing"], 4) == 0
    with pytest.raises(TypeError, match="not a linear layer"):
        socratic.lora_parameter_count(gpt2, ["ln_f"], 4)


def test_sft_example_masks_the_context_and_ends_the_turn(tiny):
    _, tok = tiny
    rec = {"prompt": "User: What is justice?\nAssistant:", "response": " What do you think?", "continues": True}
    ids, labels = socratic.sft_example(tok, rec, 128)
    n_prompt = len(tok(rec["prompt"])["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:]) == " What do you think?\nUser:"
    ids, _ = socratic.sft_example(tok, {**rec, "continues": False}, 128)
    assert ids[-1] == tok.eos_token_id
    long = {**rec, "prompt": "User: " + "What is justice? " * 40 + "\nAssistant:"}
    ids, labels = socratic.sft_example(tok, long, 32)
    assert len(ids) == 32 and tok.decode([i for i, l in zip(ids, labels) if l != -100]) == " What do you think?\nUser:"


def test_lora_sft_saves_versioned_adapters(tiny, tmp_path):
    from peft import PeftModel

    model, tok = zoo.load_tiny("base")
    pairs = socratic.socratic_pairs(30, seed=0)
    config = socratic.SFTConfig(steps=4, batch_size=4, save_every=2, warmup_steps=1)
    peft_model, log = socratic.train_lora_sft(model, tok, pairs, config, tmp_path, progress=False)
    versions = json.loads((tmp_path / "versions.json").read_text())
    assert [v["version"] for v in versions] == ["v001", "v002"] and [v["step"] for v in versions] == [2, 4]
    assert (tmp_path / "v002" / "adapter_config.json").exists() and not (tmp_path / "trainer").exists()
    assert log and all(math_isfinite(h["loss"]) for h in log)
    # the last version is the trained adapter; it loads back onto a fresh base and gives the same logits
    fresh, _ = zoo.load_tiny("base")
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "v002").eval()
    x = torch.tensor([tok("User: What is justice?\nAssistant:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, peft_model(x).logits)
    base_mb = socratic.weights_size_mb(zoo.model_dir() / "base")
    adapter_mb = socratic.weights_size_mb(tmp_path / "v002")
    plain, _ = zoo.load_tiny("base")
    n_lora = socratic.lora_parameter_count(plain, zoo.lora_target_modules(plain), config.r)
    assert socratic.lora_parameter_count(loaded, zoo.lora_target_modules(plain), config.r) == n_lora  # peft-wrapped
    assert 0 < adapter_mb < base_mb / 10 and abs(adapter_mb - n_lora * 4 / 1e6) < 0.01
    assert socratic.folder_size_mb(tmp_path / "v002") >= adapter_mb


def math_isfinite(x):
    return x == x and abs(x) != float("inf")


# ---------------------------------------------------------------------------------------------- hybrid PPO


def test_rollout_from_ids_round_trip(tiny):
    model, tok = tiny
    prompts = [p.text for p in agora.prompts(5, seed=2)]
    roll = socratic.generate_turn(model, tok, prompts, max_new_tokens=12, seed=0)
    again = socratic.rollout_from_ids(prompts, socratic.response_ids(roll), tok, roll.responses)
    assert socratic.response_ids(again) == socratic.response_ids(roll)
    with torch.no_grad():
        a = lm.sequence_logprobs(model, roll.input_ids, roll.attention_mask, roll.response_mask).sum(-1)
        b = lm.sequence_logprobs(model, again.input_ids, again.attention_mask, again.response_mask).sum(-1)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_hybrid_ppo_mixes_offline_and_online(tiny):
    model, tok = zoo.load_tiny("base")
    prompts = [p.text for p in agora.prompts(16, seed=3)]
    calls = []

    def reward_fn(ps, rs):
        calls.append(len(rs))
        return torch.tensor([agora.score(p, r).socratic for p, r in zip(ps, rs)])

    offline = socratic.pregenerate(model, tok, prompts[:6], reward_fn, max_new_tokens=10, seed=0)
    assert len(offline) == 6 and calls == [6] and set(offline[0]) == {"prompt", "response", "response_ids", "score"}
    config = rlhf.PPOConfig(steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=1, max_new_tokens=10,
                            stop_strings=(socratic.TURN_END,))
    policy = rlhf.make_policy(model, config)
    before = [p.detach().clone() for p in policy.parameters() if p.requires_grad]
    result = socratic.train_hybrid_ppo(policy, tok, prompts, reward_fn, offline, config, offline_per_step=2,
                                       progress=False)
    assert calls[1:] == [2, 2]  # only the online half is judged during training
    assert len(result.history) == 2
    row = result.history[-1]
    for key in ("score", "score_online", "score_offline", "kl", "reward", "kl_coef", "pg_loss", "vf_loss",
                "clipfrac", "approx_kl", "entropy", "seconds"):
        assert key in row and row[key] == row[key], key
    assert sum(s["online"] for s in result.samples) == 2
    offline_texts = {r["response"] for r in offline}
    assert all(s["response"] in offline_texts for s in result.samples if not s["online"])
    after = [p for p in policy.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    with pytest.raises(ValueError, match="offline_per_step"):
        socratic.train_hybrid_ppo(policy, tok, prompts, reward_fn, offline, config, offline_per_step=4,
                                  progress=False)


# ------------------------------------------------------------------------------------------ adapter switching


def test_combined_adapter_is_the_exact_sum_and_switching_restores(tiny):
    from peft import LoraConfig, get_peft_model

    base, tok = zoo.load_tiny("base")
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
                           adapter_name="sft")
    model.add_adapter("ppo", LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B starts at zero; give both adapters an effect
    x = torch.tensor([tok("User: What is justice?\nAssistant: What do you think?")["input_ids"]])
    model.eval()
    with torch.no_grad():
        model.base_model.set_adapter(["sft", "ppo"])  # both at once: W + sft + ppo
        both = model(x).logits
        socratic.combine_adapters(model, ["sft", "ppo"], "socrates")
        model.set_adapter("socrates")
        torch.testing.assert_close(model(x).logits, both, atol=1e-4, rtol=1e-4)
        model.set_adapter("sft")
        assert not torch.allclose(model(x).logits, both, atol=1e-3)
    prompts = [p.text for p in agora.prompts(3, seed=4)]
    out = socratic.side_by_side(model, tok, prompts, ["socrates", "sft", None], max_new_tokens=8)
    assert list(out) == ["socrates", "sft", "base"] and all(len(v) == 3 for v in out.values())
    assert model.active_adapter == "sft"  # restored
    with torch.no_grad(), model.disable_adapter():
        plain = model(x).logits
    fresh, _ = zoo.load_tiny("base")
    with torch.no_grad():
        torch.testing.assert_close(plain, fresh(x).logits)


# ------------------------------------------------------------------------- the GPU presets' path, offline


def test_gpu_preset_path_end_to_end_on_a_tiny_llama(tmp_path, monkeypatch):
    """Everything a GPU preset runs (hub model, Plato pairs, hub sentiment, prompted hub judge, SFT, hybrid PPO,
    switching) on a randomly initialised tiny Llama saved like a hub model; downloads replaced by local files."""
    import dataclasses

    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import judges, runtime

    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    tok = zoo.train_tokenizer([d["prompt"] + d["response"] for d in agora.dialogues(400, seed=0)], 320)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, bos_token_id=tok.eos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    llama.save_pretrained(tmp_path / "tiny-llama")
    tok.save_pretrained(tmp_path / "tiny-llama")
    from test_judges import _save_tiny_classifier

    _save_tiny_classifier(tmp_path / "tiny-sentiment", {0: "negative", 1: "neutral", 2: "positive"})
    monkeypatch.setattr(judges, "HUB_SENTIMENT_MODEL", str(tmp_path / "tiny-sentiment"))
    monkeypatch.setattr(socratic, "fetch_plato", lambda name, **kw: FIXTURE)
    preset = runtime.replace(runtime.PRESETS["t4"], model_id=str(tmp_path / "tiny-llama"), device="cpu",
                             dtype="float32", batch_size=4, mini_batch_size=2, max_new_tokens=8, seq_len=96, lora_r=2)

    records = socratic.socrates_records(preset, n_dialogues=10)
    assert sum(r["dialogue"] == FIXTURE.name for r in records) == 8 * len(socratic.PLATO_EBOOKS)
    config = dataclasses.replace(socratic.sft_config(preset, "socrates"), steps=2, batch_size=4, save_every=1)
    assert config.target_modules is None and config.r == 2  # the architecture's attention projections
    sft_dir = socratic.build_adapter(preset, "socrates", records, config, progress=False)
    report = json.loads((sft_dir / "report.json").read_text())
    model, _ = socratic.load_base(preset)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert report["lora_parameters"] == socratic.lora_parameter_count(model, attention, 2)
    judge = socratic.load_judge(preset)
    assert judge.instruction and isinstance(judges.load_sentiment(preset), judges.HubSentiment)
    ppo = dataclasses.replace(socratic.ppo_config(preset), steps=1, batch_size=4, mini_batch_size=2)
    hybrid = socratic.HybridConfig(n_prompts=8, n_offline=4, offline_per_step=2)
    ppo_dir = socratic.build_ppo(preset, sft_dir, ppo, hybrid, progress=False)
    assert len(agora.load_jsonl(ppo_dir / "offline.jsonl")) == 4
    assert len(json.loads((ppo_dir / "history.json").read_text())) == 1
    policy, tokenizer = socratic.load_ppo(preset, sft_dir, ppo_dir)
    cast, _ = socratic.load_characters(preset, {"socrates-sft": sft_dir})
    cast.load_adapter(ppo_dir / "adapter", adapter_name="socrates-ppo")
    socratic.combine_adapters(cast, ["socrates-sft", "socrates-ppo"], "socrates")
    x = torch.tensor([tokenizer("User: What is justice?\nAssistant:")["input_ids"]])
    cast.set_adapter("socrates")
    with torch.no_grad():
        torch.testing.assert_close(cast(x).logits, policy.model(x).logits, atol=1e-4, rtol=1e-4)
    out = socratic.side_by_side(cast, tokenizer, ["User: What is justice?\nAssistant:"], ["socrates", None],
                                max_new_tokens=4)
    assert set(out) == {"socrates", "base"}


def test_parse_turns_without_blank_lines_between_turns():
    # some editions put the persons on the next line and no blank line between turns
    text = ("INTRODUCTION.\nSOCRATES: quoted in the introduction.\n\nPERSONS OF THE DIALOGUE:\nSocrates, Crito.\n"
            "SCENE: The Prison of Socrates.\nSOCRATES: Why have you come at this hour, Crito? it must be quite\n"
            "early?\nCRITO: Yes, certainly.\nSOCRATES: What is the exact time?\n")
    turns = socratic.parse_turns(text)
    assert turns == [("SOCRATES", "Why have you come at this hour, Crito? it must be quite early?"),
                     ("CRITO", "Yes, certainly."), ("SOCRATES", "What is the exact time?")]
