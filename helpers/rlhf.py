"""RLHF with PPO: the course's loop, one file, top to bottom (taught in week 3, reused in weeks 4, 5 and 6).

How this deviates from the papers (Ziegler et al. 2019, "Fine-tuning language models from human preferences";
Stiennon et al. 2020; Ouyang et al. 2022), and why:

- **One copy of the weights.** The policy is a LoRA adapter (peft) on the SFT model, and the reference policy
  is the *same* model with the adapter switched off (``disable_adapter``). The papers keep a frozen copy of the
  SFT model; an adapter halves the memory and makes "how far did we move" literally the adapter.
- **A value head, not a value network.** Values come from a scalar linear head on the policy's last hidden
  state (as in TRL's former PPOTrainer), not from a separate network initialised from the reward model: one
  forward pass gives log-probs and values, at the cost of policy and value sharing (and pulling on) features.
- **The KL penalty is the per-token k1 estimate** ``log pi(a|s) - log pi_ref(a|s)`` added to the reward of
  every response token, and the sequence's score is added at its last token (Ziegler et al. eq. 2, token by
  token); the adaptive controller is theirs (section 2.2), driven by the KL summed over a response.
- **Reward whitening** (optional, off by default) rescales the per-token rewards to unit variance over the batch
  without shifting their mean, as TRL did; advantages are always whitened (Huang et al. 2022, "The 37
  implementation details of PPO"). The papers normalise the reward model once, offline, instead.
- **No dropout during PPO.** The model stays in eval mode, so at the first update the new/old ratio is exactly 1.
- **One sample per prompt, the episode is the response**, gamma = 1 by default (bandit-like, as in the papers).
- **Accelerate.** The loop runs single-process or under ``torchrun --nproc_per_node N`` unchanged: each process
  generates and scores its share of the batch and forms its own mini-batches; each loss is weighted by the
  process's share of the mini-batch's tokens, so that DDP's gradient average is the gradient of the masked
  mean over all processes' tokens; advantage whitening and the logged statistics use the whole batch.

The algorithm's pure pieces (GAE, losses, KL penalty, controllers) live in :mod:`helpers.ppo`; this module is
the plumbing around them, in reading order: :class:`PPOConfig`; :func:`make_policy` (adapter + value head);
:func:`rollout`; the loop :func:`train_ppo` (and :func:`train_ppo_cached`, which builds a run once per
configuration); :func:`evaluate`, :func:`evaluation_callback`, :func:`mean_ci` and :func:`paired_effect` to
measure what it did; :func:`train_trl` (TRL's GRPO, RLOO and DPO on the same model, for contrast); and a command
line for two processes (``torchrun --nproc_per_node 2 -m helpers.rlhf --out DIR``).

Weeks 4 to 6 reuse the loop: anything with the signature ``reward_fn(prompts, responses) -> (B,) tensor`` is a
reward (a preference model on AI labels, a judge, a reward minus a Lagrange multiplier times a cost), callbacks
see every step, and ``PPOConfig.stop_strings`` ends a reply at the end of the speaker's turn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import lm, ppo

RewardFn = Callable[[list[str], list[str]], torch.Tensor]
"""``reward_fn(prompts, responses) -> (B,)`` float tensor: one scalar score per response (higher is better)."""

if not torch.cuda.is_available():  # Accelerate imports DeepSpeed when it is installed; it would warn, on every
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU run, that it found no GPU. Naming the CPU says it is meant.


# ---------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class PPOConfig:
    """Everything that determines a PPO run (its hash names cached runs, see :func:`train_cached`)."""

    steps: int = 40
    """Rollout-and-update iterations."""
    batch_size: int = 32
    """Prompts per rollout (one response each), summed over all processes."""
    mini_batch_size: int = 16
    """Sequences per gradient step, summed over all processes; must divide ``batch_size``."""
    ppo_epochs: int = 2
    """Passes over each rollout batch (each pass in shuffled mini-batches)."""
    lr: float = 3e-3
    """AdamW learning rate of the LoRA adapter and the value head (LoRA tolerates larger rates than full tuning)."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm)."""
    clip_coef: float = 0.2
    """PPO's epsilon: the ratio pi/pi_old is clipped to [1 - eps, 1 + eps]."""
    clip_value: float = 0.2
    """Value clipping: new values stay within this of the rollout's values in the clipped loss."""
    vf_coef: float = 0.1
    """Weight of the value loss in ``loss = pg_loss + vf_coef * vf_loss``."""
    gamma: float = 1.0
    """Discount over response tokens (1: the final score counts fully at every token)."""
    lam: float = 0.95
    """GAE's lambda: 0 gives one-step TD advantages, 1 Monte-Carlo returns minus values."""
    init_kl_coef: float = 0.1
    """beta in ``r = r_RM - beta * KL``: the starting (or, with ``target_kl=None``, fixed) KL coefficient."""
    target_kl: float | None = None
    """Target KL per response (nats) of the adaptive controller; ``None`` keeps ``kl_coef`` fixed."""
    kl_horizon: int = 10_000
    """Adaptive controller's horizon in samples (Ziegler et al. use 10,000): smaller reacts faster."""
    whiten_rewards: bool = False
    """Rescale per-token rewards to unit variance over the batch (mean kept) before GAE."""
    score_clip: float | None = None
    """Clip the reward function's scores to [-score_clip, score_clip]; ``None`` leaves them."""
    max_new_tokens: int = 24
    """Tokens generated per response."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (1: sample the policy itself, as PPO's ratio assumes)."""
    top_p: float = 1.0
    """Nucleus sampling of rollouts (1: off, again so the samples come from the policy being optimised)."""
    stop_strings: tuple[str, ...] = ()
    """End a response where one of these strings appears (e.g. ``("\\nUser:",)`` to stop at the end of the
    speaker's turn): the reward function sees the text before it, the policy is trained on the tokens up to
    and including the one that completes it (the stop is an action, like EOS)."""
    lora_r: int = 8
    """LoRA rank of the policy adapter."""
    lora_alpha: int = 16
    """LoRA scaling numerator: the update is ``(alpha / r) * B @ A``."""
    lora_dropout: float = 0.0
    """Dropout inside the adapter (0: the loop keeps the model deterministic, see the module notes)."""
    lora_target_modules: tuple[str, ...] | None = None
    """Module names LoRA adapts; ``None`` asks :func:`helpers.zoo.lora_target_modules` (attention projections)."""
    generation_batch_size: int | None = None
    """Prompts per ``generate`` call and per generation seed; ``None``: each process's share of the batch.
    Fix it (dividing ``batch_size / processes``) to draw the same samples whatever the number of processes."""
    seed: int = 0
    """Seeds the value head, the prompt order, sampling and mini-batch shuffling."""


# ------------------------------------------------------------------------------------- policy + value head


class PolicyWithValueHead(nn.Module):
    """A causal LM with a LoRA adapter (the policy) and a scalar value head on its last hidden state.

    ``forward(input_ids, attention_mask) -> (logits (B, T, V), values (B, T))``: ``values[:, t]`` estimates the
    return from the state that ``logits[:, t]`` acts in, i.e. before token ``t + 1`` is chosen.
    ``with policy.reference():`` yields the model with the adapter disabled: the reference policy.
    """

    def __init__(self, model: nn.Module, hidden_size: int):
        super().__init__()
        self.model = model  # a peft PeftModel
        self.value_head = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)  # values start at 0: no bias toward any return
        nn.init.zeros_(self.value_head.bias)

    _checkpoint_layers: tuple = ()
    """The layers recomputed in the backward pass (set by :func:`enable_gradient_checkpointing`); empty: none."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) left padding is safe
        with self._checkpointed() as checkpointing:
            kwargs = {"use_cache": False} if checkpointing else {}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             output_hidden_states=True, **kwargs)
        hidden = out.hidden_states[-1].float()  # (B, T, H) after the final layer norm
        values = self.value_head(hidden).squeeze(-1)  # (B, T)
        return out.logits, values

    @contextlib.contextmanager
    def _checkpointed(self):
        """Inside: the layers checkpoint, if asked and gradients are on. transformers checkpoints a layer only in
        training mode, so the layers alone switch to it here (their dropouts stay off) and switch back after:
        generation, which runs outside, keeps its KV cache."""
        layers = self._checkpoint_layers
        if not (layers and torch.is_grad_enabled()):
            yield False
            return
        before = [m.training for m in layers]
        for m in layers:
            m.training = True
        try:
            yield True
        finally:
            for m, t in zip(layers, before):
                m.training = t

    @contextlib.contextmanager
    def reference(self):
        """The reference policy: the same weights with the LoRA adapter switched off."""
        with self.model.disable_adapter():
            yield self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@contextlib.contextmanager
def _quiet_peft():
    """peft and TRL ask transformers about (deprecated) gradient checkpointing; nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*checkpointing.*", category=FutureWarning)
        yield


def make_policy(model: nn.Module, config: PPOConfig = PPOConfig()) -> PolicyWithValueHead:
    """Wrap a causal LM (the SFT model) as a trainable policy: a fresh LoRA adapter plus a value head.

    The base weights are frozen; only the adapter and the value head train. ``model`` must be a plain
    ``PreTrainedModel``: to continue from a LoRA-tuned model, merge it first (``peft_model.merge_and_unload()``),
    so that the merged model is the reference policy.
    """
    from peft import LoraConfig, PeftModel, get_peft_model

    from . import zoo

    if isinstance(model, PeftModel):
        raise ValueError("make_policy needs a plain model; merge the adapter first: model = model.merge_and_unload()")
    targets = list(config.lora_target_modules or zoo.lora_target_modules(model))
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, task_type="CAUSAL_LM",
                      fan_in_fan_out=model.config.model_type == "gpt2")  # GPT-2 stores Linear weights transposed
    torch.manual_seed(config.seed)
    with _quiet_peft():
        peft_model = get_peft_model(model, lora)
    peft_model.eval()  # no dropout: see the module notes
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    policy = PolicyWithValueHead(peft_model, hidden).to(next(model.parameters()).device)
    return policy


def enable_gradient_checkpointing(policy: PolicyWithValueHead) -> PolicyWithValueHead:
    """Trade compute for memory in the PPO updates: each layer's activations are recomputed in the backward pass
    (one more forward per update), so a mini-batch keeps one layer's activations at a time instead of all of them.
    Gradients are the same (the model is deterministic: no dropout). Generation and the no-grad passes are untouched."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    base = policy.model.get_base_model() if hasattr(policy.model, "get_base_model") else policy.model
    layers = tuple(m for m in base.modules() if isinstance(m, GradientCheckpointingLayer))
    if not getattr(base, "supports_gradient_checkpointing", False) or not layers:
        raise ValueError(f"{type(base).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.x's name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    policy._checkpoint_layers = layers
    return policy


def save_policy(policy: PolicyWithValueHead, path: str | Path) -> Path:
    """Save the adapter (peft format) and the value head into ``path``."""
    path = Path(path)
    policy.model.save_pretrained(path / "adapter")
    torch.save(policy.value_head.state_dict(), path / "value_head.pt")
    return path


def load_policy(model: nn.Module, path: str | Path) -> PolicyWithValueHead:
    """A policy from :func:`save_policy`'s folder on top of ``model`` (the same base model it was trained on)."""
    from peft import PeftModel

    path = Path(path)
    with _quiet_peft():
        peft_model = PeftModel.from_pretrained(model, path / "adapter", is_trainable=True)
    peft_model.eval()
    head = torch.load(path / "value_head.pt", map_location="cpu")
    policy = PolicyWithValueHead(peft_model, head["weight"].shape[1])
    policy.value_head.load_state_dict(head)
    return policy.to(next(model.parameters()).device)


# ------------------------------------------------------------------------------------------------- rollouts


def _autocast(model: nn.Module):
    """Autocast to the base weights' half precision on GPU; nothing on CPU or in float32 (one code path)."""
    dtype = getattr(model, "dtype", torch.float32)
    device = next(model.parameters()).device
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def truncate_at_stop(rollout: lm.Rollout, tokenizer, stop_strings: Sequence[str]) -> lm.Rollout:
    """End each response where a stop string first appears (see :attr:`PPOConfig.stop_strings`).

    The text keeps what comes before the stop string; the masks keep the tokens up to and including the one
    that completes it, and the tokens after it become padding.
    """
    if not stop_strings:
        return rollout
    input_ids, attention, response = rollout.input_ids.clone(), rollout.attention_mask.clone(), rollout.response_mask.clone()
    texts = list(rollout.responses)
    P = rollout.prompt_len
    for i in range(len(texts)):
        cut = min((k for k in (texts[i].find(s) for s in stop_strings) if k >= 0), default=-1)
        if cut < 0:
            continue
        texts[i] = texts[i][:cut]
        ids = input_ids[i, P:][response[i, P:].bool()].tolist()
        for n in range(1, len(ids) + 1):  # the first token count whose text contains a stop string
            if any(s in tokenizer.decode(ids[:n], skip_special_tokens=True) for s in stop_strings):
                break
        response[i, P + n:] = 0
        attention[i, P + n:] = 0
        input_ids[i, P + n:] = tokenizer.pad_token_id
    return lm.Rollout(rollout.prompts, texts, input_ids, attention, response, P)


def rollout(model, tokenizer, prompts: list[str], config: PPOConfig, seed: int) -> lm.Rollout:
    """Sample one response per prompt from ``model`` with the config's sampling settings and stop strings."""
    out = lm.generate(model, tokenizer, prompts, max_new_tokens=config.max_new_tokens,
                      temperature=config.temperature, top_p=config.top_p, batch_size=len(prompts), seed=seed)
    return truncate_at_stop(out, tokenizer, config.stop_strings)


def _concat(rollouts: list[lm.Rollout], pad_id: int) -> lm.Rollout:
    """Join rollouts (same prompt width or not) into one: prompts left-aligned by padding on the left."""
    if len(rollouts) == 1:
        return rollouts[0]
    P = max(r.prompt_len for r in rollouts)
    N = max(r.input_ids.shape[1] - r.prompt_len for r in rollouts)

    def pad(x, r, value):
        left, right = P - r.prompt_len, N - (x.shape[1] - r.prompt_len)
        return torch.nn.functional.pad(x, (left, right), value=value)

    return lm.Rollout(
        [p for r in rollouts for p in r.prompts], [s for r in rollouts for s in r.responses],
        torch.cat([pad(r.input_ids, r, pad_id) for r in rollouts]),
        torch.cat([pad(r.attention_mask, r, 0) for r in rollouts]),
        torch.cat([pad(r.response_mask, r, 0) for r in rollouts]), P)


def _scores(reward_fn: RewardFn, prompts: list[str], responses: list[str]) -> torch.Tensor:
    out = reward_fn(prompts, responses)
    out = torch.as_tensor(out, dtype=torch.float32).detach().cpu()
    if out.shape != (len(prompts),):
        raise ValueError(f"reward_fn must return one score per response, shape ({len(prompts)},); got {tuple(out.shape)}")
    if not torch.isfinite(out).all():
        raise ValueError("reward_fn returned nan or inf scores")
    return out


def make_accelerator():
    """An ``accelerate.Accelerator`` in full precision (one process, or the processes ``torchrun`` started).

    A trainer run earlier in the same process (TRL's, for one) leaves bf16 mixed precision in accelerate's shared
    state; ``prepare`` would then run the policy under autocast but not the reference, and the KL at step 0 would
    not be 0. Half precision on a GPU comes from the model's own dtype instead (see ``_autocast``).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state.get("_mixed_precision", "no") != "no":
        AcceleratorState._reset_state()
    if deepspeed_on_cpu():
        from accelerate.utils import InitProcessGroupKwargs

        return Accelerator(mixed_precision="no", kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


def deepspeed_on_cpu() -> bool:
    """True under ``accelerate launch`` with a DeepSpeed config on a machine without CUDA.

    Accelerate's ``cpu=True`` would quietly run such a launch as plain DDP, and without it Accelerate finds no
    distributed backend on a CPU; naming gloo makes DeepSpeed (its CPU accelerator) run across the processes.
    """
    return not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _whiten_global(x: torch.Tensor, mask: torch.Tensor, accelerator, shift_mean: bool = True) -> torch.Tensor:
    """:func:`helpers.ppo.whiten` over the masked positions of *all* processes' batches."""
    if accelerator.num_processes == 1:
        return ppo.whiten(x, mask, shift_mean=shift_mean)
    m = mask.to(x.dtype)
    sums = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).to(accelerator.device)
    s, s2, n = accelerator.reduce(sums, "sum").to(x.device)
    mean = s / n.clamp(min=1)
    var = s2 / n.clamp(min=1) - mean**2
    out = (x - mean) * torch.rsqrt(var.clamp(min=0) + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


# ------------------------------------------------------------------------------------------------- the loop


@dataclass
class PPOResult:
    """What :func:`train_ppo` returns."""

    policy: PolicyWithValueHead
    """The trained policy (unwrapped from any distributed wrapper)."""
    history: list[dict]
    """One dict of statistics per step (see :func:`train_ppo` for the keys)."""
    samples: list[dict] = field(default_factory=list)
    """The last step's rollout on this process: ``{"prompt", "response", "score"}`` per sample."""
    config: PPOConfig | None = None

    def curve(self, key: str) -> list[float]:
        """One statistic over the steps, e.g. ``result.curve("kl")``."""
        return [h[key] for h in self.history]


def train_ppo(policy: PolicyWithValueHead, tokenizer, prompts: Sequence[str], reward_fn: RewardFn,
              config: PPOConfig = PPOConfig(), *, callbacks: Sequence[Callable] = (), accelerator=None,
              progress: bool = True) -> PPOResult:
    """Optimise ``policy`` with PPO on ``r = reward_fn(prompt, response) - kl_coef * KL(policy || reference)``.

    Args:
        policy: from :func:`make_policy` (a LoRA adapter and a value head on the SFT model). Trained in place.
        tokenizer: left-padded (see :func:`helpers.zoo.prepare_tokenizer`).
        prompts: formatted prompts (``"User: ...\\nAssistant:"``), used in a seeded random order, one pass after
            another, ``batch_size`` per step.
        reward_fn: ``reward_fn(prompts, responses) -> (B,)`` tensor of scores (higher is better), called on each
            process's share of the rollout; responses are the decoded texts (cut at a stop string, if any).
            A learned reward model plugs in as ``reward_model.score``. Anything that closes over state works:
            a Lagrangian penalty ``lambda r, s: task(r, s) - lam[0] * cost(r, s)`` with ``lam`` updated by a
            callback, a novelty bonus that remembers past responses.
        config: :class:`PPOConfig`.
        callbacks: each ``callback(step, stats, batch)`` runs after the update of every step, on every process;
            ``stats`` is that step's history dict (add keys to log more; they must be numbers) and ``batch`` a
            dict with this process's ``prompts``, ``responses``, ``scores`` (B,), ``kl`` (B,) summed per response,
            and the ``policy`` being trained (to evaluate it every few steps, say).
            A callback that returns ``True`` stops training after this step.
        accelerator: an ``accelerate.Accelerator``; ``None`` makes one (single process, or the processes
            ``torchrun`` started). The policy and optimiser go through ``accelerator.prepare``.
        progress: show a tqdm bar (main process only).

    Each step: (1) sample one response per prompt from the policy; (2) score them with ``reward_fn``;
    (3) per-token log-probs and values of the policy, log-probs of the reference (adapter off), all without
    gradients; (4) per-token rewards ``-kl_coef * (logp - ref_logp)``, plus the score at the last response token
    (:func:`helpers.ppo.kl_penalised_rewards`), optionally whitened; (5) GAE advantages and returns, advantages
    whitened over the batch; (6) ``ppo_epochs`` passes of shuffled mini-batches minimising
    ``ppo_policy_loss + vf_coef * ppo_value_loss``; (7) update ``kl_coef`` from the measured KL.

    Shapes: ``B`` rollout sequences on this process, ``T`` prompt + response tokens; per-token tensors are
    (B, T - 1), position ``t`` scoring token ``t + 1`` (the convention of :func:`helpers.lm.sequence_logprobs`).

    Returns a :class:`PPOResult`. ``history[i]`` holds, averaged over the whole batch (all processes):
    ``step``; ``score`` and ``score_std`` (the reward function's scores); ``kl`` (KL to the reference summed over
    a response, the k1 estimate, nats); ``reward`` (score - kl_coef * kl, what PPO maximises); ``kl_coef`` (the
    coefficient used this step); ``entropy`` (per token, nats); ``response_tokens``; ``pg_loss``; ``vf_loss``;
    ``clipfrac``; ``approx_kl`` (old -> new policy, per token); ``value_mean``; ``explained_variance`` (of the
    returns by the values); ``seconds`` (wall clock since the start) and ``cpu_seconds`` (this process's CPU
    time since the start), both without the time spent in callbacks; plus whatever callbacks add.
    """
    from tqdm.auto import tqdm

    accelerator = accelerator or make_accelerator()
    P, rank = accelerator.num_processes, accelerator.process_index
    B, mb = config.batch_size, config.mini_batch_size
    if B % P or mb % P or B % mb:
        raise ValueError(f"batch_size ({B}) and mini_batch_size ({mb}) must be multiples of the number of "
                         f"processes ({P}), and mini_batch_size must divide batch_size")
    chunk = config.generation_batch_size or B // P
    if (B // P) % chunk:
        raise ValueError(f"generation_batch_size ({chunk}) must divide each process's share of the batch ({B // P})")
    if not prompts:
        raise ValueError("train_ppo needs at least one prompt")
    prompts = list(prompts)

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, eps=1e-5)  # eps 1e-5 as in the PPO reference code
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # no dataloader goes through prepare, so DeepSpeed is told the micro-batch here
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = mb // P
    model, optimizer = accelerator.prepare(policy, optimizer)  # model: DDP-wrapped when P > 1
    policy = accelerator.unwrap_model(model)
    kl_ctl = (ppo.FixedKLController(config.init_kl_coef) if config.target_kl is None
              else ppo.AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon))

    history, samples = [], []
    t0, c0 = time.perf_counter(), time.process_time()  # callbacks' time is subtracted below
    bar = tqdm(range(config.steps), desc="PPO", disable=not (progress and accelerator.is_main_process),
               file=sys.stdout, leave=False)
    for step in bar:
        # 1. Rollout: this process's chunks of the global batch, each with its own seed.
        batch_idx = _batch_indices(len(prompts), B, step, config.seed)  # the global batch's prompt indices
        mine = [c for c in range(B // chunk) if c % P == rank]  # chunks r, r + P, r + 2P, ...
        rollouts = []
        for c in mine:
            chunk_prompts = [prompts[i] for i in batch_idx[c * chunk:(c + 1) * chunk]]
            rollouts.append(rollout(policy.model, tokenizer, chunk_prompts, config,
                                    seed=_mix(config.seed, step, c)))
        roll = _concat(rollouts, tokenizer.pad_token_id)

        # 2. Scores from the reward function.
        scores = _scores(reward_fn, roll.prompts, roll.responses)  # (B,)
        if config.score_clip is not None:
            scores = scores.clamp(-config.score_clip, config.score_clip)

        # 3. Log-probs and values of the rollout under the policy, log-probs under the reference: no gradients.
        device = accelerator.device
        input_ids, attention_mask = roll.input_ids.to(device), roll.attention_mask.to(device)
        mask = roll.response_mask[:, 1:].to(device).bool()  # (B, T-1) response tokens
        with torch.no_grad(), _autocast(policy.model):
            logits, values = policy(input_ids, attention_mask)
            logits, values = logits[:, :-1], values[:, :-1]  # (B, T-1, V), (B, T-1)
            logprobs = lm.token_logprobs(logits, input_ids[:, 1:], mask)  # (B, T-1)
            entropy = lm.masked_mean(lm.entropy_from_logits(logits), mask)
            del logits
            with policy.reference() as ref:
                ref_logprobs = lm.sequence_logprobs(ref, input_ids, attention_mask, roll.response_mask.to(device))
        values = values * mask

        # 4. Per-token rewards: -kl_coef * KL at every response token, the score at the last one.
        kl_coef = kl_ctl.value
        rewards, kl = ppo.kl_penalised_rewards(scores.to(device), logprobs, ref_logprobs, mask, kl_coef)
        if config.whiten_rewards:
            rewards = _whiten_global(rewards, mask, accelerator, shift_mean=False)

        # 5. Advantages (GAE) and value targets; advantages whitened over the whole batch.
        advantages, returns = ppo.gae(rewards, values, mask, config.gamma, config.lam)
        advantages = _whiten_global(advantages, mask, accelerator)

        # 6. PPO epochs over shuffled mini-batches of this process's rollout.
        stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": []}
        local_mb = mb // P
        g = torch.Generator().manual_seed(_mix(config.seed, step, 10_000 + rank))
        for _ in range(config.ppo_epochs):
            for mb_idx in torch.randperm(len(scores), generator=g).split(local_mb):
                with _autocast(policy.model):
                    mb_logits, mb_values = model(input_ids[mb_idx], attention_mask[mb_idx])
                mb_mask = mask[mb_idx]
                mb_logprobs = lm.token_logprobs(mb_logits[:, :-1], input_ids[mb_idx, 1:], mb_mask)
                pg_loss, pg_stats = ppo.ppo_policy_loss(mb_logprobs, logprobs[mb_idx], advantages[mb_idx], mb_mask,
                                                        config.clip_coef)
                vf_loss = ppo.ppo_value_loss(mb_values[:, :-1], values[mb_idx], returns[mb_idx], mb_mask,
                                             config.clip_value)
                loss = pg_loss + config.vf_coef * vf_loss
                optimizer.zero_grad(set_to_none=True)
                accelerator.backward(loss * _token_share(mb_mask, accelerator))
                if config.max_grad_norm:
                    accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                for k, v in {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item(), **pg_stats}.items():
                    stats[k].append(v)

        # 7. Statistics over the whole batch, then the KL controller.
        kl_per_seq = kl.sum(-1)  # (B,) nats
        local = {
            "score": scores.mean(), "score_sq": (scores**2).mean(), "kl": kl_per_seq.mean().cpu(),
            "entropy": entropy.cpu(), "response_tokens": mask.sum(-1).float().mean().cpu(),
            "value_mean": lm.masked_mean(values, mask).cpu(),
            "ret_var": _masked_var(returns, mask).cpu(), "res_var": _masked_var(returns - values, mask).cpu(),
            **{k: torch.tensor(sum(v) / len(v)) for k, v in stats.items()},
        }
        glob = _reduce_mean(local, accelerator)
        row = {"step": step, "score": glob["score"],
               "score_std": math.sqrt(max(glob["score_sq"] - glob["score"] ** 2, 0.0)),
               "kl": glob["kl"], "reward": glob["score"] - kl_coef * glob["kl"], "kl_coef": kl_coef,
               "entropy": glob["entropy"], "response_tokens": glob["response_tokens"],
               "pg_loss": glob["pg_loss"], "vf_loss": glob["vf_loss"], "clipfrac": glob["clipfrac"],
               "approx_kl": glob["approx_kl"], "value_mean": glob["value_mean"],
               "explained_variance": 1.0 - glob["res_var"] / max(glob["ret_var"], 1e-8),
               "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
        kl_ctl.update(row["kl"], B)
        batch = {"prompts": roll.prompts, "responses": roll.responses, "scores": scores, "kl": kl_per_seq.cpu(),
                 "policy": policy}
        t_cb, c_cb = time.perf_counter(), time.process_time()
        stop = torch.tensor(0.0)
        for callback in callbacks:
            stop += float(bool(callback(step, row, batch)))
        if P > 1:  # any process asking to stop stops all of them (else the others would wait forever)
            stop = accelerator.reduce(stop.to(accelerator.device), "sum").cpu()
        t0, c0 = t0 + time.perf_counter() - t_cb, c0 + time.process_time() - c_cb
        history.append(row)
        bar.set_postfix(score=f"{row['score']:.2f}", kl=f"{row['kl']:.2f}")
        samples = [{"prompt": p, "response": r, "score": s.item()}
                   for p, r, s in zip(roll.prompts, roll.responses, scores)]
        if stop.item() > 0:
            break
    bar.close()
    return PPOResult(policy, history, samples, config)


def _batch_indices(n_prompts: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Prompt indices of step ``step``'s batch: the prompts in a fresh seeded order on every pass, pass after
    pass, ``batch_size`` at a time (the same on every process)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n_prompts)
        perm = _permutation(n_prompts, _mix(seed, epoch))
        out.append(perm[i])
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _mix(*ints: int) -> int:
    """A seed from several integers (step, chunk, ...), the same on every process."""
    h = 0
    for i in ints:
        h = (h * 1_000_003 + int(i) + 1) % (2**31 - 1)
    return h


def _token_share(mask: torch.Tensor, accelerator) -> torch.Tensor:
    """Weight of this process's loss so that DDP's average of gradients equals the gradient of the masked mean
    over *all* processes' tokens: ``n_local * P / n_global`` (1 on a single process)."""
    if accelerator.num_processes == 1:
        return torch.tensor(1.0)
    n_local = mask.sum().float().reshape(1).to(accelerator.device)
    n_global = accelerator.reduce(n_local.clone(), "sum")
    return (n_local * accelerator.num_processes / n_global.clamp(min=1)).squeeze().to(mask.device)


def _masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = lm.masked_mean(x, mask)
    return lm.masked_mean((x - mean) ** 2, mask)


def _reduce_mean(stats: dict[str, torch.Tensor], accelerator) -> dict[str, float]:
    """Average scalar statistics over processes (each process holds an equal share of the batch)."""
    keys = sorted(stats)
    vec = torch.stack([torch.as_tensor(stats[k], dtype=torch.float32).reshape(()) for k in keys])
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec.to(accelerator.device), "mean").cpu()
    return {k: v.item() for k, v in zip(keys, vec)}


# ------------------------------------------------------------------------------------------ cached training


def train_ppo_cached(name: str, model_fn: Callable[[], nn.Module], tokenizer, prompts: Sequence[str],
                     reward_fn: RewardFn, config: PPOConfig, *, key: dict, callbacks: Sequence[Callable] = (),
                     progress: bool = True) -> PPOResult:
    """:func:`train_ppo` from a fresh :func:`make_policy` on ``model_fn()``, built once and cached on disk.

    The cache key is ``config``, the prompts and ``key``: a JSON-able dict that must name everything else the
    result depends on (the base model, the reward function and its version, what the callbacks measure). A
    later call with the same key loads the adapter, the value head, the history (with whatever the callbacks
    added to it) and the last samples instead of training; the callbacks do not run again.
    ``history[-1]["seconds"]`` is then the time the original run took.
    """
    from . import cache

    blob = {"ppo": dataclasses.asdict(config), "prompts": cache.config_key(list(prompts)), **key}

    def build(tmp: Path) -> None:
        result = train_ppo(make_policy(model_fn(), config), tokenizer, prompts, reward_fn, config,
                           callbacks=callbacks, progress=progress)
        save_policy(result.policy, tmp)
        (tmp / "history.json").write_text(json.dumps(result.history, indent=1))
        (tmp / "samples.json").write_text(json.dumps(result.samples, indent=1))

    folder = cache.build_once("rlhf", name, blob, build, version=FORMAT_VERSION)
    return PPOResult(load_policy(model_fn(), folder), json.loads((folder / "history.json").read_text()),
                     json.loads((folder / "samples.json").read_text()), config)


FORMAT_VERSION = 1
"""Bump when the loop changes what it produces, so cached runs are not reused."""


# ----------------------------------------------------------------------------------------------- evaluation


@dataclass
class Evaluation:
    """Samples of a policy on fixed prompts and their scores; every tensor is (n_prompts, n_samples)."""

    prompts: list[str]
    responses: list[list[str]]
    """``responses[i][j]``: sample ``j`` for prompt ``i``."""
    scores: dict[str, torch.Tensor]
    """One tensor per reward function given to :func:`evaluate`."""
    kl: torch.Tensor | None
    """KL to the reference summed over each response (k1, nats); ``None`` without a reference."""
    tokens: torch.Tensor
    """Response length in tokens (up to and including EOS)."""
    words: torch.Tensor
    """Response length in words."""

    def per_prompt(self, name: str) -> torch.Tensor:
        """Mean over the samples of each prompt: (n_prompts,), the unit for confidence intervals."""
        values = {"kl": self.kl, "tokens": self.tokens, "words": self.words}.get(name)
        return (self.scores[name] if values is None else values).float().mean(1)

    def mean(self, name: str) -> float:
        return self.per_prompt(name).mean().item()

    def summary(self) -> dict[str, float]:
        names = [*self.scores, "words", "tokens"] + (["kl"] if self.kl is not None else [])
        return {n: self.mean(n) for n in names}


@torch.no_grad()
def evaluate(model, tokenizer, prompts: Sequence[str], reward_fns: dict[str, RewardFn], *,
             config: PPOConfig = PPOConfig(), n_samples: int = 1, seed: int = 0, batch_size: int = 64,
             ref_model=None, progress: bool = False) -> Evaluation:
    """Sample ``n_samples`` responses per prompt and score each with every function in ``reward_fns``.

    ``model``: a :class:`PolicyWithValueHead`, a peft model, or a plain causal LM. Sampling uses the config's
    ``max_new_tokens``, ``temperature``, ``top_p`` and ``stop_strings`` (the policy's own distribution, so the
    KL below is the KL of what is sampled). The KL to the reference is measured against ``ref_model`` if given,
    else against the same model with its adapter disabled (policies and peft models), else not at all.
    """
    from tqdm.auto import tqdm

    ref_ctx = None
    if isinstance(model, PolicyWithValueHead):
        model = model.model
    if ref_model is not None:
        ref_ctx = lambda: contextlib.nullcontext(ref_model)  # noqa: E731
    elif hasattr(model, "disable_adapter"):
        @contextlib.contextmanager
        def ref_ctx():
            with model.disable_adapter():
                yield model
    prompts = list(prompts)
    n = len(prompts)
    responses = [[None] * n_samples for _ in range(n)]
    scores = {k: torch.zeros(n, n_samples) for k in reward_fns}
    kl = torch.zeros(n, n_samples) if ref_ctx else None
    tokens, words = torch.zeros(n, n_samples), torch.zeros(n, n_samples)
    device = next(model.parameters()).device
    for j in tqdm(range(n_samples), desc="evaluate", disable=not progress, file=sys.stdout, leave=False):
        for start in range(0, n, batch_size):
            chunk = prompts[start:start + batch_size]
            roll = rollout(model, tokenizer, chunk, config, seed=_mix(seed, j, start))
            rows = slice(start, start + len(chunk))
            for i, text in enumerate(roll.responses):
                responses[start + i][j] = text
                words[start + i, j] = len(text.split())
            tokens[rows, j] = roll.response_mask.sum(-1).float()
            for name, fn in reward_fns.items():
                scores[name][rows, j] = _scores(fn, chunk, roll.responses)
            if ref_ctx is not None:
                ids, att, resp = roll.input_ids.to(device), roll.attention_mask.to(device), roll.response_mask.to(device)
                with _autocast(model):
                    logp = lm.sequence_logprobs(model, ids, att, resp)
                    with ref_ctx() as ref:
                        ref_logp = lm.sequence_logprobs(ref, ids, att, resp)
                kl[rows, j] = (logp - ref_logp).sum(-1).float().cpu()
    return Evaluation(prompts, responses, scores, kl, tokens, words)


def evaluation_callback(every: int, tokenizer, prompts: Sequence[str], reward_fns: dict[str, RewardFn], *,
                        config: PPOConfig = PPOConfig(), n_samples: int = 1, seed: int = 0) -> Callable:
    """A :func:`train_ppo` callback that evaluates the policy every ``every`` steps on fixed ``prompts`` and logs
    ``eval_<name>`` (the mean of each reward function), ``eval_kl`` and ``eval_words`` in that step's history."""

    def callback(step: int, stats: dict, batch: dict) -> None:
        if (step + 1) % every == 0:
            ev = evaluate(batch["policy"], tokenizer, prompts, reward_fns, config=config, n_samples=n_samples,
                          seed=seed)
            stats.update({f"eval_{k}": v for k, v in ev.summary().items()})

    return callback


# ------------------------------------------------------------------------------------------------ statistics


@dataclass(frozen=True)
class Effect:
    """A mean with its confidence interval."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def __str__(self) -> str:
        return f"{self.mean:+.3f} [{self.lo:+.3f}, {self.hi:+.3f}] ({self.level:.0%} CI, n={self.n})"


def t_quantile(p: float, dof: int) -> float:
    """Quantile of Student's t with ``dof`` degrees of freedom (Cornish-Fisher expansion around the normal;
    within 1e-3 of the exact value for ``dof >= 5`` at the usual levels)."""
    z = math.sqrt(2) * torch.erfinv(torch.tensor(2 * p - 1, dtype=torch.float64)).item()
    v = float(dof)
    return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


def mean_ci(x: torch.Tensor | Sequence[float], level: float = 0.95) -> Effect:
    """Mean of ``x`` with a Student-t confidence interval (independent observations, e.g. one per prompt)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    n = x.numel()
    if n < 2:
        raise ValueError("a confidence interval needs at least two observations")
    half = t_quantile(0.5 + level / 2, n - 1) * x.std(unbiased=True).item() / math.sqrt(n)
    m = x.mean().item()
    return Effect(m, m - half, m + half, n, level)


def paired_effect(after: torch.Tensor | Sequence[float], before: torch.Tensor | Sequence[float],
                  level: float = 0.95) -> Effect:
    """Mean of ``after - before`` over paired observations (the same prompts) with its confidence interval."""
    a, b = torch.as_tensor(after, dtype=torch.float64), torch.as_tensor(before, dtype=torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_effect needs the same prompts on both sides; got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    return mean_ci(a - b, level)


def agora_reward_fn(persona: str = "balanced") -> RewardFn:
    """The Agora's ground truth as a reward function: ``agora.true_reward`` per (prompt, response)."""
    from . import agora

    def true_reward(prompts: list[str], responses: list[str]) -> torch.Tensor:
        return torch.tensor([agora.true_reward(p, r, persona) for p, r in zip(prompts, responses)])

    return true_reward


# ---------------------------------------------------------------------------------- TRL's trainers, for contrast


@dataclass(frozen=True)
class TRLConfig:
    """A short run of one of TRL's trainers on the same model, LoRA adapter and prompts as :func:`train_ppo`."""

    trainer: str = "grpo"
    """``"grpo"`` (GRPOTrainer: sampled groups, no value head, online), ``"rloo"`` (RLOOTrainer: leave-one-out
    baseline, online) or ``"dpo"`` (DPOTrainer: offline, from the preference pairs themselves, no reward model)."""
    steps: int = 30
    """Optimiser steps."""
    batch_size: int = 32
    """Completions per step (GRPO/RLOO: prompts x num_generations) or pairs per step (DPO)."""
    num_generations: int = 4
    """GRPO/RLOO: completions per prompt (the group whose mean is the baseline)."""
    lr: float = 3e-3
    beta: float = 0.05
    """KL coefficient (GRPO/RLOO) or DPO's beta (the implicit KL strength)."""
    max_new_tokens: int = 24
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: tuple[str, ...] | None = None
    """As in :class:`PPOConfig`: ``None`` asks :func:`helpers.zoo.lora_target_modules`."""
    seed: int = 0


def _trl_lora(model, config: TRLConfig):
    from peft import LoraConfig

    from . import zoo

    targets = list(config.lora_target_modules or zoo.lora_target_modules(model))
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=targets, fan_in_fan_out=model.config.model_type == "gpt2")


def _TqdmCallback(desc: str, total: int, enabled: bool):
    """A transformers ``TrainerCallback`` that shows a tqdm bar on stdout (the trainer's own bar goes to stderr)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Bar(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.bar = tqdm(total=total, desc=desc, file=sys.stdout, leave=False, disable=not enabled)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return Bar()


def train_trl(model, tokenizer, config: TRLConfig, *, prompts: Sequence[str] = (), reward_fn: RewardFn | None = None,
              pairs: Sequence[dict] = (), out_dir: str | Path, progress: bool = True) -> tuple[nn.Module, list[dict], float]:
    """Train a LoRA adapter on ``model`` with TRL's GRPO, RLOO or DPO trainer; returns (peft model, log, seconds).

    GRPO and RLOO sample from ``prompts`` and score with ``reward_fn(prompts, responses)`` (the same hook as
    :func:`train_ppo`); DPO learns from ``pairs`` (``prompt``/``chosen``/``rejected`` records) directly, the first
    ``steps * batch_size`` of them, each once. The reference policy is, as in our loop, the same model with the
    adapter disabled. The learning rate is constant (no warm-up), as in :func:`train_ppo`.
    """
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # TRL maps the dataset several times, each with a bar on stderr
    try:
        return _train_trl(model, tokenizer, config, prompts, reward_fn, pairs, out_dir, progress)
    finally:
        if bars:
            datasets.enable_progress_bars()


def _train_trl(model, tokenizer, config, prompts, reward_fn, pairs, out_dir, progress):
    import datasets
    import transformers
    import trl

    common = dict(output_dir=str(out_dir), max_steps=config.steps, learning_rate=config.lr, logging_steps=1,
                  report_to="none", save_strategy="no", disable_tqdm=True, seed=config.seed,
                  use_cpu=not torch.cuda.is_available(), lr_scheduler_type="constant", warmup_steps=0,
                  # TRL's configs default to bf16, which would autocast on a CPU too; full precision there.
                  bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
                  dataloader_num_workers=0)
    lora = _trl_lora(model, config)
    if config.trainer in ("grpo", "rloo"):
        if reward_fn is None or not prompts:
            raise ValueError(f"{config.trainer} needs prompts and a reward_fn")

        def reward(prompts, completions, **kwargs):
            return _scores(reward_fn, list(prompts), list(completions)).tolist()

        Config, Trainer = ((trl.GRPOConfig, trl.GRPOTrainer) if config.trainer == "grpo"
                           else (trl.RLOOConfig, trl.RLOOTrainer))
        with _quiet_peft():
            args = Config(**common, per_device_train_batch_size=config.batch_size,
                          num_generations=config.num_generations, max_completion_length=config.max_new_tokens,
                          beta=config.beta, temperature=1.0, top_p=1.0)
            trainer = Trainer(model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
                              train_dataset=datasets.Dataset.from_dict({"prompt": list(prompts)}), peft_config=lora)
    elif config.trainer == "dpo":
        if not pairs:
            raise ValueError("dpo needs preference pairs")
        used = list(pairs)[: config.steps * config.batch_size]  # each pair seen once (DPO overfits repeats fast)
        data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in used])
        with _quiet_peft():
            args = trl.DPOConfig(**common, per_device_train_batch_size=config.batch_size, beta=config.beta,
                                 max_length=getattr(model.config, "n_positions", 1024))
            trainer = trl.DPOTrainer(model=model, args=args, processing_class=tokenizer, train_dataset=data,
                                     peft_config=lora)
    else:
        raise ValueError(f"unknown trainer {config.trainer!r}; choose grpo, rloo or dpo")
    trainer.remove_callback(transformers.PrinterCallback)  # it prints every log dict; a bar is enough
    trainer.add_callback(_TqdmCallback(f"TRL {config.trainer.upper()}", config.steps, progress))
    t0 = time.perf_counter()
    with _quiet_peft():
        trainer.train()
    seconds = time.perf_counter() - t0
    log = [row for row in trainer.state.log_history if "loss" in row]
    peft_model = trainer.model
    peft_model.eval()
    return peft_model, log, seconds


def train_trl_cached(name: str, model_fn: Callable[[], nn.Module], tokenizer, config: TRLConfig, *, key: dict,
                     prompts: Sequence[str] = (), reward_fn: RewardFn | None = None,
                     pairs: Sequence[dict] = (), progress: bool = True) -> tuple[nn.Module, list[dict], float]:
    """:func:`train_trl` built once per (config, prompts, pairs, ``key``) and cached; returns the same triple, the
    seconds being those of the original run."""
    import tempfile

    from peft import PeftModel

    from . import cache

    blob = {"trl": dataclasses.asdict(config), "prompts": cache.config_key(list(prompts)),
            "pairs": cache.config_key(list(pairs)), "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            **key}

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory() as scratch:
            model, log, seconds = train_trl(model_fn(), tokenizer, config, prompts=prompts, reward_fn=reward_fn,
                                            pairs=pairs, out_dir=scratch, progress=progress)
        model.save_pretrained(tmp / "adapter")
        (tmp / "log.json").write_text(json.dumps({"log": log, "seconds": seconds}, indent=1))

    folder = cache.build_once("rlhf", f"trl-{name}", blob, build, version=FORMAT_VERSION)
    with _quiet_peft():
        model = PeftModel.from_pretrained(model_fn(), folder / "adapter")
    model.eval()
    saved = json.loads((folder / "log.json").read_text())
    return model, saved["log"], saved["seconds"]


# ----------------------------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """PPO on the tiny SFT model with the Agora's true reward, single-process or under torchrun:

        python -m helpers.rlhf --steps 10 --out /tmp/run
        torchrun --nproc_per_node 2 -m helpers.rlhf --steps 10 --out /tmp/run2

    Writes ``history.json`` and ``trainable.pt`` (the adapter and value-head tensors) into ``--out``.
    """
    import argparse

    from . import agora, zoo

    parser = argparse.ArgumentParser(prog="python -m helpers.rlhf", description=main.__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mini-batch-size", type=int, default=8)
    parser.add_argument("--generation-batch-size", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    accelerator = make_accelerator()
    model, tokenizer = zoo.load("local", "sft")
    config = PPOConfig(steps=args.steps, batch_size=args.batch_size, mini_batch_size=args.mini_batch_size,
                       generation_batch_size=args.generation_batch_size, seed=args.seed)
    prompts = [p.text for p in agora.prompts(args.prompts, seed=args.seed)]
    result = train_ppo(make_policy(model, config), tokenizer, prompts, agora_reward_fn(), config,
                       accelerator=accelerator, progress=False)
    if accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "history.json").write_text(json.dumps(result.history, indent=1))
        trainable = {k: v.detach().cpu() for k, v in result.policy.named_parameters() if v.requires_grad}
        torch.save(trainable, args.out / "trainable.pt")
        print(f"{accelerator.num_processes} process(es), {accelerator.distributed_type.value}: "
              f"final score {result.history[-1]['score']:.3f}, "
              f"KL {result.history[-1]['kl']:.3f}")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
