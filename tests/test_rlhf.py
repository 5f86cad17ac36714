"""The PPO loop of helpers.rlhf: the policy with a value head, rollouts, statistics, a short run, and two processes."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import agora, lm, rlhf, zoo

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model gains nothing from a second thread, and on a busy machine threads spinning for each other
    make it many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = zoo.load("local", "sft")
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts():
    return [p.text for p in agora.prompts(48, seed=3)]


def fresh_policy(config=rlhf.PPOConfig()):
    model, _ = zoo.load("local", "sft")
    return rlhf.make_policy(model, config)


# ------------------------------------------------------------------------------------------ statistics


def test_t_quantile_hand_worked_and_tends_to_the_normal():
    # Table values of Student's t: t_{0.975}(10) = 2.228, t_{0.975}(30) = 2.042, t_{0.95}(20) = 1.725.
    assert abs(rlhf.t_quantile(0.975, 10) - 2.228) < 2e-3
    assert abs(rlhf.t_quantile(0.975, 30) - 2.042) < 1e-3
    assert abs(rlhf.t_quantile(0.95, 20) - 1.725) < 1e-3
    assert abs(rlhf.t_quantile(0.975, 100_000) - 1.95996) < 1e-4
    assert rlhf.t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)  # symmetric around 0


def test_mean_ci_hand_worked_and_naive():
    # x = 1, 2, 3, 4, 5: mean 3, sd sqrt(2.5), half-width t_{0.975}(4) * sd / sqrt(5) = 2.776 * 0.7071 = 1.963.
    e = rlhf.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert e.mean == 3.0 and e.n == 5
    assert abs((e.hi - e.lo) / 2 - 2.776 * math.sqrt(2.5) / math.sqrt(5)) < 0.02
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, generator=g, dtype=torch.float64) + 0.3
    naive_half = rlhf.t_quantile(0.975, 199) * float(x.std()) / math.sqrt(200)
    e = rlhf.mean_ci(x)
    assert e.mean == pytest.approx(float(x.mean())) and e.hi - e.mean == pytest.approx(naive_half)


def test_paired_effect_invariants():
    g = torch.Generator().manual_seed(1)
    before = torch.randn(100, generator=g)
    after = before + 0.5 + 0.1 * torch.randn(100, generator=g)
    e = rlhf.paired_effect(after, before)
    assert e.excludes_zero and e.lo < 0.5 < e.hi
    # Shifting both sides changes nothing; swapping them negates the interval.
    assert rlhf.paired_effect(after + 7, before + 7).mean == pytest.approx(e.mean)
    swapped = rlhf.paired_effect(before, after)
    assert swapped.mean == pytest.approx(-e.mean) and swapped.lo == pytest.approx(-e.hi)
    # Coverage: about 95% of intervals from samples with true mean 0 contain 0.
    hits = sum(not rlhf.mean_ci(torch.randn(30, generator=g)).excludes_zero for _ in range(400))
    assert 0.91 < hits / 400 < 0.99
    with pytest.raises(ValueError, match="same prompts"):
        rlhf.paired_effect(torch.zeros(3), torch.zeros(4))


# --------------------------------------------------------------------------------------- pieces of the loop


def test_batch_indices_cover_every_prompt_once_per_pass():
    n, B = 10, 4
    seen = [i for step in range(5) for i in rlhf._batch_indices(n, B, step, seed=0)]  # 20 = two passes
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]  # a fresh order on each pass
    assert seen == [i for step in range(5) for i in rlhf._batch_indices(n, B, step, seed=0)]  # deterministic
    assert seen != [i for step in range(5) for i in rlhf._batch_indices(n, B, step, seed=1)]


def test_concat_pads_prompts_left_and_responses_right():
    a = lm.Rollout(["p"], ["x"], torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long),
                   torch.tensor([[0, 0, 1]]), prompt_len=2)
    b = lm.Rollout(["q"], ["yz"], torch.tensor([[8, 9, 1, 2]]), torch.ones(1, 4, dtype=torch.long),
                   torch.tensor([[0, 0, 1, 1]]), prompt_len=2)
    c = lm.Rollout(["r"], ["w"], torch.tensor([[3, 4, 4, 1]]), torch.ones(1, 4, dtype=torch.long),
                   torch.tensor([[0, 0, 0, 1]]), prompt_len=3)
    out = rlhf._concat([a, b, c], pad_id=0)
    assert out.prompt_len == 3 and out.prompts == ["p", "q", "r"] and out.responses == ["x", "yz", "w"]
    assert out.input_ids.tolist() == [[0, 5, 6, 7, 0], [0, 8, 9, 1, 2], [3, 4, 4, 1, 0]]
    assert out.attention_mask.tolist() == [[0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert out.response_mask.tolist() == [[0, 0, 0, 1, 0], [0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]
    assert rlhf._concat([a], 0) is a


def test_truncate_at_stop(tiny):
    _, tok = tiny
    prompt = "User: What is 2 plus 2?\nAssistant:"
    response = " 2 plus 2 is 4.\nUser: thanks"
    enc_p = tok([prompt], return_tensors="pt")["input_ids"]
    enc_r = tok([response + zoo.EOS], return_tensors="pt")["input_ids"]
    ids = torch.cat([enc_p, enc_r], 1)
    P = enc_p.shape[1]
    resp_mask = torch.zeros_like(ids)
    resp_mask[:, P:] = 1
    roll = lm.Rollout([prompt], [response], ids, torch.ones_like(ids), resp_mask, P)
    out = rlhf.truncate_at_stop(roll, tok, ["\nUser:"])
    assert out.responses == [" 2 plus 2 is 4."]
    kept = out.input_ids[0, P:][out.response_mask[0, P:].bool()].tolist()
    text = tok.decode(kept)
    assert text.startswith(" 2 plus 2 is 4.") and "\nUser:" in text and "thanks" not in text
    assert (out.attention_mask == out.attention_mask * 0 + (out.input_ids != tok.pad_token_id)).all()
    assert rlhf.truncate_at_stop(roll, tok, []) is roll
    assert rlhf.truncate_at_stop(roll, tok, ["never there"]).responses == [response]


def test_policy_starts_as_the_reference_and_only_the_adapter_trains(tiny, prompts):
    model, tok = tiny
    policy = fresh_policy()
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    enc = tok(prompts[:4], return_tensors="pt", padding=True)
    ids, att = enc["input_ids"], enc["attention_mask"]
    logits, values = policy(ids, att)
    assert logits.shape[:2] == ids.shape and values.shape == ids.shape
    assert (values == 0).all()  # zero-initialised head
    base = model(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    torch.testing.assert_close(logits, base)  # LoRA's B starts at 0: the policy is the SFT model
    with torch.no_grad():  # move the adapter: the policy changes, the reference does not
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    moved, _ = policy(ids, att)
    with policy.reference() as ref:
        ref_logits = ref(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).clamp(min=0)).logits
    assert not torch.allclose(moved, base, atol=1e-3)
    torch.testing.assert_close(ref_logits, base)
    with pytest.raises(ValueError, match="merge"):
        rlhf.make_policy(policy.model)


def test_gradient_checkpointing_recomputes_layers_and_keeps_gradients(tiny, prompts):
    _, tok = tiny
    enc = tok(prompts[:4], return_tensors="pt", padding=True)
    ids, att = enc["input_ids"], enc["attention_mask"]

    def grads_and_calls(policy):
        with torch.no_grad():  # a non-trivial adapter and value head, the same in both policies
            for i, (n, p) in enumerate(sorted(policy.named_parameters())):
                if p.requires_grad:
                    p.copy_(torch.sin(torch.arange(p.numel(), dtype=p.dtype) + i).reshape(p.shape) * 0.05)
        layer = next(m for m in policy.model.modules() if type(m).__name__ == "GPT2Block").mlp  # inside the checkpoint
        calls = []
        hook = layer.register_forward_pre_hook(lambda *a: calls.append(1))
        logits, values = policy(ids, att)
        (logits.log_softmax(-1)[..., 5].mean() + values.pow(2).mean()).backward()
        hook.remove()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}, len(calls)

    plain, plain_calls = grads_and_calls(fresh_policy())
    policy = rlhf.enable_gradient_checkpointing(fresh_policy())
    ckpt, ckpt_calls = grads_and_calls(policy)
    assert plain_calls == 1 and ckpt_calls == 2  # the layer ran again in the backward pass
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)
    # outside the training forward the layers are back in eval mode: generation keeps its KV cache
    assert not any(m.training for m in policy.model.modules())
    # a short PPO run trains the same with and without it
    config = rlhf.PPOConfig(steps=2, batch_size=8, mini_batch_size=4, max_new_tokens=8)
    reward = lambda p, r: torch.tensor([float(len(x)) / 10 for x in r])
    runs = [rlhf.train_ppo(pol, tok, prompts, reward, config, progress=False).history
            for pol in (fresh_policy(config), rlhf.enable_gradient_checkpointing(fresh_policy(config)))]
    for a, b in zip(*runs):
        for k in ("score", "kl", "pg_loss", "vf_loss"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


def test_deepspeed_on_cpu_only_under_a_deepspeed_launch_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert not rlhf.deepspeed_on_cpu()  # a plain run
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    assert rlhf.deepspeed_on_cpu()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not rlhf.deepspeed_on_cpu()  # GPUs: Accelerate picks NCCL itself


def test_save_and_load_policy_round_trip(tmp_path, tiny, prompts):
    _, tok = tiny
    policy = fresh_policy()
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    rlhf.save_policy(policy, tmp_path)
    model, _ = zoo.load("local", "sft")
    loaded = rlhf.load_policy(model, tmp_path)
    enc = tok(prompts[:3], return_tensors="pt", padding=True)
    a, b = policy(enc["input_ids"], enc["attention_mask"]), loaded(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])


def test_evaluate_shapes_and_zero_kl_at_start(tiny, prompts):
    _, tok = tiny
    policy = fresh_policy()
    calls = []

    def n_words(ps, rs):
        calls.append(len(rs))
        return torch.tensor([float(len(r.split())) for r in rs])

    ev = rlhf.evaluate(policy, tok, prompts[:10], {"words_fn": n_words, "true": rlhf.agora_reward_fn()},
                       n_samples=2, batch_size=4)
    assert ev.scores["words_fn"].shape == (10, 2) and ev.kl.shape == (10, 2) and len(ev.responses[9]) == 2
    torch.testing.assert_close(ev.scores["words_fn"], ev.words)  # the reward saw the evaluated responses
    assert ev.kl.abs().max() < 1e-4  # the adapter starts at zero: policy == reference
    assert sum(calls) == 20 and ev.per_prompt("true").shape == (10,)
    assert set(ev.summary()) == {"words_fn", "true", "words", "tokens", "kl"}
    plain = rlhf.evaluate(tiny[0], tok, prompts[:4], {"true": rlhf.agora_reward_fn()})
    assert plain.kl is None  # no adapter, no ref_model: no KL


# -------------------------------------------------------------------------------------------------- the loop


def test_train_ppo_two_steps(tiny, prompts):
    _, tok = tiny
    config = rlhf.PPOConfig(steps=2, batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=12,
                            init_kl_coef=0.2, target_kl=0.01, kl_horizon=100)
    policy = fresh_policy(config)
    base = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    seen = []

    def callback(step, stats, batch):
        seen.append(step)
        assert len(batch["responses"]) == 8 and batch["scores"].shape == (8,) and batch["kl"].shape == (8,)
        stats["extra"] = 1.0

    result = rlhf.train_ppo(policy, tok, prompts, rlhf.agora_reward_fn(), config, callbacks=[callback],
                            progress=False)
    assert seen == [0, 1] and len(result.history) == 2 and result.history[1]["extra"] == 1.0
    keys = {"step", "score", "score_std", "kl", "reward", "kl_coef", "entropy", "response_tokens", "pg_loss",
            "vf_loss", "clipfrac", "approx_kl", "value_mean", "explained_variance", "seconds", "cpu_seconds"}
    assert keys <= set(result.history[0])
    assert all(math.isfinite(v) for h in result.history for v in h.values())
    assert result.history[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout is the reference's
    # The adaptive controller moved beta: KL above target raises it, below lowers it.
    h = result.history
    assert h[1]["kl_coef"] == pytest.approx(0.2 * (1 + max(-0.2, min(0.2, h[0]["kl"] / 0.01 - 1)) * 8 / 100))
    assert any((p != 0).any() for n, p in result.policy.named_parameters() if "lora_B" in n)  # the adapter moved
    for n, p in result.policy.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"frozen weight {n} changed"
    assert len(result.samples) == 8 and result.curve("score") == [x["score"] for x in h]


def test_train_ppo_learns_a_simple_preference(tiny, prompts):
    """A reward for short answers: PPO must shorten them within a few steps (a test that can fail)."""
    _, tok = tiny
    config = rlhf.PPOConfig(steps=8, batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=16,
                            init_kl_coef=0.01, lr=1e-2, seed=1)

    def short(ps, rs):
        return torch.tensor([-len(r.split()) / 4.0 for r in rs])

    result = rlhf.train_ppo(fresh_policy(config), tok, prompts, short, config, progress=False)
    first, last = result.history[0], result.history[-1]
    assert last["score"] > first["score"] + 0.3, (first["score"], last["score"])
    assert last["kl"] > 0.0


def test_stop_strings_and_early_stop(tiny, prompts):
    _, tok = tiny
    config = rlhf.PPOConfig(steps=5, batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=12,
                            stop_strings=(".",))
    got = []

    def reward(ps, rs):
        got.extend(rs)
        return torch.zeros(len(rs))

    result = rlhf.train_ppo(fresh_policy(config), tok, prompts, reward, config,
                            callbacks=[lambda step, stats, batch: step == 1], progress=False)
    assert len(result.history) == 2  # the callback stopped it after step 1
    assert all("." not in r for r in got)


def test_bad_configuration_and_reward_are_clear_errors(tiny, prompts):
    _, tok = tiny
    with pytest.raises(ValueError, match="mini_batch_size"):
        rlhf.train_ppo(fresh_policy(), tok, prompts, rlhf.agora_reward_fn(),
                       rlhf.PPOConfig(steps=1, batch_size=8, mini_batch_size=3), progress=False)
    with pytest.raises(ValueError, match="one score per response"):
        rlhf.train_ppo(fresh_policy(), tok, prompts, lambda p, r: torch.zeros(3),
                       rlhf.PPOConfig(steps=1, batch_size=4, mini_batch_size=4, max_new_tokens=4), progress=False)


def test_cached_training_builds_once(tmp_path, monkeypatch, tiny, prompts):
    _, tok = tiny
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    model_fn = lambda: zoo.load("local", "sft")[0]  # noqa: E731
    config = rlhf.PPOConfig(steps=1, batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=8)
    calls = []

    def reward(ps, rs):
        calls.append(1)
        return torch.ones(len(rs))

    # zoo.load reads its own cache: point it back at the shared one while this test's runs are cached apart.
    monkeypatch.setattr(zoo, "build", lambda config=zoo.TinyConfig(), **kw: zoo_dir)
    a = rlhf.train_ppo_cached("test", model_fn, tok, prompts, reward, config, key={"reward": "ones"}, progress=False)
    b = rlhf.train_ppo_cached("test", model_fn, tok, prompts, reward, config, key={"reward": "ones"}, progress=False)
    assert len(calls) == 1 and a.history == b.history and a.samples == b.samples
    for (n, p), (_, q) in zip(a.policy.named_parameters(), b.policy.named_parameters()):
        torch.testing.assert_close(p, q)
    rlhf.train_ppo_cached("test", model_fn, tok, prompts, reward, config, key={"reward": "twos"}, progress=False)
    assert len(calls) == 2  # another key, another run


def test_evaluation_callback_logs_into_the_history(tiny, prompts):
    _, tok = tiny
    config = rlhf.PPOConfig(steps=2, batch_size=4, mini_batch_size=4, ppo_epochs=1, max_new_tokens=8)
    every = rlhf.evaluation_callback(2, tok, prompts[:4], {"true": rlhf.agora_reward_fn()}, config=config)
    result = rlhf.train_ppo(fresh_policy(config), tok, prompts, rlhf.agora_reward_fn(), config, callbacks=[every],
                            progress=False)
    assert "eval_true" not in result.history[0]
    assert {"eval_true", "eval_kl", "eval_words", "eval_tokens"} <= set(result.history[1])


@pytest.mark.parametrize("trainer", ["grpo", "dpo"])
def test_trl_trainers_train_the_same_kind_of_adapter(trainer, tiny, prompts, tmp_path):
    model, tok = zoo.load("local", "sft")
    config = rlhf.TRLConfig(trainer=trainer, steps=2, batch_size=4, num_generations=2, max_new_tokens=8, lr=1e-2)
    pairs = agora.preference_pairs(16, seed=0)
    n_chars = lambda ps, rs: torch.tensor([float(len(r)) for r in rs])  # noqa: E731  (ties would give GRPO no signal)
    peft_model, log, seconds = rlhf.train_trl(model, tok, config, prompts=prompts[:8], reward_fn=n_chars,
                                              pairs=pairs, out_dir=tmp_path, progress=False)
    assert len(log) == 2 and seconds > 0
    assert any((p != 0).any() for n, p in peft_model.named_parameters() if "lora_B" in n)  # the adapter moved
    ev = rlhf.evaluate(peft_model, tok, prompts[:4], {"true": rlhf.agora_reward_fn()}, config=rlhf.PPOConfig(max_new_tokens=8))
    assert ev.kl is not None and torch.isfinite(ev.kl).all()  # the reference is the adapter switched off
    with pytest.raises(ValueError, match="unknown trainer"):
        rlhf.train_trl(model, tok, rlhf.TRLConfig(trainer="ppo"), out_dir=tmp_path)


zoo_dir = zoo.model_dir()


# ----------------------------------------------------------------------------------------- two processes


@pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(),
                    reason="torchrun is not installed")
def test_two_processes_match_one(tmp_path):
    """torchrun --nproc_per_node 2 runs the same loop: same samples, and the same weights after two updates."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    zoo.build()  # both runs read the cached tiny model
    args = ["-m", "helpers.rlhf", "--steps", "2", "--batch-size", "8", "--mini-batch-size", "8",
            "--generation-batch-size", "2", "--prompts", "16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    assert rlhf.main(args[2:] + ["--out", str(tmp_path / "one")]) == 0  # one process: right here
    with socket.socket() as sock:  # a free port for the two processes' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port), *args, "--out",
                          str(tmp_path / "two")], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "2 process(es)" in two.stdout
    h1 = json.loads((tmp_path / "one" / "history.json").read_text())
    h2 = json.loads((tmp_path / "two" / "history.json").read_text())
    for a, b in zip(h1, h2):  # the same rollouts, scores and KL
        assert a["score"] == pytest.approx(b["score"], abs=1e-5) and a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    w1, w2 = torch.load(tmp_path / "one" / "trainable.pt"), torch.load(tmp_path / "two" / "trainable.pt")
    assert set(w1) == set(w2)
    moved = 0.0
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-4, rtol=1e-3)
        moved = max(moved, w1[k].abs().max().item())
    assert moved > 1e-3  # the comparison is not between two untrained adapters
