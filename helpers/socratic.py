"""Week 5: a model that answers like Socrates. Socratic dialogue data, LoRA SFT with versioned adapters, a stop
at the end of the speaker's turn, PPO on the adapter with a judge's reward, and switching adapters in place.

How this deviates from the Socrates project it comes from, and why:

- the dialogues on ``local`` are written by this module in the Agora's format (``User: ...\\nAssistant: ...``),
  so that the ground truth (:func:`helpers.agora.score`) can grade every reply; GPU presets read Plato's
  dialogues from the public-domain plain-text e-books instead (:func:`plato_pairs`);
- Socrates' turns in the data mix questions with statements, as Plato's do: SFT imitates that mix, and PPO on
  the judge's reward is what pushes the adapter towards asking;
- PPO is the course's loop (:mod:`helpers.rlhf`) on the LoRA adapter, fed a *hybrid* batch: replies generated and
  judged once, offline (an API judge is slow and costs money), plus fresh rollouts judged online.

Sections: data (written dialogues, the Plato loader) -> LoRA SFT (callbacks that save versioned adapters, sizes)
-> the turn stop (``turn_mask``, :class:`TurnStop`, :func:`generate_turn`) -> PPO on the adapter -> adapters
switched in place -> statistics (a paired bootstrap CI).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from . import agora, cache, judges, lm
# Re-exported: the week's notebooks and tests use them as socratic.<name>.
from .dialogue import (SOCRATES, TURN_END, TURN_ENDS, USER, _stopping_criteria, _turn_masks,  # noqa: F401
                       assistant_pairs, dialogue_pairs, format_dialogue, generate_turn, run_on_rate,
                       socratic_dialogue, socratic_dialogues, socratic_pairs, turn_mask)
from .sft import (SFTConfig, _collate, _linear_shape, _PairDataset, _trainer_callbacks,  # noqa: F401
                  folder_size_mb, lora_config, lora_parameter_count, sft_example, train_lora_sft, weights_size_mb)

# ---------------------------------------------------------------------------------- Plato, plain-text e-books
#
# The public-domain e-books of Plato's dialogues (Jowett's translation) are plain text: a licence header ending in
# a line "*** START OF THE PROJECT GUTENBERG EBOOK <TITLE> ***", an introduction, a line
# "PERSONS OF THE DIALOGUE: ...", then turns that begin with the speaker's name in capitals and a colon
# ("MENO: Can you tell me, Socrates, ..."), wrapped at ~72 columns, one blank line between turns, and a footer
# from "*** END OF THE PROJECT GUTENBERG EBOOK <TITLE> ***" on. Older files say "THIS PROJECT" instead of "THE".

PLATO_EBOOKS = {"meno": 1643, "euthyphro": 1642, "crito": 1657}
"""E-book numbers of some dialogues told as speaker-labelled turns (not narrated, as the Republic is)."""

PLATO_URL = "https://www.gutenberg.org/cache/epub/{id}/pg{id}.txt"

_START = re.compile(r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*$", re.I | re.M)
_END = re.compile(r"^(?:\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK.*|End of (?:the )?Project Gutenberg.*)$",
                  re.I | re.M)
_LABEL_RE = r"[A-Z][A-Z'\-]+(?: [A-Z][A-Z'\-]+){0,2}"
_LABEL = re.compile(rf"^({_LABEL_RE})\s*:\s*(.*)$")
# The persons' names: the rest of the line, and the lines after it up to a blank line or a labelled line.
_PERSONS = re.compile(rf"^PERSONS OF THE DIALOGUE\s*:\s*(.*(?:\n(?!\s*\n)(?!{_LABEL_RE}\s*:).*)*)", re.M)


def strip_ebook(text: str) -> str:
    """The body of a plain-text e-book: the licence header (up to the START line) and footer (from the END line)
    removed. Text without the markers is returned as it is."""
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    start = _START.search(text)
    if start:
        text = text[start.end():]
    end = _END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\n")


_NOT_SPEAKERS = {"SCENE", "NOTE", "FOOTNOTE", "CHAPTER", "INTRODUCTION", "PERSONS OF THE DIALOGUE", "BOOK"}


def parse_turns(text: str, *, speakers: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Speaker-labelled turns ``[(SPEAKER, text), ...]`` of a dialogue body (header and footer already stripped).

    A line that starts ``NAME: `` opens a turn; the lines after it (wrapped lines, and whole paragraphs without a
    label) continue it, joined with spaces. When the text names its ``PERSONS OF THE DIALOGUE``, everything
    before that line (title, introduction) is skipped and only labels made of the names listed there count (so
    ``SCENE:`` is no speaker); otherwise every all-capital label but stage directions does. ``speakers`` gives
    the allowed labels explicitly.
    """
    persons = _PERSONS.search(text)
    allowed = {s.upper() for s in speakers} if speakers else None
    if persons:
        text = text[persons.end():]
        if allowed is None:
            allowed = {w.upper() for w in re.findall(r"[A-Z][A-Za-z'\-]+", persons[1])}
    turns: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        m = _LABEL.match(line)
        if m and m[1] not in _NOT_SPEAKERS and (allowed is None or all(w in allowed for w in m[1].split())):
            turns.append([m[1], m[2]])
        elif turns:
            turns[-1][1] = (turns[-1][1] + " " + line).strip()
    return [(s, re.sub(r"\s+", " ", t).strip()) for s, t in turns if t.strip()]


def plato_pairs(source: str | os.PathLike, *, socrates: str = "SOCRATES", max_context_turns: int = 2,
                min_words: int = 3) -> list[dict]:
    """(context, Socrates' reply) pairs from a plain-text e-book (a path, or the text itself), Agora format.

    The header and footer are stripped, turns parsed (:func:`parse_turns`), then every turn of ``socrates``
    becomes a pair whose prompt holds the previous ``max_context_turns`` turns (other speakers as ``User``).
    Replies shorter than ``min_words`` words ("Yes.", "True.") are dropped. Raises ``ValueError`` naming the
    file when it holds no turns of ``socrates``.
    """
    path = Path(source) if not isinstance(source, str) or "\n" not in source else None
    text = path.read_text(encoding="utf-8-sig") if path is not None else str(source)
    name = path.name if path is not None else "text"
    turns = parse_turns(strip_ebook(text))
    if not any(s == socrates.upper() for s, _ in turns):
        found = sorted({s for s, _ in turns})
        raise ValueError(f"{name}: no turns by {socrates.upper()!r} (speakers found: {', '.join(found) or 'none'}); "
                         f"is it a dialogue in speaker-labelled turns?")
    pairs = dialogue_pairs(turns, socrates=socrates.upper(), max_context_turns=max_context_turns, dialogue_id=name)
    return [p for p in pairs if len(p["response"].split()) >= min_words]


def fetch_plato(dialogue: str = "meno", *, url: str | None = None, timeout: float = 30.0) -> Path:
    """Download a dialogue's plain-text e-book once into the course cache; returns its path (GPU presets only).

    ``url`` overrides the address (a mirror, or a local server in tests).
    """
    if url is None:
        if dialogue not in PLATO_EBOOKS:
            raise ValueError(f"unknown dialogue {dialogue!r}; known: {', '.join(PLATO_EBOOKS)} (or pass url=...)")
        url = PLATO_URL.format(id=PLATO_EBOOKS[dialogue])

    def builder(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                data = r.read()
        except OSError as e:
            raise OSError(f"could not download {dialogue!r} from {url}: {e}. On the local preset the course uses "
                          "its own written dialogues (socratic_pairs) and needs no download.") from e
        (tmp / f"{dialogue}.txt").write_bytes(data)

    folder = cache.build_once("plato", dialogue, {"url": url}, builder)
    return folder / f"{dialogue}.txt"



# ========================================================================================= PPO on the adapter
#
# The course's PPO (helpers.rlhf) trains a LoRA adapter on a model whose reference is the same model with the
# adapter off. Here the model is the base with the Socrates SFT adapter merged in, so the reference is the SFT
# policy and the KL is "how far PPO moved from SFT". Two additions the Socrates project needed:
#
# - a *hybrid* batch: some replies were generated before training (by the SFT policy) and judged offline, once
#   (a hosted judge is slow and paid for); each step mixes ``offline_per_step`` of them with fresh rollouts judged
#   online. As in the Socrates project (and TRL's old ``step(queries, responses, scores)``), the "old" log-probs
#   of an offline reply are the current policy's, so PPO's ratio starts at 1 for it: its advantage is used as if
#   the policy had sampled it. They are off-policy, increasingly so as the policy moves; the KL column of the
#   history is therefore measured on the online replies only;
# - the turn stop: online rollouts end at the end of Socrates' turn (:func:`generate_turn`).
#
# ``train_ppo`` in helpers.rlhf draws every reply itself; this loop is the same algorithm (the same pure functions
# from helpers.ppo, in the same order) with the batch built from both sources, single-process.


def rollout_from_ids(prompts: Sequence[str], response_ids: Sequence[Sequence[int]], tokenizer,
                     texts: Sequence[str] | None = None) -> lm.Rollout:
    """A :class:`~helpers.lm.Rollout` from prompts and the token ids of their replies (left-padded prompts,
    right-padded replies), e.g. to train on replies generated earlier."""
    pad = tokenizer.pad_token_id
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    P = enc["input_ids"].shape[1]
    N = max(1, max(len(r) for r in response_ids))
    new = torch.full((len(prompts), N), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), N), dtype=torch.long)
    for i, r in enumerate(response_ids):
        new[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    if texts is None:
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in response_ids]
    return lm.Rollout(list(prompts), list(texts), torch.cat([enc["input_ids"], new], 1),
                      torch.cat([enc["attention_mask"], mask], 1),
                      torch.cat([torch.zeros_like(enc["attention_mask"]), mask], 1), P)


def response_ids(roll: lm.Rollout) -> list[list[int]]:
    """The token ids of each reply in ``roll`` (its ``response_mask`` positions)."""
    return [row[m.bool()].tolist() for row, m in zip(roll.input_ids, roll.response_mask)]


def pregenerate(model, tokenizer, prompts: Sequence[str], reward_fn, *, max_new_tokens: int, seed: int = 0,
                batch_size: int = 64, stop_strings: Sequence[str] = TURN_ENDS, progress: bool = False) -> list[dict]:
    """The offline half of the hybrid dataset: one reply per prompt from ``model``, judged once by ``reward_fn``.

    Returns records ``{prompt, response, response_ids, score}`` (save them with :func:`helpers.agora.save_jsonl`).
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        roll = generate_turn(model, tokenizer, chunk, max_new_tokens=max_new_tokens, seed=seed + start,
                             stop_strings=stop_strings)
        scores = torch.as_tensor(reward_fn(chunk, roll.responses), dtype=torch.float32)
        out += [{"prompt": p, "response": r, "response_ids": ids, "score": float(s)}
                for p, r, ids, s in zip(chunk, roll.responses, response_ids(roll), scores)]
    return out


def _autocast(model):
    """Autocast to the weights' half precision on GPU; nothing on CPU or in float32 (one code path)."""
    import contextlib

    weight = next(model.parameters())
    dtypes = {p.dtype for p in model.parameters()}
    half = next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), None)
    if weight.device.type != "cuda" or half is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=half)


def train_hybrid_ppo(policy, tokenizer, prompts: Sequence[str], reward_fn, offline: Sequence[dict], config,
                     *, offline_per_step: int = 4, callbacks: Sequence[Callable] = (), progress: bool = True):
    """PPO on ``policy`` (from :func:`helpers.rlhf.make_policy`) with batches of ``config.batch_size`` replies:
    ``offline_per_step`` pre-generated, pre-judged ones from ``offline`` (:func:`pregenerate`) and the rest fresh
    rollouts to ``prompts``, judged by ``reward_fn``. Online rollouts stop at the end of the turn
    (``config.stop_strings``, default :data:`TURN_ENDS`).

    Returns a :class:`helpers.rlhf.PPOResult`; each history row has the keys of :func:`helpers.rlhf.train_ppo`
    (``score``, ``kl``, ``reward``, ``kl_coef``, ``entropy``, ``pg_loss``, ``vf_loss``, ``clipfrac``,
    ``approx_kl``, ``seconds``, ...) plus ``score_online`` and ``score_offline``; ``kl`` and ``entropy`` are
    measured on the online replies (samples of the current policy).
    """
    from tqdm.auto import tqdm

    from . import ppo
    from .rlhf import PPOResult

    B, mb = config.batch_size, config.mini_batch_size
    k = offline_per_step if offline else 0
    if not 0 <= k < B or B % mb:
        raise ValueError(f"need 0 <= offline_per_step ({k}) < batch_size ({B}) and mini_batch_size ({mb}) "
                         f"dividing batch_size")
    stop_strings = tuple(config.stop_strings) or TURN_ENDS
    device = policy.device
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, eps=1e-5)
    kl_ctl = (ppo.FixedKLController(config.init_kl_coef) if config.target_kl is None
              else ppo.AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon))
    g = torch.Generator().manual_seed(config.seed)
    order_online = torch.randperm(len(prompts), generator=g).tolist()
    order_offline = torch.randperm(len(offline), generator=g).tolist() if k else []
    history, samples = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    bar = tqdm(range(config.steps), desc="PPO (hybrid)", disable=not progress, file=sys.stdout, leave=False)
    for step in bar:
        # 1. The batch: B - k fresh rollouts (stopping at the end of the turn) and k offline replies.
        on_prompts = [prompts[order_online[(step * (B - k) + i) % len(prompts)]] for i in range(B - k)]
        fresh = generate_turn(policy.model, tokenizer, on_prompts, max_new_tokens=config.max_new_tokens,
                              temperature=config.temperature, top_p=config.top_p, seed=config.seed * 100_003 + step,
                              stop_strings=stop_strings)
        off = [offline[order_offline[(step * k + i) % len(offline)]] for i in range(k)]
        # 2. Scores: judged now (online) or read from the offline records.
        on_scores = torch.as_tensor(reward_fn(on_prompts, fresh.responses), dtype=torch.float32).flatten()
        if on_scores.shape != (B - k,) or not torch.isfinite(on_scores).all():
            raise ValueError(f"reward_fn must return {B - k} finite scores, got {tuple(on_scores.shape)}")
        scores = torch.cat([on_scores, torch.tensor([r["score"] for r in off], dtype=torch.float32)])
        if config.score_clip is not None:
            scores = scores.clamp(-config.score_clip, config.score_clip)
        roll = rollout_from_ids(on_prompts + [r["prompt"] for r in off],
                                response_ids(fresh) + [r["response_ids"] for r in off], tokenizer,
                                fresh.responses + [r["response"] for r in off])
        online = torch.arange(B) < B - k  # (B,) which rows the policy sampled just now

        # 3. Log-probs and values under the policy, log-probs under the reference (adapter off): no gradients.
        input_ids, attention_mask = roll.input_ids.to(device), roll.attention_mask.to(device)
        mask = roll.response_mask[:, 1:].to(device).bool()  # (B, T-1)
        with torch.no_grad(), _autocast(policy):
            logits, values = policy(input_ids, attention_mask)
            logits, values = logits[:, :-1], values[:, :-1]  # (B, T-1, V), (B, T-1)
            logprobs = lm.token_logprobs(logits, input_ids[:, 1:], mask)
            entropy = lm.masked_mean(lm.entropy_from_logits(logits)[online], mask[online])
            del logits
            with policy.reference() as ref:
                ref_logprobs = lm.sequence_logprobs(ref, input_ids, attention_mask, roll.response_mask.to(device))
        values = values * mask

        # 4-5. Per-token rewards (score at the last token, -kl_coef * KL at each), GAE, whitened advantages.
        kl_coef = kl_ctl.value
        rewards, kl = ppo.kl_penalised_rewards(scores.to(device), logprobs, ref_logprobs, mask, kl_coef)
        if config.whiten_rewards:
            rewards = ppo.whiten(rewards, mask, shift_mean=False)
        advantages, returns = ppo.gae(rewards, values, mask, config.gamma, config.lam)
        advantages = ppo.whiten(advantages, mask)

        # 6. PPO epochs over shuffled mini-batches.
        stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": []}
        for _ in range(config.ppo_epochs):
            for idx in torch.randperm(B, generator=g).split(mb):
                with _autocast(policy):
                    mb_logits, mb_values = policy(input_ids[idx], attention_mask[idx])
                mb_logprobs = lm.token_logprobs(mb_logits[:, :-1], input_ids[idx, 1:], mask[idx])
                pg_loss, pg_stats = ppo.ppo_policy_loss(mb_logprobs, logprobs[idx], advantages[idx], mask[idx],
                                                        config.clip_coef)
                vf_loss = ppo.ppo_value_loss(mb_values[:, :-1], values[idx], returns[idx], mask[idx],
                                             config.clip_value)
                loss = pg_loss + config.vf_coef * vf_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                for key, v in {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), **pg_stats}.items():
                    stats[key].append(v)

        # 7. Statistics and the KL controller.
        kl_seq = kl.sum(-1).cpu()  # (B,) nats
        row = {"step": step, "score": scores.mean().item(), "score_std": scores.std().item(),
               "score_online": on_scores.mean().item(),
               "score_offline": scores[~online].mean().item() if k else float("nan"),
               "kl": kl_seq[online].mean().item(), "kl_coef": kl_coef, "entropy": entropy.item(),
               "response_tokens": mask[online].sum(-1).float().mean().item(),
               **{key: sum(v) / len(v) for key, v in stats.items()},
               "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
        row["reward"] = row["score"] - kl_coef * row["kl"]
        kl_ctl.update(row["kl"], B)
        batch = {"prompts": roll.prompts, "responses": roll.responses, "scores": scores, "kl": kl_seq}
        stop = False
        for callback in callbacks:
            stop = bool(callback(step, row, batch)) or stop
        history.append(row)
        bar.set_postfix(score=f"{row['score_online']:.2f}", kl=f"{row['kl']:.2f}")
        samples = [{"prompt": p, "response": r, "score": s.item(), "online": bool(o)}
                   for p, r, s, o in zip(roll.prompts, roll.responses, scores, online)]
        if stop:
            break
    bar.close()
    return PPOResult(policy, history, samples, config)


# ================================================================================= switching adapters in place


def combine_adapters(peft_model, names: Sequence[str], new_name: str) -> None:
    """Add ``new_name``: the exact sum of the LoRA updates of adapters ``names`` (their ranks concatenated).

    ``W + s1 B1 A1 + s2 B2 A2 = W + [B1 B2] [s1 A1; s2 A2]``: one adapter of rank ``r1 + r2`` with scale 1, e.g.
    the SFT adapter plus the PPO adapter trained on top of it (peft's ``add_weighted_adapter(..., "cat")``).
    """
    peft_model.add_weighted_adapter(list(names), [1.0] * len(names), new_name, combination_type="cat")


def side_by_side(peft_model, tokenizer, prompts: Sequence[str], adapters: Sequence[str | None], *,
                 max_new_tokens: int = 24, temperature: float = 0.0, seed: int = 0) -> dict[str, list[str]]:
    """Replies of one loaded model under each adapter in turn (``None``: adapters disabled, the base model),
    switched in place with ``set_adapter``: no second copy of the weights. Greedy unless ``temperature > 0``."""
    import contextlib

    out = {}
    before = peft_model.active_adapter
    try:
        for name in adapters:
            ctx = peft_model.disable_adapter() if name is None else contextlib.nullcontext()
            if name is not None:
                peft_model.set_adapter(name)
            with ctx:
                roll = generate_turn(peft_model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     temperature=temperature, seed=seed)
            out[name or "base"] = roll.responses
    finally:
        peft_model.set_adapter(before)
    return out


# ================================================================================================ the week
#
# The notebooks' artifacts, each built once per configuration and cached (helpers.cache): the Socrates adapter,
# the plain-assistant adapter, and the PPO run on the Socrates adapter. On ``local`` the base is the tiny Agora
# model that read every style; on GPU presets, the preset's hub model.

FORMAT_VERSION = 1
"""Bump when the builders change what they produce, so that old caches are not reused."""


def load_base(preset):
    """The base model and tokenizer the adapters are trained on (eval mode, left-padded tokenizer)."""
    from . import zoo

    if preset.model_id is None:
        return zoo.load_tiny("base")
    return zoo.load(preset)


def sft_config(preset, which: str = "socrates") -> SFTConfig:
    """The LoRA fine-tuning run for ``which`` ("socrates" or "assistant") on ``preset``."""
    if which not in ("socrates", "assistant"):
        raise ValueError(f"which must be 'socrates' or 'assistant', got {which!r}")
    if preset.model_id is None:  # the tiny model: every linear layer, a high rate, a short run
        steps = 120 if which == "socrates" else 50
        return SFTConfig(r=preset.lora_r, alpha=2 * preset.lora_r, target_modules=("c_attn", "c_proj", "c_fc"),
                         steps=steps, batch_size=32, lr=1e-2, save_every=25, max_len=preset.seq_len)
    return SFTConfig(r=preset.lora_r, alpha=2 * preset.lora_r, steps=300 if which == "socrates" else 150,
                     batch_size=preset.batch_size, lr=2e-4, warmup_steps=20, save_every=100, max_len=preset.seq_len)


def socrates_records(preset, n_dialogues: int = 1500, seed: int = 0) -> list[dict]:
    """The Socrates adapter's training pairs: the written dialogues; on GPU presets Plato's too (downloaded)."""
    records = socratic_pairs(n_dialogues, seed)
    if preset.model_id is not None:
        for name in PLATO_EBOOKS:
            records += plato_pairs(fetch_plato(name), max_context_turns=3)
    return records


def build_adapter(preset, name: str, records: Sequence[dict], config: SFTConfig, *, progress: bool = True) -> Path:
    """Train (once; cached) a LoRA adapter on ``records``; returns its folder.

    The folder holds ``adapter/`` (the final adapter), ``versions/v001``, ``v002``, ... with
    ``versions/versions.json`` (what the callback saved during training) and ``report.json`` (training log,
    seconds, parameter counts).
    """
    from . import zoo

    key = {"preset": preset.name, "model": preset.model_id or zoo.TinyConfig().key(),
           "sft": dataclasses.asdict(config), "data": cache.config_key(list(records))}

    def builder(tmp: Path) -> None:
        model, tokenizer = load_base(preset)
        n_base = sum(p.numel() for p in model.parameters())
        t0 = time.perf_counter()
        peft_model, log = train_lora_sft(model, tokenizer, records, config, tmp / "versions", progress=progress)
        seconds = time.perf_counter() - t0
        peft_model.save_pretrained(tmp / "adapter")
        n_lora = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        (tmp / "report.json").write_text(json.dumps({
            "name": name, "seconds": round(seconds, 1), "records": len(records), "log": log,
            "lora_parameters": n_lora, "base_parameters": n_base}, indent=1))

    return cache.build_once("adapters", f"{name}-{preset.name}", key, builder, version=FORMAT_VERSION)


def load_adapter(preset, folder: str | Path, name: str = "default"):
    """The base model with one adapter (a folder from :func:`build_adapter`, one of its ``versions/vNNN``, or any
    adapter folder) loaded, in eval mode: ``(peft_model, tokenizer)``."""
    return load_characters(preset, {name: folder})


def load_characters(preset, adapters: dict[str, str | Path]):
    """One base model with several adapters loaded by name (the first one active): ``(peft_model, tokenizer)``.

    ``adapters`` maps a name to a folder from :func:`build_adapter` (or an adapter folder itself).
    """
    from peft import PeftModel

    model, tokenizer = load_base(preset)
    peft_model = None
    for name, folder in adapters.items():
        folder = Path(folder)
        path = folder / "adapter" if (folder / "adapter").exists() else folder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # a deprecation notice peft triggers in transformers
            if peft_model is None:
                peft_model = PeftModel.from_pretrained(model, path, adapter_name=name)
            else:
                peft_model.load_adapter(path, adapter_name=name)
    peft_model.set_adapter(next(iter(adapters)))
    return peft_model.eval(), tokenizer


def merged_model(preset, adapter_folder: str | Path):
    """The base model with an adapter merged into its weights (a plain model: the SFT policy for PPO)."""
    model, tokenizer = load_characters(preset, {"sft": adapter_folder})
    return model.merge_and_unload().eval(), tokenizer


def truth(axis: str = "socratic"):
    """The ground truth's ``axis`` in [0, 1] as a reward function ``(prompts, responses) -> (B,)``."""

    def fn(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor([getattr(agora.score(p, r), axis) for p, r in zip(prompts, responses)])

    fn.__name__ = f"true_{axis}"
    return fn


@dataclass(frozen=True)
class HybridConfig:
    """The hybrid dataset: how many replies are pre-generated and judged offline, and how many go in each batch."""

    n_prompts: int = 512
    """Training prompts (Agora questions of every kind)."""
    n_offline: int = 96
    """Replies the SFT policy writes before training, judged once."""
    offline_per_step: int = 4
    """Offline replies in each PPO batch (the rest are fresh rollouts)."""
    criteria: tuple[str, ...] = ("socratic", "harmless")
    """What the judge is asked; the reward is the mean of its scores over these."""
    seed: int = 0


def ppo_config(preset, seed: int = 0):
    """The PPO run on the Socrates adapter for ``preset`` (a :class:`helpers.rlhf.PPOConfig`)."""
    from .rlhf import PPOConfig

    if preset.model_id is None:
        return PPOConfig(steps=40, batch_size=preset.batch_size, mini_batch_size=8, ppo_epochs=2, lr=3e-3,
                         init_kl_coef=0.1, max_new_tokens=preset.max_new_tokens, stop_strings=TURN_ENDS,
                         lora_r=preset.lora_r, lora_alpha=2 * preset.lora_r,
                         lora_target_modules=("c_attn", "c_proj", "c_fc"), seed=seed)
    return PPOConfig(steps=60, batch_size=preset.batch_size, mini_batch_size=preset.mini_batch_size, ppo_epochs=2,
                     lr=5e-5, init_kl_coef=0.05, max_new_tokens=preset.max_new_tokens, stop_strings=TURN_ENDS,
                     lora_r=preset.lora_r, lora_alpha=2 * preset.lora_r, seed=seed)


def load_judge(preset, *, progress: bool = True):
    """The LM judge PPO is trained against: the tiny local judge on ``local``; the preset's hub model, prompted
    with the criterion spelled out, on GPU presets."""
    from . import zoo

    if preset.model_id is None:
        return judges.load_local_judge(progress=progress)
    model, tokenizer = zoo.load(preset)
    return judges.LMJudge(model, tokenizer, name=f"LM judge ({preset.model_id})", instruction=True,
                          max_new_tokens=48, max_reply_tokens=preset.max_new_tokens * 2)


def build_ppo(preset, sft_folder: str | Path, config=None, hybrid: HybridConfig = HybridConfig(), *,
              progress: bool = True) -> Path:
    """PPO (once; cached) on a fresh LoRA adapter over the merged Socrates SFT model, rewarded by the LM judge
    (aggregated over ``hybrid.criteria``) on the hybrid dataset; returns the run's folder.

    The folder holds the policy (``adapter/``, ``value_head.pt``), ``history.json``, ``samples.json``,
    ``offline.jsonl`` (the pre-generated, pre-judged replies) and ``report.json``.
    """
    from . import rlhf

    config = config or ppo_config(preset)
    sft_folder = Path(sft_folder)
    key = {"preset": preset.name, "sft": sft_folder.name, "ppo": dataclasses.asdict(config),
           "hybrid": dataclasses.asdict(hybrid), "judge": dataclasses.asdict(judges.LocalJudgeConfig())}

    def builder(tmp: Path) -> None:
        judge = load_judge(preset, progress=progress)
        sentiment = judges.load_sentiment(preset)
        reward_fn = judges.judge_reward(judge, sentiment, criteria=hybrid.criteria)
        model, tokenizer = merged_model(preset, sft_folder)
        prompts = [p.text for p in agora.prompts(hybrid.n_prompts, seed=hybrid.seed + 1000)]
        t0 = time.perf_counter()
        offline = pregenerate(model, tokenizer, prompts[:hybrid.n_offline], reward_fn,
                              max_new_tokens=config.max_new_tokens, seed=hybrid.seed)
        t_offline = time.perf_counter() - t0
        agora.save_jsonl(tmp / "offline.jsonl", offline)
        policy = rlhf.make_policy(model, config)
        result = train_hybrid_ppo(policy, tokenizer, prompts, reward_fn, offline, config,
                                  offline_per_step=hybrid.offline_per_step, progress=progress)
        rlhf.save_policy(result.policy, tmp)
        (tmp / "history.json").write_text(json.dumps(result.history, indent=1))
        (tmp / "samples.json").write_text(json.dumps(result.samples, indent=1))
        (tmp / "report.json").write_text(json.dumps({
            "seconds": round(time.perf_counter() - t0, 1), "offline_seconds": round(t_offline, 1),
            "judged_replies": reward_fn.calls, "judge": judge.name}, indent=1))

    return cache.build_once("ppo", f"socrates-{preset.name}", key, builder, version=FORMAT_VERSION)


def load_ppo(preset, sft_folder: str | Path, ppo_folder: str | Path):
    """The trained PPO policy (a :class:`helpers.rlhf.PolicyWithValueHead`: adapter on the merged SFT model, its
    reference the SFT policy) and the tokenizer."""
    from . import rlhf

    model, tokenizer = merged_model(preset, sft_folder)
    return rlhf.load_policy(model, ppo_folder), tokenizer
