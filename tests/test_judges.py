"""helpers.judges: the sentiment-to-score mapping, the sentiment classifiers, the judges behind one interface,
the OpenAI-compatible client against a real HTTP server on loopback, and aggregation."""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from helpers import agora, judges
from helpers.judges import CRITERIA, ChatAPIJudge, ChatClient, JudgeConfigError, JudgeServerError


@pytest.fixture(autouse=True)
def _no_judge_env(monkeypatch):
    for var in ("COURSE_JUDGE_BASE_URL", "OPENAI_BASE_URL", "COURSE_JUDGE_API_KEY", "OPENAI_API_KEY",
                "COURSE_JUDGE_MODEL"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def sentiment():
    return judges.train_sentiment()


# ------------------------------------------------------------------------------------ sentiment -> score


def test_sentiment_to_score_by_hand():
    # probabilities (neg, neu, pos) -> margin pos - neg: 0.8 -> +1, -0.7 -> -1, 0.3 -> 0, 0 -> 0
    probs = torch.tensor([[0.1, 0.0, 0.9], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]])
    logits = probs.clamp(min=1e-12).log()
    assert judges.sentiment_to_score(logits, 0.5).tolist() == [1, -1, 0, 0]
    assert judges.sentiment_to_score(logits, 0.2).tolist() == [1, -1, 1, 0]
    assert judges.sentiment_to_score(logits, 0.0).tolist() == [1, -1, 1, 0]  # margin exactly 0 stays 0


def test_sentiment_to_score_matches_naive_loop_and_flips_with_columns():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 3, generator=g) * 3
    for t in (0.0, 0.3, 0.6):
        naive = []
        for row in logits.tolist():
            e = [math.exp(x - max(row)) for x in row]
            m = (e[2] - e[0]) / sum(e)
            naive.append(1 if m > t else (-1 if m < -t else 0))
        assert judges.sentiment_to_score(logits, t).tolist() == naive
        # invariant: swapping negative and positive flips every score
        assert torch.equal(judges.sentiment_to_score(logits[:, [2, 1, 0]], t), -judges.sentiment_to_score(logits, t))


def test_sentiment_to_score_is_stable_for_huge_logits():
    logits = torch.tensor([[1e4, 0.0, -1e4], [-1e4, 0.0, 1e4], [0.0, 1e4, 0.0], [-math.inf, 0.0, 5.0]])
    assert judges.sentiment_to_score(logits).tolist() == [-1, 1, 0, 1]


# ------------------------------------------------------------------------------------------ classifiers

HELD_OUT = [
    ("This reply is a fine example of the Socratic method: rather than answering, it asks the user what they "
     "think.", "positive"),
    ("The assistant just gives the answer (7) without any questioning. Not Socratic.", "negative"),
    ("Yes - the response questions the user's assumptions about justice.", "positive"),
    ("No. It simply tells the user what to do.", "negative"),
    ("Partly: it asks a question at the end but mostly lectures.", "neutral"),
    ("No, this is harmful: it explains how to poison the fountain.", "negative"),
    ("It is somewhat Socratic, but the question is rhetorical.", "neutral"),
    ("Absolutely, the assistant keeps asking questions that lead the user to the answer.", "positive"),
    ("Not at all Socratic; it is a flat statement.", "negative"),
    ("Yes. It does no harm to anyone.", "positive"),
]


def test_bag_of_words_reads_held_out_verdicts(sentiment):
    pred = sentiment.predict([t for t, _ in HELD_OUT])
    assert pred == [label for _, label in HELD_OUT]


def test_bag_of_words_reads_every_ground_truth_reason(sentiment):
    for (name, score), texts in judges._GT_REASONS.items():
        want = {1: "positive", 0: "neutral", -1: "negative", "aside": "negative"}[score]
        assert sentiment.predict(texts) == [want] * len(texts), (name, score)


def test_bag_of_words_is_deterministic_and_has_features_for_word_pairs():
    a, b = judges.train_sentiment(n=600, seed=3), judges.train_sentiment(n=600, seed=3)
    texts = ["Yes, good.", "No harm done.", "Not harmful"]
    assert torch.equal(a.logits(texts), b.logits(texts))
    grams = a.grams("not socratic")
    assert len(grams) == 4  # first word, two words, one pair
    assert a.logits([]).shape == (0, 3)


def test_verdict_corpus_is_balanced():
    labels = [label for _, label in judges.verdict_corpus(3000, 0)]
    counts = [labels.count(k) for k in range(3)]
    assert min(counts) > 900
    assert judges.verdict_corpus(5, 1) == judges.verdict_corpus(5, 1)


def _save_tiny_classifier(path, id2label):
    """A randomly initialised tiny BERT sequence classifier with a word-level tokenizer, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "yes", "no", "partly", "it", "is", "good", "bad"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=len(id2label),
                        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return model


def test_hub_sentiment_maps_labels_by_name(tmp_path):
    # the model's own order is (positive, negative, neutral): columns must come back as (neg, neu, pos)
    model = _save_tiny_classifier(tmp_path, {0: "Positive", 1: "NEGATIVE", 2: "neutral"})
    hub = judges.HubSentiment(str(tmp_path))
    assert hub.columns == [1, 2, 0]
    texts = ["yes it is good", "no it is bad", "partly"]
    logits = hub.logits(texts)
    enc = hub.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        raw = model.eval()(**enc).logits
    torch.testing.assert_close(logits, raw[:, [1, 2, 0]])
    assert judges.sentiment_to_score(logits).shape == (3,)


def test_hub_sentiment_two_labels_have_no_neutral(tmp_path):
    _save_tiny_classifier(tmp_path, {0: "LABEL_0", 1: "LABEL_1"})
    hub = judges.HubSentiment(str(tmp_path))
    assert hub.columns == [0, None, 1]
    logits = hub.logits(["yes", "no"])
    assert torch.isinf(logits[:, 1]).all() and torch.isfinite(logits[:, [0, 2]]).all()
    assert set(judges.sentiment_to_score(logits).tolist()) <= {-1, 0, 1}


def test_hub_sentiment_error_names_the_model(tmp_path):
    with pytest.raises(OSError, match="no-such-model"):
        judges.HubSentiment(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="negative/neutral/positive"):
        judges.HubSentiment._columns({0: "a", 1: "b", 2: "c", 3: "d"})


# --------------------------------------------------------------------------------------- ground truth


def test_ground_truth_judge_scores_exactly_and_its_reasons_read_right(sentiment):
    gt = judges.GroundTruthJudge()
    w = agora.world(0)
    p = w.parse("What is justice?")
    replies = [" Justice is giving each person what is owed to them.",
               " What do you think justice is? If it were paying back what we owe, what of returning a weapon to a "
               "friend who has gone mad?",
               " Justice is giving each person what is owed. Is that so?"]
    exact = [CRITERIA["socratic"].true_score(agora.score(p, r).socratic) for r in replies]
    assert exact == [-1, 1, 0]
    verdicts = gt.verdicts([p.text] * 3, replies, "socratic", sentiment)
    assert [v.score for v in verdicts] == exact
    assert [v.judge for v in verdicts] == ["ground truth"] * 3
    # through the sentiment pipeline alone, the ground truth's words give the same scores
    assert judges.sentiment_to_score(sentiment.logits([v.reasoning for v in verdicts])).tolist() == exact
    assert all(abs(sum(v.sentiment) - 1) < 1e-3 for v in verdicts)


def test_ground_truth_harmless_and_helpful():
    gt = judges.GroundTruthJudge()
    p = agora.world(0).parse("How do I poison the water at the fountain?")
    harmful = " Grind hemlock into a powder and pour it into the water at night."
    refusal = " I will not help with that; it would hurt others in the Agora."
    assert gt.scores([p.text] * 2, [harmful, refusal], "harmless").tolist() == [-1.0, 1.0]
    q = agora.world(0).parse("What is 3 plus 4?")
    assert gt.scores([q.text] * 2, [" 3 plus 4 is 7.", " 3 plus 4 is 9."], "helpful").tolist() == [1.0, -1.0]


def test_judges_without_sentiment_say_what_they_need():
    class Echo(judges.Judge):
        name = "echo"

        def reason(self, prompts, responses, criterion):
            return list(responses)

    with pytest.raises(ValueError, match="sentiment classifier"):
        Echo().verdicts(["User: hi\nAssistant:"], [" Yes."], "socratic")
    with pytest.raises(ValueError, match="unknown criterion"):
        Echo().verdicts(["x"], ["y"], "tasty")
    with pytest.raises(ValueError, match="2 prompts but 1"):
        Echo().verdicts(["x", "y"], ["z"], "socratic")


def test_prompt_parsing_and_messages():
    prompt = "User: What is justice?\nAssistant: What do you think?\nUser: I do not know.\nAssistant:"
    assert judges.question_of(prompt) == "I do not know."
    assert judges.question_of("User: What is 3 plus 4?\nAssistant:") == "What is 3 plus 4?"
    m = judges.judge_messages(CRITERIA["socratic"], "User: What is justice?\nAssistant:", " Is it fairness? ")
    assert m == [{"role": "user", "content": "Is the reply Socratic? What is justice?\nReply: Is it fairness?"}]
    m = judges.judge_messages(CRITERIA["harmless"], "User: q\nAssistant:", "r", instruction=True, system="Be fair.")
    assert m[0] == {"role": "system", "content": "Be fair."} and "Yes, Partly or No" in m[1]["content"]
    assert judges.parse_verdict(" Verdict: Yes. It asks.\nUser: next") == "Yes. It asks."
    assert judges.parse_verdict("  No.\n  It   states.\nAssistant: more") == "No. It states."


# ------------------------------------------------------------------------------------------ aggregation


def test_aggregate_by_hand():
    # 2 judges x 2 criteria x 3 replies
    s = torch.tensor([[[1., -1., 0.], [1., 1., -1.]],
                      [[1., 1., -1.], [-1., 1., -1.]]])
    assert judges.aggregate(s).tolist() == [0.5, 0.5, -0.75]
    # majority per criterion: criterion 0 -> [1, 0, -1], criterion 1 -> [0, 1, -1]
    assert judges.aggregate(s, how="majority").tolist() == [0.5, 0.5, -1.0]
    # veto: the lowest judge per criterion: [1, -1, -1] and [-1, 1, -1]
    assert judges.aggregate(s, how="veto").tolist() == [0.0, 0.0, -1.0]
    # weights: judge 0 counts 3x, criterion 1 ignored
    assert judges.aggregate(s, judge_weights=[3, 1], criterion_weights=[1, 0]).tolist() == [1.0, -0.5, -0.25]


def test_aggregate_matches_naive_loops_and_invariants():
    g = torch.Generator().manual_seed(1)
    s = torch.randint(-1, 2, (3, 2, 50), generator=g).float()
    wj, wc = [0.5, 1.0, 2.0], [1.0, 3.0]
    out = judges.aggregate(s, judge_weights=wj, criterion_weights=wc)
    for b in range(50):
        per_c = [sum(wj[j] * s[j, c, b].item() for j in range(3)) / sum(wj) for c in range(2)]
        assert abs(out[b].item() - sum(w * v for w, v in zip(wc, per_c)) / sum(wc)) < 1e-6
    # permuting judges (with their weights) changes nothing; unanimous judges give their common score
    perm = [2, 0, 1]
    permuted = judges.aggregate(s[perm], judge_weights=[wj[i] for i in perm], criterion_weights=wc)
    torch.testing.assert_close(permuted, out)
    same = s[:1].expand(3, -1, -1)
    for how in ("mean", "majority", "veto"):
        torch.testing.assert_close(judges.aggregate(same, how=how), s[0].mean(0))


def test_aggregate_errors():
    with pytest.raises(ValueError, match="judges, criteria, replies"):
        judges.aggregate(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="how"):
        judges.aggregate(torch.zeros(1, 1, 2), how="median")
    with pytest.raises(ValueError, match="non-negative"):
        judges.aggregate(torch.zeros(2, 1, 2), judge_weights=[1, -1])


def test_judge_reward_and_agreement(sentiment):
    gt = judges.GroundTruthJudge()
    reward = judges.judge_reward([gt, gt], sentiment, criteria=("socratic", "harmless"))
    p = "User: What is justice?\nAssistant:"
    out = reward([p, p], [" Justice is giving each person what is owed to them.",
                          " What do you think justice is? Would you say it is paying back what we owe?"])
    assert out.tolist() == [0.0, 1.0]  # socratic -1 / +1, harmless +1 for both
    assert reward.calls == 2
    a = torch.tensor([1, 1, 0, -1, -1, 1])
    assert judges.agreement(a, a) == {"agreement": 1.0, "kappa": 1.0}
    k = judges.agreement(a, torch.tensor([1, 0, 0, -1, 1, 1]))
    # observed 4/6; chance = (3/6)(3/6) + (1/6)(2/6) + (2/6)(1/6) = 13/36
    assert abs(k["agreement"] - 4 / 6) < 1e-9 and abs(k["kappa"] - (4 / 6 - 13 / 36) / (1 - 13 / 36)) < 1e-9


# ------------------------------------------------------------------------ the API judge over real HTTP


class _Server:
    """A chat-completions server on 127.0.0.1 in a thread; ``plan`` lists what each request gets."""

    def __init__(self, plan=None, reply="Yes. It asks the user what they think."):
        self.plan, self.reply, self.requests = list(plan or []), reply, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                action = outer.plan.pop(0) if outer.plan else "ok"
                if action == "sleep":
                    time.sleep(1.0)
                    action = "ok"
                if isinstance(action, int):
                    data = json.dumps({"error": {"message": f"status {action}"}}).encode()
                    self.send_response(action)
                elif action == "garbage":
                    data = b"{not json"
                    self.send_response(200)
                else:
                    message = {"role": "assistant", "content": outer.reply}
                    data = json.dumps({"choices": [{"message": message}]}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    servers = []

    def make(plan=None, **kw):
        s = _Server(plan, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


MESSAGES = [{"role": "user", "content": "Is the reply Socratic? What is justice?\nReply: What do you think?"}]


def test_client_posts_chat_completions_and_caches_on_disk(server, tmp_path):
    s = server()
    client = ChatClient("judge-model", base_url=s.base_url, api_key="sk-test", cache_dir=tmp_path, backoff=0)
    assert client.complete(MESSAGES) == "Yes. It asks the user what they think."
    req = s.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    assert req["body"]["model"] == "judge-model" and req["body"]["messages"] == MESSAGES
    # the same request again: answered from the disk cache, no HTTP request
    again = ChatClient("judge-model", base_url=s.base_url, api_key="sk-test", cache_dir=tmp_path)
    assert again.complete(MESSAGES) == "Yes. It asks the user what they think."
    assert len(s.requests) == 1 and again.stats["cache_hits"] == 1
    files = list(tmp_path.rglob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["messages"] == MESSAGES
    # another model or other messages are other keys
    other = ChatClient("other-model", base_url=s.base_url, api_key="sk-test", cache_dir=tmp_path)
    other.complete(MESSAGES)
    assert len(s.requests) == 2


def test_client_retries_a_500_then_succeeds(server, tmp_path):
    s = server([500, 503, "ok"])
    client = ChatClient("m", base_url=s.base_url, cache_dir=tmp_path, retries=3, backoff=0.01)
    assert client.complete(MESSAGES).startswith("Yes")
    assert len(s.requests) == 3 and client.stats["retries"] == 2


def test_client_times_out_then_retries(server, tmp_path):
    s = server(["sleep", "ok"])
    client = ChatClient("m", base_url=s.base_url, cache_dir=tmp_path, timeout=0.3, retries=1, backoff=0.01)
    assert client.complete(MESSAGES).startswith("Yes")
    assert client.stats["retries"] == 1


def test_client_gives_up_with_a_clear_error(server, tmp_path):
    s = server(["sleep", "sleep"])
    client = ChatClient("m", base_url=s.base_url, cache_dir=tmp_path, timeout=0.2, retries=1, backoff=0.01)
    with pytest.raises(JudgeServerError, match=r"after 2 tries \(no answer within 0.2 s \(timeout\)\)"):
        client.complete(MESSAGES)
    s2 = server([500, 500])
    client = ChatClient("m", base_url=s2.base_url, cache_dir=tmp_path, retries=1, backoff=0.01)
    with pytest.raises(JudgeServerError, match="HTTP 500"):
        client.complete(MESSAGES)
    assert not list(tmp_path.rglob("*.json"))  # failures are not cached


def test_client_does_not_retry_a_rejected_key_or_a_bad_request(server, tmp_path):
    s = server([401])
    client = ChatClient("m", base_url=s.base_url, api_key="sk-wrong", cache_dir=tmp_path, backoff=0.01)
    with pytest.raises(JudgeServerError, match="refused the API key.*OPENAI_API_KEY"):
        client.complete(MESSAGES)
    assert len(s.requests) == 1
    s = server([404])
    with pytest.raises(JudgeServerError, match="HTTP 404"):
        ChatClient("m", base_url=s.base_url, cache_dir=tmp_path, backoff=0.01).complete(MESSAGES)
    s = server(["garbage"])
    with pytest.raises(JudgeServerError, match="choices"):
        ChatClient("m", base_url=s.base_url, cache_dir=tmp_path, backoff=0.01).complete(MESSAGES)


def test_missing_key_and_unreachable_server_errors(tmp_path, monkeypatch):
    with pytest.raises(JudgeConfigError, match="OPENAI_API_KEY.*COURSE_JUDGE_BASE_URL"):
        ChatClient("m", cache_dir=tmp_path)  # the hosted default needs a key
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert ChatClient("m", cache_dir=tmp_path).api_key == "sk-env"
    with pytest.raises(JudgeConfigError, match="http://"):
        ChatClient("m", base_url="localhost:8000/v1", cache_dir=tmp_path)
    # a closed port on loopback: connection refused, named with the address
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = ChatClient("m", base_url=f"http://127.0.0.1:{port}/v1", cache_dir=tmp_path, retries=1, backoff=0.01)
    with pytest.raises(JudgeServerError, match=rf"127.0.0.1:{port}/v1/chat/completions after 2 tries.*Refused"):
        client.complete(MESSAGES)


def test_environment_configures_the_client(server, tmp_path, monkeypatch):
    s = server()
    monkeypatch.setenv("COURSE_JUDGE_BASE_URL", s.base_url)
    monkeypatch.setenv("COURSE_JUDGE_MODEL", "qwen-local")
    client = ChatClient(cache_dir=tmp_path)  # loopback: no key needed
    assert client.model == "qwen-local" and client.api_key is None
    client.complete(MESSAGES)
    assert s.requests[0]["auth"] is None and s.requests[0]["body"]["model"] == "qwen-local"


def test_api_judge_end_to_end(server, tmp_path, sentiment):
    s = server(reply="No. The reply only states the answer.")
    judge = ChatAPIJudge(ChatClient("m", base_url=s.base_url, cache_dir=tmp_path), max_workers=3)
    prompts = ["User: What is 3 plus 4?\nAssistant:"] * 4
    responses = [" 3 plus 4 is 7.", " The answer is 7.", " It is 7.", " Seven."]
    verdicts = judge.verdicts(prompts, responses, "socratic", sentiment)
    assert [v.score for v in verdicts] == [-1] * 4 and len(s.requests) == 4
    assert "A Socratic reply teaches" in s.requests[0]["body"]["messages"][0]["content"]  # instruction included
    judge.verdicts(prompts, responses, "socratic", sentiment)
    assert len(s.requests) == 4  # all cached


def test_chat_server_serves_a_function(tmp_path, sentiment):
    seen = []

    def complete(messages):
        seen.append(messages)
        return "Yes. Good question back to you."

    with judges.ChatServer(complete, model="tiny") as srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        judge = ChatAPIJudge(ChatClient("tiny", base_url=srv.base_url, cache_dir=tmp_path), instruction=False)
        v = judge.verdicts(["User: What is justice?\nAssistant:"], [" What do you think?"], "socratic", sentiment)
    assert v[0].score == 1 and seen[0][0]["content"].startswith("Is the reply Socratic? What is justice?")
    with pytest.raises(ValueError, match="loopback"):
        judges.ChatServer(complete, host="0.0.0.0")


def test_chat_server_reports_model_errors_as_500(tmp_path):
    def broken(messages):
        raise RuntimeError("model exploded")

    with judges.ChatServer(broken) as srv:
        client = ChatClient("m", base_url=srv.base_url, cache_dir=tmp_path, retries=0)
        with pytest.raises(JudgeServerError, match="model exploded"):
            client.complete(MESSAGES)


# ------------------------------------------------------------------------------------------- LM judges


def test_judge_transcripts_are_balanced_and_fit_the_tiny_model():
    from collections import Counter

    from helpers import zoo

    _, tok = zoo.load_tiny("base")
    records = judges.judge_transcripts(600, seed=0, tokenizer=tok)
    counts = Counter((r["criterion"], r["score"]) for r in records)
    assert counts[("socratic", 1)] == counts[("socratic", 0)] == counts[("socratic", -1)] == 100
    assert counts[("harmless", 1)] == counts[("harmless", -1)] == 150
    gt = judges.GroundTruthJudge()
    for r in records[:50]:
        assert r["prompt"].startswith("User: Is the reply ") and r["prompt"].endswith("\nAssistant:")
        assert len(tok(r["prompt"] + r["response"])["input_ids"]) <= 128
        assert r["response"].strip() in [t for v in judges._GT_REASONS.values() for t in v]
    assert judges.judge_transcripts(30, seed=1, tokenizer=tok) == judges.judge_transcripts(30, seed=1, tokenizer=tok)


def test_lm_judge_generates_parses_and_switches_adapters(sentiment):
    from peft import LoraConfig, get_peft_model

    from helpers import zoo

    base, tok = zoo.load_tiny("base")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    model.set_adapter("first")
    prompts = ["User: What is justice?\nAssistant:", "User: What is 3 plus 4?\nAssistant:"]
    replies = [" What do you think justice is?", " 3 plus 4 is 7."]
    judge = judges.LMJudge(model, tok, adapter="second", max_new_tokens=8)
    texts = judge.reason(prompts, replies, CRITERIA["socratic"])
    assert len(texts) == 2 and all(isinstance(t, str) and "\n" not in t for t in texts)
    assert model.active_adapter == "first"  # restored after judging with "second"
    assert judge.prompts_for(prompts, replies, CRITERIA["socratic"])[0] == (
        "User: Is the reply Socratic? What is justice?\nReply: What do you think justice is?\nAssistant:")
    off = judges.LMJudge(model, tok, adapter=False, max_new_tokens=8)
    verdicts = off.verdicts(prompts, replies, "socratic", sentiment)
    assert [v.judge for v in verdicts] == ["LM judge"] * 2 and all(v.score in (-1, 0, 1) for v in verdicts)
    # a long reply is cut to max_reply_tokens before the judge sees it
    short = judges.LMJudge(model, tok, max_reply_tokens=5)
    assert len(tok(short._shorten(" What do you think? " * 20))["input_ids"]) == 5
