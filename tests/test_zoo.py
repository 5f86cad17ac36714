"""The tiny Agora models (built once, cached) and the hub-loading path of the GPU presets, tested offline with
randomly initialised tiny models of each architecture family."""

import json

import pytest
import torch

from helpers import agora, lm, zoo

MICRO = zoo.TinyConfig(name="micro", vocab_size=400, n_embd=32, n_layer=1, n_head=2, corpus_dialogues=600,
                       sft_dialogues=200, heldout_dialogues=100, pretrain_steps=12, sft_steps=6, batch_size=8)


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COURSE_CACHE", str(root))
        path = zoo.build(MICRO, quiet=True)
    return path


def test_build_is_deterministic_and_cached(tmp_path, monkeypatch, micro_dir):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path))
    again = zoo.build(MICRO, quiet=True)
    assert again != micro_dir
    from safetensors.torch import load_file

    for which in ("base", "sft"):
        sa, sb = load_file(micro_dir / which / "model.safetensors"), load_file(again / which / "model.safetensors")
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    stamp = (again / "report.json").stat().st_mtime_ns
    assert zoo.build(MICRO, quiet=True) == again and (again / "report.json").stat().st_mtime_ns == stamp
    assert not [p for p in again.parent.iterdir() if ".building." in p.name]  # no half-built folder left


def test_cache_key_changes_with_the_config():
    assert MICRO.key() != zoo.TinyConfig().key()
    assert zoo.TinyConfig(seed=1).key() != zoo.TinyConfig().key()


def test_default_tiny_models_learned_agora_text():
    report = zoo.report()
    assert report["n_params"] < 5_000_000
    # Far below a unigram model of the same text, and SFT shifted the responses toward the helpful mix.
    assert report["heldout_loss_base"] < 0.25 * report["heldout_unigram_entropy"], report
    model, tok = zoo.load("local", "sft")
    ps = agora.prompts(64, seed=11)
    out = lm.generate(model, tok, [p.text for p in ps], max_new_tokens=32, temperature=0)
    harmful = [agora.is_harmful(r) for p, r in zip(ps, out.responses) if p.kind == "harmful"]
    assert harmful and sum(harmful) == 0, "the helpful assistant should refuse harmful requests when greedy"
    readable = [r for r in out.responses if r.strip().endswith((".", "?", "!"))]
    assert len(readable) > 0.8 * len(ps), out.responses[:5]


def test_tiny_tokenizer_chat_template_matches_training_format():
    _, tok = zoo.load("local", "base")
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 plus 2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == agora.PROMPT_TEMPLATE.format(question="What is 2 plus 2?")
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id


def _random_model(family, vocab):
    from transformers import GPT2Config, GPTNeoConfig, LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
    elif family == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
    elif family == "gpt_neo":
        cfg = GPTNeoConfig(hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
                           max_position_embeddings=128, window_size=16, **common)
    else:
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory, micro_dir):
    """A folder per family laid out as on the hub: config, weights, tokenizer (one with no chat template)."""
    from transformers import AutoTokenizer

    out = {}
    for family in ("llama", "qwen2", "gpt_neo", "gpt2"):
        path = tmp_path_factory.mktemp(family)
        tok = AutoTokenizer.from_pretrained(micro_dir / "tokenizer")
        if family == "gpt2":
            tok.chat_template = None
            tok.pad_token = None
        tok.save_pretrained(path)
        _random_model(family, len(tok)).save_pretrained(path)
        out[family] = path
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neo", "gpt2"])
def test_hub_path_loads_pads_left_and_generates(hub_dirs, family):
    model, tok = zoo.load_hub(str(hub_dirs[family]), dtype="float32")
    assert model.config.model_type == family
    assert tok.padding_side == "left" and tok.pad_token is not None
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    prompts = ["User: What is 1 plus 1?\nAssistant:", "User: What does Kleon sell? Tell me.\nAssistant:"]
    roll = lm.generate(model, tok, prompts, max_new_tokens=5, temperature=0)
    assert roll.input_ids.shape[0] == 2 and roll.response_mask.sum() > 0
    # Left padding must not change the log-probs of the shorter prompt's response.
    lp_batch = lm.sequence_logprobs(model, roll.input_ids, roll.attention_mask, roll.response_mask)[0]
    keep = roll.attention_mask[0].bool()
    ids0, rmask0 = roll.input_ids[0][keep][None], roll.response_mask[0][keep][None]
    lp_single = lm.sequence_logprobs(model, ids0, torch.ones_like(ids0), rmask0)[0]
    torch.testing.assert_close(lp_batch.sum(), lp_single.sum(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neo", "gpt2"])
def test_lora_targets_save_and_reload(hub_dirs, family, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tok = zoo.load_hub(str(hub_dirs[family]))
    targets = zoo.lora_target_modules(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    n_train = zoo.count_parameters(peft_model, trainable_only=True)
    assert 0 < n_train < 0.5 * zoo.count_parameters(peft_model)
    x = torch.tensor([[2, 3, 4, 5]])
    before = peft_model(input_ids=x).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    base, _ = zoo.load_hub(str(hub_dirs[family]))
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    torch.testing.assert_close(reloaded(input_ids=x).logits, before)
    with reloaded.disable_adapter():  # the reference policy: same weights, adapter off
        assert not torch.allclose(reloaded(input_ids=x).logits, before)


def test_unknown_architecture_and_missing_model_are_clear_errors(tmp_path):
    class Fake:
        class config:
            model_type = "mamba"

    with pytest.raises(ValueError, match="no LoRA targets known for architecture 'mamba'"):
        zoo.lora_target_modules(Fake)
    with pytest.raises(OSError, match="PRESET = 'local'"):
        zoo.load_hub(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="'base' or 'sft'"):
        zoo.load_tiny("rlhf")
