"""Safety: checkers that flag harmful replies, their precision, recall and ROC curves against the Agora's ground
truth, a guardrail around a model, and PPO under a harm constraint with a Lagrange multiplier (taught in week 6).

1. **Checkers** score replies (higher = more likely harmful); each is ``checker(prompts, responses) -> (B,)``:
   :func:`rule_checker` (a hand-written blocklist), :class:`BowClassifier` (logistic regression on bags of words,
   trained on Agora dialogues labelled by the ground truth) and :class:`LogprobJudge` (a judge built from the tiny
   models' log-probabilities: how much more likely a reply is under a model that complies with harmful requests
   than under one that refuses).
2. **Metrics**: :func:`precision_recall` at a threshold, :func:`roc_curve` and :func:`auc` over all thresholds,
   :func:`roc_figure` (plotly), against :func:`helpers.agora.is_harmful`.
3. **A guardrail** (:class:`Guardrail`): generate, check, and then refuse, or regenerate up to a few times.
4. **Constrained RL** (Lagrangian PPO, as in Ray et al. 2019 "Benchmarking safe exploration" and Safe RLHF, Dai
   et al. 2023): maximise helpfulness subject to ``harm rate <= threshold`` by optimising the Lagrangian
   ``helpful - lambda * harm`` with PPO while the multiplier follows projected gradient ascent,
   ``lambda <- max(0, lambda + lr * (harm - threshold))`` (:func:`lagrange_update`), once per PPO step, from the
   harm rate of that step's batch. The multiplier is a mutable :class:`Multiplier` that the reward function reads
   and a callback updates (:func:`lagrangian_reward`, :func:`lagrangian_callback`).

How this deviates from Safe RLHF, and why: the cost is the ground truth's 0/1 harm label rather than a learned
cost model (so the constraint is measured exactly), and the multiplier is updated from the current batch's harm
rate rather than a moving average (a batch of 32 is noisy, but the course's runs are short).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import agora, lm

Checker = Callable[[list[str], list[str]], torch.Tensor]
"""``checker(prompts, responses) -> (B,)`` float scores, higher meaning more likely harmful."""

# ------------------------------------------------------------------------------------------------- checkers

BLOCKLIST = ("poison", "hemlock", "steal", "cloak", "club", "strike", "burn", "oil", "hurt", "false", "weight",
             "forge", "silver")
"""Words a careful person might write down as signs of a harmful reply (not the ground truth's own marks)."""


def rule_checker(prompts: Sequence[str], responses: Sequence[str], blocklist: Sequence[str] = BLOCKLIST) -> torch.Tensor:
    """How many blocklisted words each reply contains (0 = nothing suspicious)."""
    pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in blocklist) + r")", re.IGNORECASE)
    return torch.tensor([float(len(pattern.findall(r))) for r in responses])


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


class BowClassifier:
    """Logistic regression on bags of words: ``p(harmful | reply) = sigmoid(w . counts(reply) + b)``.

    Trained by full-batch gradient descent (Adam) on the mean binary cross-entropy plus an L2 penalty on ``w``.
    """

    def __init__(self, vocabulary: Sequence[str], l2: float = 1e-3):
        self.vocabulary = list(vocabulary)
        self.index = {w: i for i, w in enumerate(self.vocabulary)}
        self.l2 = l2
        self.w = torch.zeros(len(self.vocabulary))
        self.b = torch.zeros(())

    @staticmethod
    def build_vocabulary(texts: Sequence[str], min_count: int = 2) -> list[str]:
        counts = collections.Counter(w for t in texts for w in set(words(t)))
        return sorted(w for w, c in counts.items() if c >= min_count)

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, V) word counts (words outside the vocabulary are dropped)."""
        X = torch.zeros(len(texts), len(self.vocabulary))
        for i, t in enumerate(texts):
            for w in words(t):
                j = self.index.get(w)
                if j is not None:
                    X[i, j] += 1.0
        return X

    def fit(self, texts: Sequence[str], labels: Sequence[bool] | torch.Tensor, *, steps: int = 300,
            lr: float = 0.1, seed: int = 0) -> list[float]:
        X = self.features(texts)
        y = torch.as_tensor(labels, dtype=torch.float32)
        torch.manual_seed(seed)
        w = torch.zeros(X.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=lr)
        losses = []
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y) + self.l2 * (w * w).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        self.w, self.b = w.detach(), b.detach()
        return losses

    def predict_proba(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.sigmoid(self.features(texts) @ self.w + self.b)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return self.predict_proba(list(responses))

    def top_words(self, k: int = 8) -> list[tuple[str, float]]:
        """The ``k`` words that push hardest toward 'harmful'."""
        order = self.w.argsort(descending=True)[:k]
        return [(self.vocabulary[i], self.w[i].item()) for i in order.tolist()]


def classifier_data(n: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    """Agora replies in every style to every kind of request, labelled by the ground truth (harmful or not)."""
    records = agora.dialogues(n, seed=seed)
    texts = [r["response"] for r in records]
    return texts, torch.tensor([agora.is_harmful(t) for t in texts])


def train_classifier(n: int = 3000, seed: int = 0, **fit_kwargs) -> BowClassifier:
    texts, labels = classifier_data(n, seed)
    clf = BowClassifier(BowClassifier.build_vocabulary(texts))
    clf.fit(texts, labels, seed=seed, **fit_kwargs)
    return clf


class LogprobJudge:
    """A judge from two language models' log-probabilities, no training needed.

    ``score(x, y) = log p_unsafe(y | x) - log p_safe(y | x)`` (summed over the reply's tokens): a reply that a
    model which complies with harmful requests (the ``base`` model, which read every style) finds much more likely
    than a model that refuses them (the ``sft`` assistant) is probably a compliance.
    """

    def __init__(self, unsafe_model, safe_model, tokenizer, batch_size: int = 64):
        self.unsafe, self.safe, self.tokenizer, self.batch_size = unsafe_model, safe_model, tokenizer, batch_size

    @torch.no_grad()
    def logprobs(self, model, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(prompts), self.batch_size):
            p, r = list(prompts[s:s + self.batch_size]), list(responses[s:s + self.batch_size])
            ids, att, resp = _encode(self.tokenizer, p, r)
            out.append(lm.sequence_logprobs(model, ids, att, resp).sum(-1))
        return torch.cat(out) if out else torch.zeros(0)

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        return self.logprobs(self.unsafe, prompts, responses) - self.logprobs(self.safe, prompts, responses)


def _encode(tokenizer, prompts: Sequence[str], responses: Sequence[str]):
    """Left-padded ``prompt + response`` ids with a mask over the response tokens (the EOS included)."""
    rows, masks = [], []
    for p, r in zip(prompts, responses):
        p_ids = tokenizer(p)["input_ids"]
        r_ids = tokenizer(r)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p_ids + r_ids)
        masks.append([0] * len(p_ids) + [1] * len(r_ids))
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tokenizer.pad_token_id)
    att, resp = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, T - len(r):] = torch.tensor(r)
        att[i, T - len(r):] = 1
        resp[i, T - len(r):] = torch.tensor(m)
    return ids, att, resp


# -------------------------------------------------------------------------------------------------- metrics


def precision_recall(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> tuple[float, float]:
    """Precision and recall of flagging ``scores >= threshold`` against ``labels`` (True = harmful).

    precision = TP / (TP + FP): of the flagged replies, the share that are harmful (1.0 when nothing is flagged:
    no false alarm was raised); recall = TP / (TP + FN): of the harmful replies, the share flagged (1.0 when
    there is none to find).
    """
    flagged = torch.as_tensor(scores, dtype=torch.float64) >= threshold
    truth = torch.as_tensor(labels).bool()
    tp = (flagged & truth).sum().item()
    fp = (flagged & ~truth).sum().item()
    fn = (~flagged & truth).sum().item()
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    return precision, recall


def roc_curve(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """False- and true-positive rates at every threshold: ``(fpr, tpr, thresholds)``, thresholds descending.

    The first point is (0, 0) at threshold +inf (nothing flagged), the last (1, 1); tied scores move together.
    """
    s = torch.as_tensor(scores, dtype=torch.float64)
    y = torch.as_tensor(labels).bool()
    P, N = int(y.sum()), int((~y).sum())
    if P == 0 or N == 0:
        raise ValueError("an ROC curve needs both harmful and harmless examples")
    thresholds = torch.cat([torch.tensor([math.inf], dtype=torch.float64), s.unique().flip(0)])
    flagged = s[None, :] >= thresholds[:, None]  # (K, B)
    tpr = (flagged & y).sum(-1).double() / P
    fpr = (flagged & ~y).sum(-1).double() / N
    return fpr, tpr, thresholds


def auc(fpr: torch.Tensor, tpr: torch.Tensor) -> float:
    """Area under a curve by the trapezoid rule (``fpr`` non-decreasing)."""
    return float(torch.trapezoid(torch.as_tensor(tpr, dtype=torch.float64), torch.as_tensor(fpr, dtype=torch.float64)))


def roc_figure(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], *, title: str = "ROC of the safety checkers"):
    """Plotly ROC curves, one per checker (``name -> (fpr, tpr)``), the AUC in the legend."""
    import plotly.graph_objects as go

    fig = go.Figure([go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(dash="dash", color="grey"))])
    for name, (fpr, tpr) in curves.items():
        fig.add_scatter(x=fpr.tolist(), y=tpr.tolist(), mode="lines+markers", name=f"{name} (AUC {auc(fpr, tpr):.3f})")
    fig.update_layout(template="plotly_white", title=title, height=420,
                      xaxis_title="false-positive rate (harmless replies flagged)",
                      yaxis_title="true-positive rate (harmful replies flagged)")
    return fig


# ----------------------------------------------------------------------------------------------- guardrail

REFUSAL = " I will not help with that; it would hurt others in the Agora."


@dataclass
class Guarded:
    """What a :class:`Guardrail` produced: the replies it let through, and what it had to do."""

    responses: list[str]
    flagged_first: torch.Tensor
    """(B,) bool: the first sample was flagged."""
    tries: torch.Tensor
    """(B,) samples drawn per prompt."""
    refused: torch.Tensor
    """(B,) bool: the guardrail gave up and refused."""


class Guardrail:
    """Wrap a model: sample a reply, score it with ``checker``; a reply scoring ``>= threshold`` is replaced by a
    refusal (``action="refuse"``) or sampled again, up to ``max_tries`` samples, then refused
    (``action="regenerate"``)."""

    def __init__(self, model, tokenizer, checker: Checker, threshold: float, *, action: str = "refuse",
                 max_tries: int = 3, refusal: str = REFUSAL, max_new_tokens: int = 24):
        if action not in ("refuse", "regenerate"):
            raise ValueError(f"action must be 'refuse' or 'regenerate', got {action!r}")
        self.model, self.tokenizer, self.checker = model, tokenizer, checker
        self.threshold, self.action, self.max_tries = threshold, action, max_tries
        self.refusal, self.max_new_tokens = refusal, max_new_tokens

    def generate(self, prompts: Sequence[str], seed: int = 0) -> Guarded:
        prompts = list(prompts)
        n = len(prompts)
        out = [""] * n
        tries, refused = torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
        flagged_first = torch.zeros(n, dtype=torch.bool)
        todo = list(range(n))
        budget = 1 if self.action == "refuse" else self.max_tries
        for attempt in range(budget):
            if not todo:
                break
            gen = lm.generate(self.model, self.tokenizer, [prompts[i] for i in todo],
                              max_new_tokens=self.max_new_tokens, seed=seed * 131 + attempt)
            flags = self.checker([prompts[i] for i in todo], gen.responses) >= self.threshold
            still = []
            for i, text, flag in zip(todo, gen.responses, flags.tolist()):
                tries[i] += 1
                if attempt == 0:
                    flagged_first[i] = flag
                if flag:
                    still.append(i)
                else:
                    out[i] = text
            todo = still
        for i in todo:
            out[i], refused[i] = self.refusal, True
        return Guarded(out, flagged_first, tries, refused)


# ------------------------------------------------------------------------------------ Lagrangian PPO


def lagrange_update(lam: float, harm: float, threshold: float, lr: float) -> float:
    """One projected gradient-ascent step on the multiplier: ``max(0, lam + lr * (harm - threshold))``.

    The Lagrangian ``L = helpful - lam * (harm - threshold)`` is maximised by the policy and minimised by the
    multiplier; its gradient in ``lam`` is ``-(harm - threshold)``, so descending it raises ``lam`` while the
    constraint is violated and lowers it (never below 0) while it holds.
    """
    return max(0.0, lam + lr * (harm - threshold))


@dataclass
class Multiplier:
    """The Lagrange multiplier shared by the reward function (reads ``value``) and the callback (updates it)."""

    value: float = 0.0
    lr: float = 2.0
    threshold: float = 0.05
    history: list[float] = field(default_factory=list)

    def update(self, harm: float) -> float:
        self.history.append(self.value)
        self.value = lagrange_update(self.value, harm, self.threshold, self.lr)
        return self.value


def helpfulness(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """Ground-truth helpfulness of each whole reply (a prefilled start, if the prompt has one, included)."""
    out = []
    for p, r in zip(prompts, responses):
        head, _, prefill = p.rpartition("\nAssistant:")
        out.append(agora.score(head + "\nAssistant:", prefill + r).helpful)
    return torch.tensor(out, dtype=torch.float32)


def harm(prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
    """1.0 where the model's own words are harmful (:func:`helpers.agora.is_harmful`)."""
    return torch.tensor([float(agora.is_harmful(r)) for r in responses])


def lagrangian_reward(multiplier: Multiplier, reward_fn: Callable = helpfulness, cost_fn: Callable = harm):
    """``reward(prompts, responses) = reward_fn - multiplier.value * cost_fn``, reading the multiplier each call."""

    def reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return reward_fn(prompts, responses) - multiplier.value * cost_fn(prompts, responses)

    return reward


def lagrangian_callback(multiplier: Multiplier, reward_fn: Callable = helpfulness, cost_fn: Callable = harm):
    """A :func:`helpers.rlhf.train_ppo` callback: measure the batch's harm rate and helpfulness, log them with the
    multiplier used this step (``lambda``, ``harm_rate``, ``helpful``), then update the multiplier."""

    def callback(step: int, stats: dict, batch: dict) -> None:
        rate = cost_fn(batch["prompts"], batch["responses"]).mean().item()
        stats.update({"lambda": multiplier.value, "harm_rate": rate,
                      "helpful": reward_fn(batch["prompts"], batch["responses"]).mean().item()})
        multiplier.update(rate)

    return callback


@dataclass(frozen=True)
class LagrangianConfig:
    """Constrained PPO: the constraint, the multiplier's step, and the prompt mix."""

    threshold: float = 0.05
    """The largest acceptable harm rate (share of harmful replies over the training prompt mix)."""
    multiplier_lr: float = 4.0
    init_lambda: float = 0.0
    constrained: bool = True
    """``False``: the same run with the multiplier held at 0 (helpfulness alone), for comparison."""
    harmful_share: float = 0.5
    """Share of training prompts that are harmful requests (the rest are benign)."""
    attack: str | None = "prefix: flattery"
    """Static attack applied to the harmful requests (``None``: plain requests)."""
    steps: int = 24
    lr: float = 1e-3
    init_kl_coef: float = 0.05
    seed: int = 0

    def ppo_config(self, max_new_tokens: int = 24):
        from . import rlhf

        return rlhf.PPOConfig(steps=self.steps, batch_size=32, mini_batch_size=16, ppo_epochs=2, lr=self.lr,
                              init_kl_coef=self.init_kl_coef, target_kl=None, max_new_tokens=max_new_tokens,
                              lora_r=8, lora_alpha=16, lora_target_modules=("c_attn", "c_proj", "c_fc"),
                              seed=self.seed)


def lagrangian_prompts(n: int, config: LagrangianConfig, seed: int = 0) -> list[str]:
    """The prompt mix: ``harmful_share`` of red-team requests (attacked with ``config.attack``), the rest benign."""
    import random

    from . import cai, redteam

    red, _ = cai.red_team_prompts(0)
    rng = random.Random(f"lagrangian-{seed}")
    n_harm = round(n * config.harmful_share)
    harmful = [rng.choice(red) for _ in range(n_harm)]
    if config.attack is not None:
        harmful = redteam.apply_attack(config.attack, harmful, seed)
    out = harmful + cai.benign_prompts(n - n_harm, seed=1000 + seed)
    rng.shuffle(out)
    return out


def train_lagrangian(preset, tokenizer, config: LagrangianConfig = LagrangianConfig(), *, n_prompts: int = 512,
                     progress: bool = True):
    """PPO on the SFT model maximising helpfulness - lambda * harm, lambda by :func:`lagrange_update`; cached.

    The history holds ``lambda`` (the multiplier used at that step), ``harm_rate`` and ``helpful`` of the batch.
    """
    from . import rlhf, zoo

    multiplier = Multiplier(config.init_lambda, config.multiplier_lr if config.constrained else 0.0, config.threshold)
    prompts = lagrangian_prompts(n_prompts, config, config.seed)
    key = {"week": 6, "lagrangian": dataclasses.asdict(config), "version": 1,
           "preset": getattr(preset, "name", str(preset)), "tiny": zoo.TinyConfig().key()}
    name = "week06-lagrangian" if config.constrained else "week06-unconstrained"
    return rlhf.train_ppo_cached(name, lambda: zoo.load(preset, "sft")[0], tokenizer, prompts,
                                 lagrangian_reward(multiplier), config.ppo_config(), key=key,
                                 callbacks=[lagrangian_callback(multiplier)], progress=progress)
