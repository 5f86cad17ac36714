"""The course's models: tiny Agora models for the ``local`` preset, hub models for GPU presets.

``load(preset, which)`` is the one entry point. On ``local`` it returns the tiny models, built on first use:

1. a byte-level BPE tokenizer (HF ``tokenizers``) trained on Agora text;
2. ``base``: a GPT-2-architecture causal LM pretrained on Agora dialogues in every response style (the
   "internet": correct, wrong, harmful, evasive, ...);
3. ``sft``: ``base`` fine-tuned on the helpful assistant's mix of styles (:data:`helpers.agora.HELPFUL_MIX`),
   loss on response tokens only: the starting point for RLHF.

Everything is deterministic from :class:`TinyConfig` (seed included) and cached on disk under
``$COURSE_CACHE/zoo/<name>-<hash of the config>/`` by :func:`helpers.cache.build_once`: built once per
configuration and machine, never seen half-written. On GPU presets ``load`` reads ``preset.model_id`` from the Hugging Face hub; that path is
tested offline with randomly initialised tiny Llama, Qwen2, GPT-Neo and GPT-2 models saved to disk.

Run ``python -m helpers.zoo build`` to build (or find) the cached models and print their report.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import agora, cache
from .runtime import PRESETS, Preset

EOS = "<|endoftext|>"
PAD = "<|pad|>"

# One turn: "User: ...\nAssistant: ...<|endoftext|>", the format the tiny models are trained on.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Which linear layers LoRA adapts, per architecture family (attention projections).
LORA_TARGETS = {
    "gpt2": ["c_attn"],
    "gpt_neo": ["q_proj", "k_proj", "v_proj", "out_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


@dataclass(frozen=True)
class TinyConfig:
    """Everything that determines the tiny models; its hash names the cache folder."""

    name: str = "agora-tiny"
    seed: int = 0
    """Seeds the corpus, the initial weights and the batch order."""
    vocab_size: int = 1024
    """BPE vocabulary; Agora text has a few hundred distinct words, so most are one token."""
    n_positions: int = 128
    """Longest sequence (prompt + response) in tokens."""
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    corpus_dialogues: int = 20_000
    """Pretraining dialogues (every style, uniformly)."""
    sft_dialogues: int = 6_000
    """Fine-tuning dialogues in the helpful mix."""
    heldout_dialogues: int = 1_000
    """Held-out dialogues (another seed) for the reported loss."""
    batch_size: int = 32
    block_size: int = 64
    """Pretraining packs the corpus into blocks of this many tokens."""
    pretrain_steps: int = 400
    sft_steps: int = 150
    lr: float = 3e-3
    sft_lr: float = 1e-3
    warmup_steps: int = 20

    def key(self) -> str:
        return cache.config_key(self, FORMAT_VERSION)


FORMAT_VERSION = 1
"""Bump when the build code changes what it produces, so old caches are not reused."""


def model_dir(config: TinyConfig = TinyConfig()) -> Path:
    return cache.artifact_dir("zoo", config.name, config, FORMAT_VERSION)


# ------------------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   unk_token=None, model_max_length=10_000)
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def prepare_tokenizer(tokenizer, *, padding_side: str = "left"):
    """Make a tokenizer ready for batched generation: a pad token, left padding, and a chat template.

    Decoder-only models must be padded on the left to generate (the new token follows the last real one).
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


# ----------------------------------------------------------------------------------------------------- build


def _texts(records: list[dict]) -> list[str]:
    return [r["prompt"] + r["response"] + EOS for r in records]


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def _train(model, batches, steps: int, lr: float, warmup: int, desc: str, seed: int) -> list[float]:
    """Plain AdamW loop with warm-up and cosine decay; ``batches(step)`` gives (input_ids, labels)."""
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, file=sys.stdout)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        input_ids, labels = batches(step)
        loss = model(input_ids=input_ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


def _sft_tensors(tokenizer, records: list[dict], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels with the prompt and padding masked out (-100)."""
    ids, labels = [], []
    for r in records:
        p = tokenizer(r["prompt"])["input_ids"]
        a = tokenizer(r["response"] + EOS)["input_ids"]
        seq = (p + a)[:max_len]
        lab = ([-100] * len(p) + a)[:max_len]
        ids.append(seq + [tokenizer.pad_token_id] * (max_len - len(seq)))
        labels.append(lab + [-100] * (max_len - len(lab)))
    return torch.tensor(ids), torch.tensor(labels)


@torch.no_grad()
def heldout_loss(model, tokenizer, records: list[dict], *, response_only: bool = True, batch_size: int = 64) -> float:
    """Mean per-token cross-entropy (nats) on ``records`` (responses only, or whole dialogues)."""
    max_len = model.config.max_position_embeddings if hasattr(model.config, "max_position_embeddings") else 128
    ids, labels = _sft_tensors(tokenizer, records, min(max_len, 128))
    if not response_only:
        labels = torch.where(ids == tokenizer.pad_token_id, -100, ids)
    total, count = 0.0, 0
    for i in range(0, len(ids), batch_size):
        batch = ids[i:i + batch_size]
        logits = model(input_ids=batch, attention_mask=(batch != tokenizer.pad_token_id).long()).logits[:, :-1]
        target = labels[i:i + batch_size, 1:]  # (B, T-1)
        mask = target != -100
        lp = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.clamp(min=0).reshape(-1),
                                               reduction="none").view_as(target)
        total += (lp * mask).sum().item()
        count += mask.sum().item()
    return total / max(1, count)


def build(config: TinyConfig = TinyConfig(), *, force: bool = False, quiet: bool = False) -> Path:
    """Build (or find) the tiny tokenizer and models for ``config``; returns their folder."""

    def builder(tmp: Path) -> None:
        report = _build_into(tmp, config, quiet=quiet)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))

    return cache.build_once("zoo", config.name, config, builder, version=FORMAT_VERSION, force=force)


def _build_into(out: Path, c: TinyConfig, *, quiet: bool) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    t0 = time.perf_counter()
    torch.manual_seed(c.seed)
    g = torch.Generator().manual_seed(c.seed)

    corpus = agora.dialogues(c.corpus_dialogues, seed=c.seed)
    sft = agora.dialogues(c.sft_dialogues, seed=c.seed + 1, mix=agora.HELPFUL_MIX)
    heldout = agora.dialogues(c.heldout_dialogues, seed=c.seed + 2)
    heldout_sft = agora.dialogues(c.heldout_dialogues, seed=c.seed + 3, mix=agora.HELPFUL_MIX)

    say(f"building the tiny Agora models ({c.name}, {c.key()}) into {out.parent} ...")
    tokenizer = train_tokenizer(_texts(corpus), c.vocab_size)
    tokenizer.save_pretrained(out / "tokenizer")

    # Pretraining: the corpus as one token stream, cut into blocks, batches drawn at random.
    stream = torch.tensor(tokenizer("".join(_texts(corpus)))["input_ids"])
    n_blocks = len(stream) // c.block_size
    blocks = stream[: n_blocks * c.block_size].view(n_blocks, c.block_size)  # (N, block)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    order = torch.randint(0, n_blocks, (c.pretrain_steps, c.batch_size), generator=g)

    def pretrain_batch(step):
        x = blocks[order[step]]
        return x, x

    t_pre = time.perf_counter()
    pre_losses = _train(model, pretrain_batch, c.pretrain_steps, c.lr, c.warmup_steps, "pretrain", c.seed)
    t_pre = time.perf_counter() - t_pre
    base_loss = heldout_loss(model, tokenizer, heldout, response_only=False)
    model.save_pretrained(out / "base")

    # SFT: the helpful mix, loss on the response only.
    ids, labels = _sft_tensors(tokenizer, sft, c.n_positions)
    keep = (ids != tokenizer.pad_token_id).sum(0) > 0  # drop columns that are padding in every row
    ids, labels = ids[:, keep], labels[:, keep]
    sft_order = torch.randint(0, len(ids), (c.sft_steps, c.batch_size), generator=g)

    def sft_batch(step):
        rows = sft_order[step]
        width = int((ids[rows] != tokenizer.pad_token_id).sum(1).max())  # trim the batch to its longest row
        return ids[rows, :width], labels[rows, :width]

    t_sft = time.perf_counter()
    sft_losses = _train(model, sft_batch, c.sft_steps, c.sft_lr, c.warmup_steps, "sft", c.seed)
    t_sft = time.perf_counter() - t_sft
    model.save_pretrained(out / "sft")

    unigram = _unigram_entropy(tokenizer, _texts(corpus), _texts(heldout))
    report = {
        "config": dataclasses.asdict(c),
        "key": c.key(),
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "corpus_tokens": int(len(stream)),
        "pretrain_seconds": round(t_pre, 1),
        "sft_seconds": round(t_sft, 1),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "pretrain_final_loss": round(sum(pre_losses[-20:]) / 20, 4),
        "sft_final_loss": round(sum(sft_losses[-20:]) / 20, 4),
        "heldout_loss_base": round(base_loss, 4),
        "heldout_unigram_entropy": round(unigram, 4),
        "heldout_response_loss_sft": round(heldout_loss(model, tokenizer, heldout_sft), 4),
        "torch": torch.__version__,
    }
    say(f"built in {report['build_seconds']} s: {report['n_params']:,} parameters, held-out loss "
        f"{report['heldout_loss_base']} nats/token (unigram {report['heldout_unigram_entropy']})")
    return report


def _unigram_entropy(tokenizer, train_texts: list[str], test_texts: list[str]) -> float:
    """Cross-entropy (nats/token) of a unigram model of the training text on the test text: the bar to beat."""
    counts = torch.ones(len(tokenizer))
    for t in train_texts[:5000]:
        counts += torch.bincount(torch.tensor(tokenizer(t)["input_ids"]), minlength=len(tokenizer))
    logp = (counts / counts.sum()).log()
    ids = torch.cat([torch.tensor(tokenizer(t)["input_ids"]) for t in test_texts])
    return -logp[ids].mean().item()


def report(config: TinyConfig = TinyConfig()) -> dict:
    """The build report of the cached tiny models (building them if needed)."""
    return json.loads((build(config) / "report.json").read_text())


# ------------------------------------------------------------------------------------------------------ load


def load_tiny(which: str = "sft", config: TinyConfig = TinyConfig(), *, padding_side: str = "left"):
    """The tiny ``base`` or ``sft`` model (float32, CPU, eval mode) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if which not in ("base", "sft"):
        raise ValueError(f"which must be 'base' or 'sft', got {which!r}")
    root = build(config)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(root / "tokenizer"), padding_side=padding_side)
    model = AutoModelForCausalLM.from_pretrained(root / which)
    model.eval()
    return model, tokenizer


def load_hub(model_id: str, *, dtype: str | torch.dtype = "float32", device: str = "cpu", padding_side: str = "left"):
    """A causal LM and its tokenizer from the hub (or a local folder in the same layout), ready to generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
    except OSError as e:
        raise OSError(f"could not load {model_id!r}: {e}. GPU presets download models from the Hugging Face hub; "
                      f"offline, use PRESET = 'local'.") from e
    prepare_tokenizer(tokenizer, padding_side=padding_side)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    model.eval()
    return model, tokenizer


def load(preset: Preset | str = "local", which: str = "sft", **kwargs):
    """The model and tokenizer for ``preset``: tiny Agora models on ``local``, ``preset.model_id`` otherwise.

    ``which="base"`` gives the pretrained model, ``"sft"`` the helpful assistant (on GPU presets the hub's
    instruct model plays that role; there is one model, so both give it).
    """
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    if preset.model_id is None:
        return load_tiny(which, **kwargs)
    return load_hub(preset.model_id, dtype=preset.dtype, device=preset.device, **kwargs)


def lora_target_modules(model) -> list[str]:
    """Names of the attention projections LoRA should adapt in ``model`` (by architecture family)."""
    family = model.config.model_type
    if family not in LORA_TARGETS:
        raise ValueError(f"no LoRA targets known for architecture {family!r}; known: {', '.join(LORA_TARGETS)}")
    return LORA_TARGETS[family]


def count_parameters(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m helpers.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "report", "path"])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    if args.command == "path":
        print(model_dir())
        return 0
    path = build(force=args.force)
    print(json.dumps(json.loads((path / "report.json").read_text()), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
