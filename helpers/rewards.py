"""Reward models: Bradley-Terry from pairs, Elo from rankings, calibration, and the course's reward model (week 2).

The pure functions come first, each a few lines of tensor code (tested in tests/test_rewards.py):

- :func:`bradley_terry_loss`: ``-logsigmoid(r_chosen - r_rejected).mean()``, the loss of every RLHF reward model
  (Christiano et al. 2017; Ouyang et al. 2022, eq. 1; TRL's ``RewardTrainer`` in one line);
- :func:`pairwise_accuracy` (ties count 1/2, as in :func:`helpers.agora.noise_ceiling`);
- :func:`elo_expected`, :func:`elo_update`, :func:`elo_ratings`: chess ratings from a stream of games;
  :func:`ranking_to_matches` turns a ranking of k items into its k(k-1)/2 games;
- :func:`bradley_terry_fit`: maximum-likelihood strengths from the same games, and :func:`bt_to_elo`, the
  change of units between the two: ``elo = 400 / ln(10) * strength + const``;
- :func:`calibration_bins` and :func:`expected_calibration_error` (equal-width bins, weighted by their counts).

Then the reward model itself: :class:`RewardModel` is a causal LM's body (``zoo.load(preset, "sft")`` on the
``local`` preset: the tiny Agora GPT-2) with a scalar head read at the last real token of ``prompt + response +
EOS``; :func:`train_reward_model` is the course's plain loop (AdamW, warm-up and cosine decay, the Bradley-Terry
loss on pairs from :func:`helpers.agora.preference_pairs`); :func:`get_reward_model` trains it once per
:class:`RewardModelConfig` and preset, caches it with :func:`helpers.cache.build_once`, and returns it in eval
mode with its normalisation set. :func:`train_with_trl` trains the same backbone on the same pairs with TRL's
``RewardTrainer`` for comparison.

Deviations from InstructGPT, and why: one pair per prompt instead of all K-choose-2 comparisons of K ranked
replies (the Agora gives us as many prompts as we like); the body is fully fine-tuned on the ``local`` preset
(0.9M parameters, cheap) and LoRA-adapted on GPU presets; rewards are normalised after training to mean 0 and
standard deviation 1 on the helpful assistant's replies (InstructGPT normalises with a bias so that the SFT
demonstrations score 0 on average; we also fix the scale, so a KL coefficient means the same thing for every
reward model).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from . import agora, cache
from .runtime import PRESETS, Preset

# ------------------------------------------------------------------------------------------ pure functions


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of the labels under Bradley-Terry: ``-log sigmoid(r_chosen - r_rejected)``, mean.

    Args: r_chosen (B,), r_rejected (B,) rewards of the preferred and the other reply. Returns a scalar.
    Naive equivalent: ``-torch.log(torch.sigmoid(r_chosen - r_rejected)).mean()``, which gives inf once the
    margin is below about -100 (sigmoid underflows to 0); ``logsigmoid`` stays finite. Invariant: adding the same
    constant to every reward changes nothing (only differences matter).
    """
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def preference_prob(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry probability that ``a`` is preferred to ``b``: ``sigmoid(r_a - r_b)``."""
    return torch.sigmoid(r_a - r_b)


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> float:
    """Share of pairs where the chosen reply scores higher; a tie counts 1/2 (a coin flip would break it).

    The same convention as :func:`helpers.agora.noise_ceiling`, so the two numbers can be compared.
    """
    if r_chosen.numel() == 0:
        raise ValueError("pairwise_accuracy needs at least one pair")
    wins = (r_chosen > r_rejected).double() + 0.5 * (r_chosen == r_rejected).double()
    return wins.mean().item()


ELO_SCALE = 400.0
ELO_BASE = 10.0


def elo_expected(r_a: torch.Tensor, r_b: torch.Tensor, scale: float = ELO_SCALE, base: float = ELO_BASE) -> torch.Tensor:
    """Expected score of player ``a`` against ``b``: ``1 / (1 + base ** ((r_b - r_a) / scale))``.

    With base 10 and scale 400, a 400-point lead means 10:1 odds. This is Bradley-Terry's ``sigmoid(s_a - s_b)``
    with strengths ``s = r * ln(base) / scale``.
    """
    return torch.sigmoid((r_a - r_b) * math.log(base) / scale)


def elo_update(r_a: torch.Tensor, r_b: torch.Tensor, score_a: torch.Tensor, k: float = 32.0,
               scale: float = ELO_SCALE, base: float = ELO_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """One Elo update after a game: ``r_a += k * (score_a - E_a)`` and ``r_b -= k * (score_a - E_a)``.

    ``score_a`` is 1 for a win of ``a``, 0 for a loss, 1/2 for a draw. Works elementwise on tensors of games
    played at the same time. Invariant: the sum of the two ratings is unchanged (Elo is zero-sum).
    """
    delta = k * (score_a - elo_expected(r_a, r_b, scale, base))
    return r_a + delta, r_b - delta


def ranking_to_matches(ranking: Sequence[int]) -> list[tuple[int, int]]:
    """The ``k(k-1)/2`` games implied by a ranking, best first: ``(winner, loser)`` for every ordered pair."""
    ranking = list(ranking)
    if len(set(ranking)) != len(ranking):
        raise ValueError(f"a ranking lists each item once; got {ranking}")
    return [(ranking[i], ranking[j]) for i in range(len(ranking)) for j in range(i + 1, len(ranking))]


def elo_ratings(matches: Sequence[tuple[int, int]], n_players: int, *, k: float = 16.0, initial: float = 1000.0,
                scale: float = ELO_SCALE, base: float = ELO_BASE) -> torch.Tensor:
    """Elo ratings after playing ``matches`` ``(winner, loser)`` in order, everyone starting at ``initial``.

    Returns (n_players,) float64. The order of games matters (recent games weigh more); with a small ``k`` and
    many games the ratings settle near the Bradley-Terry fit in Elo units (:func:`bt_to_elo`).
    """
    ratings = [float(initial)] * n_players
    for w, l in matches:  # elo_update on Python floats (a tensor op per game would be 20x slower)
        delta = k * (1.0 - 1.0 / (1.0 + base ** ((ratings[l] - ratings[w]) / scale)))
        ratings[w] += delta
        ratings[l] -= delta
    return torch.tensor(ratings, dtype=torch.float64)


def bradley_terry_fit(winners: torch.Tensor, losers: torch.Tensor, n_players: int, *, l2: float = 1e-4,
                      iters: int = 100) -> torch.Tensor:
    """Maximum-likelihood Bradley-Terry strengths from games ``winners[i]`` beat ``losers[i]``; (n_players,).

    Minimises ``-sum log sigmoid(s_w - s_l) + l2 * |s|^2`` with Newton's method (the loss is convex; the small
    ``l2`` keeps it strictly convex and finite when a player never lost). Strengths are centred to mean 0: only
    differences are identified.
    """
    winners, losers = torch.as_tensor(winners).long(), torch.as_tensor(losers).long()
    s = torch.zeros(n_players, dtype=torch.float64)
    eye = torch.eye(n_players, dtype=torch.float64)
    d = eye[winners] - eye[losers]  # (M, n): +1 at the winner, -1 at the loser
    for _ in range(iters):
        p = torch.sigmoid(d @ s)  # (M,) P(winner beats loser) under s
        grad = -d.T @ (1 - p) + 2 * l2 * s
        hess = (d.T * (p * (1 - p))) @ d + 2 * l2 * eye
        # Adding a constant to every strength changes nothing, so without l2 the Hessian is singular along the
        # all-ones direction; 1 1^T / n fills that direction in and leaves the step orthogonal to it unchanged.
        step = torch.linalg.solve(hess + 1.0 / n_players, grad - grad.mean())
        s = s - step
        if step.abs().max() < 1e-10:
            break
    return s - s.mean()


def bt_to_elo(strengths: torch.Tensor, *, anchor: float = 1000.0, scale: float = ELO_SCALE,
              base: float = ELO_BASE) -> torch.Tensor:
    """Bradley-Terry strengths (natural-log odds units) in Elo points: ``anchor + scale / ln(base) * (s - mean s)``."""
    return anchor + scale / math.log(base) * (strengths - strengths.mean())


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reliability diagram data: ``n_bins`` equal-width bins over [0, 1] (the last one includes 1.0).

    Args: probs (N,) predicted probabilities, labels (N,) 0/1 outcomes. Returns (mean predicted probability,
    observed frequency, count) per bin, each (n_bins,); empty bins give nan for the first two and count 0.
    """
    probs, labels = probs.detach().double().flatten(), labels.detach().double().flatten()
    which = (probs * n_bins).floor().long().clamp(0, n_bins - 1)  # (N,) bin index; p = 1.0 goes to the last bin
    counts = torch.bincount(which, minlength=n_bins).double()
    conf = torch.bincount(which, probs, minlength=n_bins) / counts
    freq = torch.bincount(which, labels, minlength=n_bins) / counts
    return conf, freq, counts.long()


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 10) -> float:
    """ECE: ``sum_b (n_b / N) |freq_b - conf_b|`` over equal-width bins (Guo et al. 2017), empty bins skipped."""
    conf, freq, counts = calibration_bins(probs, labels, n_bins)
    keep = counts > 0
    return ((counts[keep] / counts.sum()) * (freq[keep] - conf[keep]).abs()).sum().item()


def normalisation_stats(rewards: torch.Tensor) -> tuple[float, float]:
    """Mean and standard deviation used to normalise rewards: ``(r - mean) / std``."""
    rewards = rewards.detach().double().flatten()
    std = rewards.std().item() if rewards.numel() > 1 else 1.0
    return rewards.mean().item(), max(std, 1e-8)


# ------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class RewardModelConfig:
    """Everything that changes a trained reward model (with the preset); its hash names the cache folder."""

    persona: str = "balanced"
    """Key of :data:`helpers.agora.PERSONAS`: whose labels the model learns (``"length_lover"`` has a length bias)."""
    rationality: float = 4.0
    """The labelling annotator's Bradley-Terry inverse temperature."""
    noise: float = 0.1
    """Probability that the annotator's label is flipped."""
    n_pairs: int = 4000
    """Training pairs drawn from :func:`helpers.agora.preference_pairs`."""
    n_test: int = 1000
    """Held-out pairs: another draw of the same annotator, minus any comparison that is also in the training set."""
    seed: int = 0
    """Seeds the pairs, the head's initial weights and the batch order."""
    backbone: str = "sft"
    """``"base"`` or ``"sft"``: which model of :func:`helpers.zoo.load` the body starts from."""
    steps: int = 250
    batch_size: int = 32
    """Pairs per step (each step runs 2 * batch_size sequences)."""
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.01
    lm_weight: float = 5.0
    """Initial weight of the body's mean token log-likelihood in the reward (0: the head alone); trained."""
    max_len: int = 128
    """Longest prompt + response in tokens; longer ones keep their end (the scored token)."""
    n_reference: int = 1000
    """Helpful-assistant replies (:data:`helpers.agora.HELPFUL_MIX`) that define reward 0 and scale 1."""
    world_seed: int = 0

    def annotator(self) -> agora.Annotator:
        if self.persona not in agora.PERSONAS:
            raise ValueError(f"unknown persona {self.persona!r}; choose one of {', '.join(agora.PERSONAS)}")
        return agora.Annotator(agora.PERSONAS[self.persona], self.rationality, self.noise, self.world_seed)


FORMAT_VERSION = 1
"""Bump when the training code changes what it produces, so old caches are not reused."""


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask 1) position of each row, for left or right padding: (B, T) -> (B,)."""
    T = attention_mask.shape[-1]
    return T - 1 - attention_mask.long().flip(-1).argmax(-1)


class RewardModel(torch.nn.Module):
    """A causal LM's body with a scalar head read at the last real token of ``prompt + response + EOS``.

    ``forward`` returns raw rewards (B,), the quantity the Bradley-Terry loss trains; ``score`` tokenises text and
    returns *normalised* rewards (mean 0, std 1 on the reference replies), without gradients.
    """

    def __init__(self, body: torch.nn.Module, tokenizer, *, max_len: int = 128, seed: int = 0,
                 lm_head: torch.nn.Module | None = None, lm_weight: float = 0.0):
        super().__init__()
        self.body = body
        self.lm_head = lm_head
        self.lm_weight = torch.nn.Parameter(torch.tensor(float(lm_weight))) if lm_head is not None else None
        self.tokenizer = tokenizer
        self.max_len = max_len
        hidden = body.config.hidden_size
        self.head = torch.nn.Linear(hidden, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # small random head, zero bias (InstructGPT: std 1 / sqrt(d + 1))
            self.head.weight.copy_(torch.randn(1, hidden, generator=g) / math.sqrt(hidden + 1))
            self.head.bias.zero_()
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Raw rewards (B,) of token sequences (B, T), padded on either side."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding is safe
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=position_ids).last_hidden_state  # (B, T, H)
        last = last_token_index(attention_mask)  # (B,)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        reward = self.head(h.to(self.head.weight.dtype)).squeeze(-1)  # (B,)
        if self.lm_head is not None:
            reward = reward + self.lm_weight * self.mean_logprob(hidden, input_ids, attention_mask)
        return reward

    def mean_logprob(self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean log-probability per token (B,) of each sequence under the body's own language-model head."""
        logits = self.lm_head(hidden[:, :-1])  # (B, T-1, V): position t predicts token t+1
        logp = torch.log_softmax(logits.float(), -1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
        mask = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(logp.dtype)  # both positions real
        return (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` (B, T) of ``prompt + response + EOS``.

        Sequences longer than ``max_len`` keep their last ``max_len`` tokens, so the scored token is never cut.
        """
        return encode_pairs(self.tokenizer, prompts, responses, self.max_len)

    @torch.no_grad()
    def raw_score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Raw rewards (B,) on the CPU, no gradients."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        was_training = self.training
        self.eval()
        # Score in order of length, so that each batch carries little padding; then put the rewards back in order.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        out = torch.zeros(len(prompts))
        for i in range(0, len(order), batch_size):
            rows = order[i:i + batch_size]
            ids, mask = self.encode([prompts[j] for j in rows], [responses[j] for j in rows])
            out[rows] = self(ids.to(self.device), mask.to(self.device)).float().cpu()
        self.train(was_training)
        return out

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Normalised rewards (B,): ``(raw - mean) / std`` with the reference statistics, no gradients."""
        raw = self.raw_score(prompts, responses, batch_size)
        return (raw - self.reward_mean.float().cpu()) / self.reward_std.float().cpu()

    def set_normalisation(self, mean: float, std: float) -> None:
        self.reward_mean.fill_(mean)
        self.reward_std.fill_(std)


def encode_pairs(tokenizer, prompts: Sequence[str], responses: Sequence[str], max_len: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of ``prompt + response + EOS``, right-padded, longer ones cut from the left: (B, T) twice."""
    texts = [p + r + tokenizer.eos_token for p, r in zip(prompts, responses)]
    rows = [ids[-max_len:] for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


def _body_of(causal_lm) -> torch.nn.Module:
    """The transformer under a causal LM's language-model head (GPT-2's ``transformer``, Llama's ``model``)."""
    return causal_lm.base_model


def new_reward_model(preset: Preset | str, config: RewardModelConfig = RewardModelConfig()) -> RewardModel:
    """An untrained reward model: the preset's ``config.backbone`` body and a fresh head (LoRA on GPU presets)."""
    from . import zoo

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    torch.manual_seed(config.seed)
    lm, tokenizer = zoo.load(preset, config.backbone)
    body = _body_of(lm)
    if preset.on_gpu:
        from peft import LoraConfig, get_peft_model

        body = get_peft_model(body, LoraConfig(r=preset.lora_r, lora_alpha=2 * preset.lora_r, lora_dropout=0.0,
                                               target_modules=zoo.lora_target_modules(lm)))
    lm_head = lm.get_output_embeddings() if config.lm_weight else None
    if lm_head is not None and preset.on_gpu:
        lm_head.requires_grad_(False)
    model = RewardModel(body, tokenizer, max_len=min(config.max_len, preset.seq_len), seed=config.seed,
                        lm_head=lm_head, lm_weight=config.lm_weight)
    return model.to(preset.device)


# ---------------------------------------------------------------------------------------------- training


def _comparison(record: dict) -> tuple:
    return record["prompt"], frozenset((record["chosen"], record["rejected"]))


def reward_data(config: RewardModelConfig = RewardModelConfig()) -> tuple[list[dict], list[dict]]:
    """``(train, test)`` pairs labelled by ``config``'s annotator.

    The test pairs are a separate draw (another seed) from which every comparison that also occurs in training
    (same prompt, same two replies) is removed: the model is judged on comparisons it never saw. The Agora asks a
    few hundred distinct questions, so most test *questions* were seen in training with other replies, which is
    also what RL will ask; :func:`unseen_questions` picks the test pairs whose question is new.
    """
    annotator = config.annotator()
    train = agora.preference_pairs(config.n_pairs, seed=config.seed, annotator=annotator, world_seed=config.world_seed)
    seen = {_comparison(r) for r in train}
    fresh = agora.preference_pairs(config.n_test, seed=1_000_003 + config.seed, annotator=annotator,
                                   world_seed=config.world_seed)
    return train, [r for r in fresh if _comparison(r) not in seen]


def unseen_questions(train: Sequence[dict], test: Sequence[dict]) -> list[dict]:
    """The test pairs whose prompt never occurs in ``train`` (a stricter test: new sums, new harmful requests)."""
    asked = {r["prompt"] for r in train}
    return [r for r in test if r["prompt"] not in asked]


def reference_dialogues(config: RewardModelConfig = RewardModelConfig()) -> list[dict]:
    """The helpful assistant's replies that define the reward scale (another seed than any training data)."""
    return agora.dialogues(config.n_reference, seed=10_000 + config.seed, mix=agora.HELPFUL_MIX,
                           world_seed=config.world_seed)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def pair_rewards(model: RewardModel, records: Sequence[dict], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rewards of the chosen and rejected replies of ``records``: two (N,) tensors."""
    prompts = [r["prompt"] for r in records]
    return (model.raw_score(prompts, [r["chosen"] for r in records], batch_size),
            model.raw_score(prompts, [r["rejected"] for r in records], batch_size))


def _length_grouped_batches(lengths: torch.Tensor, batch_size: int, g: torch.Generator, window: int = 8):
    """Endless batches of row indices: shuffled each epoch, sorted by length within windows of ``window`` batches.

    Batches of similar lengths waste little compute on padding (replies run from 3 to 60 words), while the
    order of batches stays random.
    """
    n = len(lengths)
    while True:
        perm = torch.randperm(n, generator=g)
        out = []
        for i in range(0, n - batch_size + 1, batch_size * window):
            chunk = perm[i:i + batch_size * window]
            chunk = chunk[lengths[chunk].argsort(stable=True)]
            out += [chunk[j:j + batch_size] for j in range(0, len(chunk) - batch_size + 1, batch_size)]
        for k in torch.randperm(len(out), generator=g).tolist():
            yield out[k]


def train_reward_model(model: RewardModel, train: Sequence[dict], config: RewardModelConfig, *,
                       test: Sequence[dict] | None = None, eval_every: int = 50, progress: bool = True) -> dict:
    """The course's reward-model loop: batches of pairs, Bradley-Terry loss, AdamW with warm-up and cosine decay.

    Each step scores ``batch_size`` chosen and ``batch_size`` rejected replies in one forward pass. Returns the
    history: ``loss`` and ``train_accuracy`` per step, and ``test_accuracy`` every ``eval_every`` steps.
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(config.seed)
    prompts = [r["prompt"] for r in train]
    ids, mask = encode_pairs(model.tokenizer, prompts + prompts, [r["chosen"] for r in train] +
                             [r["rejected"] for r in train], model.max_len)  # (2N, T): chosen rows, then rejected
    n = len(train)
    lengths = torch.maximum(mask[:n].sum(1), mask[n:].sum(1))  # (N,) the longer reply of each pair
    batches = _length_grouped_batches(lengths, config.batch_size, g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    history = {"step": [], "loss": [], "train_accuracy": [], "eval_step": [], "test_accuracy": []}
    model.train()
    bar = tqdm(range(config.steps), desc="reward model", leave=False, file=sys.stdout, disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, config.steps, config.lr, config.warmup_steps)
        rows = next(batches)
        b_rows = torch.cat([rows, rows + n])  # (2B,) chosen then rejected
        width = int(mask[b_rows].sum(1).max())  # trim the batch to its longest row (right padding)
        b_ids, b_mask = ids[b_rows, :width].to(model.device), mask[b_rows, :width].to(model.device)
        rewards = model(b_ids, b_mask)  # (2B,)
        r_chosen, r_rejected = rewards[:config.batch_size], rewards[config.batch_size:]
        loss = bradley_terry_loss(r_chosen, r_rejected)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history["step"].append(step)
        history["loss"].append(loss.item())
        history["train_accuracy"].append(pairwise_accuracy(r_chosen.detach(), r_rejected.detach()))
        if test is not None and ((step + 1) % eval_every == 0 or step + 1 == config.steps or step == 0):
            history["eval_step"].append(step + 1)
            history["test_accuracy"].append(pairwise_accuracy(*pair_rewards(model, test)))
            model.train()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return history


def _cache_config(preset: Preset, config: RewardModelConfig) -> dict:
    from . import zoo

    tiny = dataclasses.asdict(zoo.TinyConfig()) if preset.model_id is None else None
    return {"reward_model": dataclasses.asdict(config), "preset": preset.name, "model_id": preset.model_id,
            "tiny": tiny}


def _trainable_state(model: RewardModel) -> dict:
    """What training changed: the trainable parameters and the buffers (the body's frozen weights come from zoo)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}


def build_reward_model(preset: Preset, config: RewardModelConfig, out: Path, *, progress: bool = True) -> dict:
    """Train a reward model for ``config`` and save it into ``out``; returns the report written beside it."""
    t0 = time.perf_counter()
    model = new_reward_model(preset, config)
    train, test = reward_data(config)
    history = train_reward_model(model, train, config, test=test[:400], progress=progress)
    seconds = time.perf_counter() - t0
    ref = reference_dialogues(config)
    raw_ref = model.raw_score([d["prompt"] for d in ref], [d["response"] for d in ref])
    mean, std = normalisation_stats(raw_ref)
    model.set_normalisation(mean, std)
    r_chosen, r_rejected = pair_rewards(model, test)
    annotator = config.annotator()
    report = {
        "config": dataclasses.asdict(config),
        "preset": preset.name,
        "n_train": len(train),
        "n_test": len(test),
        "test_accuracy": pairwise_accuracy(r_chosen, r_rejected),
        "noise_ceiling": agora.noise_ceiling(test, annotator),
        "curve_pairs": min(400, len(test)),
        "train_seconds": round(seconds, 1),
        "reward_mean": mean,
        "reward_std": std,
        "history": history,
        "torch": torch.__version__,
    }
    report["fraction_of_ceiling"] = report["test_accuracy"] / report["noise_ceiling"]
    torch.save(_trainable_state(model), out / "reward_model.pt")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def reward_model_dir(preset: Preset | str = "local", config: RewardModelConfig = RewardModelConfig(), *,
                     progress: bool = True) -> Path:
    """The cache folder of the reward model for ``preset`` and ``config``, training it first if needed."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    name = f"rm-{config.persona}"
    return cache.build_once("rewards", name, _cache_config(preset, config),
                            lambda tmp: build_reward_model(preset, config, tmp, progress=progress),
                            version=FORMAT_VERSION)


def get_reward_model(preset: Preset | str = "local", config: RewardModelConfig = RewardModelConfig(), *,
                     progress: bool = True) -> RewardModel:
    """The trained reward model for ``preset`` and ``config`` (eval mode, normalisation set), trained once, cached.

    The first call trains it (about a minute on two CPU cores on the ``local`` preset); later calls, from any
    notebook, load it in a second.
    """
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    folder = reward_model_dir(preset, config, progress=progress)
    model = new_reward_model(preset, config)
    state = torch.load(folder / "reward_model.pt", map_location=preset.device, weights_only=True)
    missing = set(state) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"{folder}: saved reward model does not fit the architecture ({sorted(missing)[:3]} ...); "
                           f"delete the folder to retrain")
    model.load_state_dict(state, strict=False)
    model.eval()
    return model


def reward_model_report(preset: Preset | str = "local", config: RewardModelConfig = RewardModelConfig()) -> dict:
    """The training report of the cached reward model: accuracy, noise ceiling, seconds, learning curves."""
    return json.loads((reward_model_dir(preset, config) / "report.json").read_text())


# ------------------------------------------------------------------------------------------- TRL contrast


def sequence_classifier_rewards(model, tokenizer, records: Sequence[dict], *, max_len: int = 128,
                                batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and rejected replies under a ``...ForSequenceClassification`` model (num_labels=1).

    The same text as the course's reward model sees (``prompt + response + EOS``, right-padded), so the two can be
    compared on the same pairs with :func:`pairwise_accuracy`.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for key in ("chosen", "rejected"):
        scores = []
        for i in range(0, len(records), batch_size):
            batch = records[i:i + batch_size]
            ids, mask = encode_pairs(tokenizer, [r["prompt"] for r in batch], [r[key] for r in batch], max_len)
            with torch.no_grad():
                scores.append(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu())
        out.append(torch.cat(scores))
    model.train(was_training)
    return out[0], out[1]


def _StdoutProgress(total: int):
    """A ``transformers`` callback drawing a tqdm.auto bar on stdout (the Trainer's own bar writes to stderr)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class StdoutProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=total, desc="TRL RewardTrainer", leave=False, file=sys.stdout)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return StdoutProgress()


def train_with_trl(preset: Preset | str, config: RewardModelConfig = RewardModelConfig(), *, max_steps: int | None = None,
                   output_dir: str | Path | None = None, progress: bool = True):
    """Train the same backbone on the same pairs with TRL's ``RewardTrainer``; returns ``(model, report)``.

    The model is ``AutoModelForSequenceClassification`` (a linear ``score`` head without bias on the last non-pad
    token), trained with TRL's defaults where the course has no counterpart and with ``config``'s steps, batch
    size, learning rate and warm-up otherwise. The report holds TRL's logged loss, the wall time and the held-out
    accuracy measured like the course's model's.
    """
    import tempfile
    import warnings

    import datasets
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    from . import zoo

    preset = PRESETS[preset] if isinstance(preset, str) else preset
    steps = max_steps or config.steps
    train, test = reward_data(config)
    _, tokenizer = zoo.load(preset, config.backbone)
    source = str(zoo.model_dir() / config.backbone) if preset.model_id is None else preset.model_id
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were not initialised" is expected: the score head is new
    try:
        torch.manual_seed(config.seed)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=preset.torch_dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # the dataset's map() bars go to stderr; ours goes to stdout
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecation notices of transformers' own defaults
        args = RewardConfig(
            output_dir=str(output_dir or tmp), max_steps=steps, per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr, lr_scheduler_type="cosine", warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay, adam_beta2=0.95, max_grad_norm=1.0, max_length=config.max_len,
            seed=config.seed, logging_steps=10, save_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=not preset.on_gpu, bf16=preset.dtype == "bfloat16", fp16=preset.dtype == "float16",
            dataloader_num_workers=0,
        )
        dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train])
        trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # it prints every log dict; the report keeps them instead
        if progress:
            trainer.add_callback(_StdoutProgress(steps))
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    if bars_were_on:
        datasets.enable_progress_bars()
    model.eval()
    r_chosen, r_rejected = sequence_classifier_rewards(model, tokenizer, test, max_len=config.max_len)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    report = {
        "steps": steps,
        "train_seconds": round(seconds, 1),
        "test_accuracy": pairwise_accuracy(r_chosen, r_rejected),
        "noise_ceiling": agora.noise_ceiling(test, config.annotator()),
        "log_step": [h["step"] for h in logs],
        "loss": [h["loss"] for h in logs],
    }
    return model, report
