"""Benchmarks of the course's own loops against TRL's, and the GPU memory table of the presets.

``make bench`` (``python -m helpers.bench``) measures, on the ``local`` preset, each figure as a ratio of two
things measured in the same run, the median of several repetitions after a warm-up:

1. a PPO step of :func:`helpers.rlhf.train_ppo` against a step of TRL's ``GRPOTrainer`` and ``RLOOTrainer`` on
   the same tiny model, completions per step, generations per prompt and generation length;
2. reward-model training throughput (pairs/s): :func:`helpers.rewards.train_reward_model` against TRL's
   ``RewardTrainer``;
3. generation tokens/s, batched, with and without the KV cache;
4. peak memory of LoRA-PPO (one copy of the base weights serves the policy and, adapter off, the reference)
   against PPO with a separate reference copy, in fresh subprocesses (see :func:`peak_memory`);
5. the time to build the tiny models from nothing (one run: it takes minutes);
6. seconds per notebook (``--notebooks``; slow).

It prints a markdown table and writes it to ``build/bench.md`` (and the raw numbers to ``build/bench.json``).

``python -m helpers.bench memory-table`` prints the per-week GPU memory table of the presets
(:func:`memory_table`), by formula from :func:`helpers.runtime.memory_estimate`; docs/performance.md holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .runtime import PRESETS, Preset, memory_estimate

# ----------------------------------------------------------------------------------------- GPU memory table

CARD_GIB = {"t4": 14.7, "a100": 39.4, "a100-80": 79.1}
"""Memory of each preset's card as ``torch.cuda.get_device_properties(0).total_memory`` reports it (GiB):
a 16 GB T4, a 40 GB A100 and an 80 GB A100/H100."""

HEADROOM = 0.15
"""Fraction of the card kept free of the estimate: CUDA context, allocator fragmentation, temporary buffers."""


@dataclass(frozen=True)
class Workload:
    """What a week's notebook holds in GPU memory at its peak."""

    week: int
    what: str
    train: bool
    """Trains a LoRA adapter (gradients, Adam state, activations)."""
    generate: bool
    """Samples a batch (KV cache)."""
    extra_models: int = 0
    """Other frozen models of the preset's size in memory (a reward model, a judge, a target model)."""


WORKLOADS = (
    Workload(0, "sampling and per-token log-probs (no training)", train=False, generate=True),
    Workload(1, "policy gradients and TRPO on the policy (reference = adapter off)", train=True, generate=True),
    Workload(2, "reward model: LoRA body + scalar head on pairs", train=True, generate=False),
    Workload(3, "RLHF: LoRA-PPO policy + reward model", train=True, generate=True, extra_models=1),
    Workload(4, "RL-CAI: LoRA-PPO policy + preference model on AI labels", train=True, generate=True, extra_models=1),
    Workload(5, "Socratic LoRA-PPO: policy + judge", train=True, generate=True, extra_models=1),
    Workload(6, "red-teaming: LoRA-PPO red-teamer + target + safety classifier", train=True, generate=True,
             extra_models=2),
    Workload(7, "simulated society: agents sample, LoRA trained on ratings", train=True, generate=True),
)
"""One per week. Extra models are counted at the preset model's size (the course uses the same base for them)."""

COMPONENTS = ("weights", "gradients", "optimizer", "activations", "kv_cache", "logits")


def week_estimate(preset: Preset | str, workload: Workload) -> dict[str, float]:
    """GiB per component for one week on one preset: :func:`helpers.runtime.memory_estimate` (LoRA, one copy of
    the weights) with the parts the week does not use set to 0, plus the extra frozen models' weights."""
    preset = PRESETS[preset] if isinstance(preset, str) else preset
    parts = memory_estimate(preset, lora=True, ref_copy=False)
    out = {k: parts[k] for k in COMPONENTS}
    out["weights"] *= 1 + workload.extra_models
    if not workload.train:
        out["gradients"] = out["optimizer"] = out["activations"] = 0.0
    if not workload.generate:
        out["kv_cache"] = 0.0
    out["total"] = sum(out[k] for k in COMPONENTS)
    return out


def largest_estimate(preset: Preset | str) -> tuple[int, float]:
    """The week with the largest estimate on ``preset`` and that estimate (GiB)."""
    totals = {w.week: week_estimate(preset, w)["total"] for w in WORKLOADS}
    week = max(totals, key=totals.get)
    return week, totals[week]


def fits_card(preset: Preset | str, card_gib: float, headroom: float = HEADROOM) -> bool:
    """True when every week's estimate on ``preset`` leaves ``headroom`` of a ``card_gib`` card free."""
    return largest_estimate(preset)[1] <= (1 - headroom) * card_gib


def memory_table(presets: tuple[str, ...] = ("t4", "a100", "a100-80")) -> str:
    """Markdown: per preset, one row per week with GiB per component, the total and the share of the card."""
    lines = []
    for name in presets:
        p = PRESETS[name]
        card = CARD_GIB[name]
        lines += [f"**{name}** ({p.model_id}, {p.dtype}; batch {p.batch_size}, mini-batch {p.mini_batch_size}, "
                  f"sequence {p.seq_len}, LoRA r={p.lora_r}; card {card:.1f} GiB, budget "
                  f"{card * (1 - HEADROOM):.1f} GiB with {HEADROOM:.0%} headroom)", "",
                  "| week | workload | weights | gradients | optimizer | activations | KV cache | logits | total GiB "
                  "| of card |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for w in WORKLOADS:
            e = week_estimate(name, w)
            cells = " | ".join(f"{e[k]:.2f}" for k in COMPONENTS)
            lines.append(f"| {w.week} | {w.what} | {cells} | **{e['total']:.2f}** | {e['total'] / card:.0%} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------------ helpers


def median(xs) -> float:
    return float(statistics.median(xs))


def _steps_after_warmup(stamps: list[float], warmup: int) -> list[float]:
    """Durations between consecutive time stamps (stamp 0 = start), the first ``warmup`` dropped."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return steps[warmup:]


def _quiet():
    warnings.filterwarnings("ignore")
    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()


def _stamp_callback(stamps: list[float]):
    from transformers import TrainerCallback

    class Stamp(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    return Stamp()


# ------------------------------------------------------------------------------------- 1. PPO vs GRPO/RLOO


@dataclass(frozen=True)
class StepSetup:
    completions: int = 16
    """Completions per optimiser step (the local preset's batch size)."""
    generations: int = 4
    """Completions per prompt in GRPO/RLOO's groups; the PPO batch holds each prompt this many times too."""
    max_new_tokens: int = 24
    warmup: int = 2
    reps: int = 8


def ppo_step_seconds(setup: StepSetup, *, ppo_epochs: int = 1, mini_batches: int = 1) -> list[float]:
    """Seconds per step of the course's PPO (after warm-up): ``setup.completions`` rollouts per step."""
    from . import agora, rlhf, zoo

    model, tok = zoo.load("local", "sft")
    distinct = [p.text for p in agora.prompts(setup.completions // setup.generations * (setup.warmup + setup.reps),
                                              seed=1)]
    prompts = [p for p in distinct for _ in range(setup.generations)]
    config = rlhf.PPOConfig(steps=setup.warmup + setup.reps, batch_size=setup.completions,
                            mini_batch_size=setup.completions // mini_batches, ppo_epochs=ppo_epochs,
                            max_new_tokens=setup.max_new_tokens, seed=0)
    result = rlhf.train_ppo(rlhf.make_policy(model, config), tok, prompts, rlhf.agora_reward_fn(), config,
                            progress=False)
    return _steps_after_warmup([0.0] + result.curve("seconds"), setup.warmup)


def trl_step_seconds(trainer_name: str, setup: StepSetup) -> list[float]:
    """Seconds per step of TRL's GRPOTrainer or RLOOTrainer on the same model, LoRA adapter and reward, in fp32
    (TRL's configs default to bf16, which autocasts on CPU too; the course's loop runs in fp32)."""
    import datasets
    import torch
    import transformers
    import trl

    from . import agora, rlhf, zoo

    _quiet()
    model, tok = zoo.load("local", "sft")
    reward_fn = rlhf.agora_reward_fn()

    def reward(prompts, completions, **kwargs):
        return reward_fn(list(prompts), list(completions)).tolist()

    steps = setup.warmup + setup.reps
    prompts = [p.text for p in agora.prompts(setup.completions // setup.generations * steps, seed=1)]
    Config, Trainer = (trl.GRPOConfig, trl.GRPOTrainer) if trainer_name == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)
    tcfg = rlhf.TRLConfig(trainer=trainer_name, max_new_tokens=setup.max_new_tokens)
    with tempfile.TemporaryDirectory() as out, rlhf._quiet_peft():
        args = Config(output_dir=out, max_steps=steps, learning_rate=3e-3, logging_steps=1, report_to="none",
                      save_strategy="no", disable_tqdm=True, seed=0, use_cpu=not torch.cuda.is_available(),
                      bf16=False, lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0,
                      per_device_train_batch_size=setup.completions, num_generations=setup.generations,
                      max_completion_length=setup.max_new_tokens, beta=tcfg.beta, temperature=1.0, top_p=1.0)
        trainer = Trainer(model=model, reward_funcs=reward, args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
                          peft_config=rlhf._trl_lora(model, tcfg))
        trainer.remove_callback(transformers.PrinterCallback)
        stamps: list[float] = []
        trainer.add_callback(_stamp_callback(stamps))
        trainer.train()
    return _steps_after_warmup(stamps, setup.warmup)


def ppo_phase_seconds(setup: StepSetup, reps: int = 5) -> dict[str, float]:
    """Median seconds of each phase of a PPO step, timed with the loop's own functions: generation, scoring,
    the no-grad forward passes (policy + values, reference) and the update (forward, backward, AdamW)."""
    import torch

    from . import agora, lm, ppo, rlhf, zoo

    model, tok = zoo.load("local", "sft")
    config = rlhf.PPOConfig(batch_size=setup.completions, mini_batch_size=setup.completions, ppo_epochs=1,
                            max_new_tokens=setup.max_new_tokens)
    policy = rlhf.make_policy(model, config)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-3)
    reward = rlhf.agora_reward_fn()
    prompts = [p.text for p in agora.prompts(setup.completions, seed=1)]
    times: dict[str, list[float]] = {"generate": [], "score": [], "forward (no grad)": [], "update": []}
    for rep in range(reps + 1):
        t = [time.perf_counter()]
        roll = rlhf.rollout(policy.model, tok, prompts, config, seed=rep)
        t.append(time.perf_counter())
        scores = reward(roll.prompts, roll.responses)
        t.append(time.perf_counter())
        ids, att, mask = roll.input_ids, roll.attention_mask, roll.response_mask[:, 1:].bool()
        with torch.no_grad():
            logits, values = policy(ids, att)
            logp = lm.token_logprobs(logits[:, :-1], ids[:, 1:], mask)
            with policy.reference() as ref:
                ref_logp = lm.sequence_logprobs(ref, ids, att, roll.response_mask)
        t.append(time.perf_counter())
        rewards, _ = ppo.kl_penalised_rewards(scores, logp, ref_logp, mask, 0.1)
        adv, ret = ppo.gae(rewards, values[:, :-1] * mask, mask, 1.0, 0.95)
        mb_logits, mb_values = policy(ids, att)
        new_logp = lm.token_logprobs(mb_logits[:, :-1], ids[:, 1:], mask)
        loss = ppo.ppo_policy_loss(new_logp, logp, ppo.whiten(adv, mask), mask, 0.2)[0] + 0.1 * ppo.ppo_value_loss(
            mb_values[:, :-1], values[:, :-1] * mask, ret, mask, 0.2)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in policy.parameters() if p.requires_grad], 1.0)
        opt.step()
        t.append(time.perf_counter())
        if rep:  # the first pass is the warm-up
            for k, a, b in zip(times, t, t[1:]):
                times[k].append(b - a)
    return {k: median(v) for k, v in times.items()}


# ---------------------------------------------------------------------------------- 2. reward-model training


def reward_step_seconds(which: str, *, steps: int, warmup: int, batch_size: int = 32) -> list[float]:
    """Seconds per step of reward-model training, ``"course"`` (:func:`helpers.rewards.train_reward_model` with
    the course's config) or ``"trl"`` (TRL's RewardTrainer with the same pairs, batch size and optimiser
    settings, as :func:`helpers.rewards.train_with_trl` sets it up)."""
    import torch

    from . import rewards, zoo

    config = rewards.RewardModelConfig(steps=warmup + steps, batch_size=batch_size)
    train, _ = rewards.reward_data(config)
    if which == "course":
        model = rewards.new_reward_model("local", config)
        stamps: list[float] = []
        forward = model.forward

        def stamped(*args, **kwargs):  # one forward per step: a time stamp at each step's start
            stamps.append(time.perf_counter())
            return forward(*args, **kwargs)

        model.forward = stamped
        rewards.train_reward_model(model, train, config, progress=False)
        stamps.append(time.perf_counter())
        return _steps_after_warmup(stamps, warmup)

    import transformers
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    _quiet()
    _, tok = zoo.load("local", config.backbone)
    torch.manual_seed(config.seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(zoo.model_dir() / config.backbone), num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=batch_size,
                            learning_rate=config.lr, lr_scheduler_type="cosine", warmup_steps=config.warmup_steps,
                            weight_decay=config.weight_decay, adam_beta2=0.95, max_grad_norm=1.0,
                            max_length=config.max_len, seed=config.seed, logging_steps=10, save_strategy="no",
                            report_to="none", disable_tqdm=True, use_cpu=True, bf16=False,
                            dataloader_num_workers=0)
        data = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in train])
        trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tok)
        trainer.remove_callback(transformers.PrinterCallback)
        stamps = []
        trainer.add_callback(_stamp_callback(stamps))
        trainer.train()
    return _steps_after_warmup(stamps, warmup)


# ------------------------------------------------------------------------------------------- 3. generation


def generation_tokens_per_second(*, use_cache: bool, batch: int = 16, new_tokens: int = 24, reps: int = 5,
                                 model=None, tok=None) -> list[float]:
    """Tokens/s of batched sampling (``batch`` prompts, exactly ``new_tokens`` new tokens each), one figure per
    repetition after one warm-up call."""
    import torch

    from . import agora, zoo

    if model is None:
        model, tok = zoo.load("local", "sft")
    prompts = [p.text for p in agora.prompts(batch, seed=2)]
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = []
    for rep in range(reps + 1):
        torch.manual_seed(rep)
        t0 = time.perf_counter()
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                                 top_k=0, use_cache=use_cache, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        seconds = time.perf_counter() - t0
        if rep:
            out.append((ids.shape[1] - enc["input_ids"].shape[1]) * batch / seconds)
    return out


# ------------------------------------------------------------------------------------------ 4. peak memory


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_child(variant: str, model_kind: str, steps: int, batch: int = 8, checkpointing: bool = False) -> dict:
    """Runs in a fresh process: peak resident memory (MiB) added by building the model and training PPO.

    Everything is imported and the tokenizer loaded first; then the kernel's high-water mark of resident memory
    is reset (``echo 5 > /proc/self/clear_refs``) and the baseline read; the figure is ``VmHWM - baseline``
    after the model is built and ``steps`` PPO steps ran: weights, copies, gradients, optimizer state,
    activations, KV cache and allocator overhead alike.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from . import agora, rlhf, zoo

    torch.set_num_threads(1)
    _, tok = zoo.load("local", "sft")
    prompts = [p.text for p in agora.prompts(32, seed=4)]
    reward = rlhf.agora_reward_fn()
    config = rlhf.PPOConfig(steps=steps, batch_size=batch, mini_batch_size=batch, ppo_epochs=1, max_new_tokens=24)
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss_kib("VmRSS")
    if model_kind == "tiny":
        model, _ = zoo.load("local", "sft")
    elif model_kind == "smollm":  # the t4 preset's architecture (SmolLM2-360M: Llama, 32 layers, 960 wide, GQA)
        from transformers import LlamaConfig, LlamaForCausalLM

        a = PRESETS["t4"].arch
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=2560, num_hidden_layers=a.n_layers,
            num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, max_position_embeddings=128,
            tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id)).eval()
    else:  # GPT-2 small's shape (12 layers, 768 wide) on the course's tokenizer, randomly initialised
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=768, n_layer=12, n_head=12,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                           pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0)).eval()
    n_params = sum(p.numel() for p in model.parameters())
    hidden = model.config.hidden_size
    if variant == "lora":  # the course: reference = the same weights with the adapter off
        policy = rlhf.make_policy(model, config)
    elif variant == "lora+copy":  # LoRA policy, but a separate frozen copy as the reference
        ref = copy.deepcopy(model).requires_grad_(False)
        policy = rlhf.make_policy(model, config)
        policy.reference = lambda: contextlib.nullcontext(ref)
    elif variant == "full+copy":  # the papers: every weight trains, a frozen copy is the reference
        ref = copy.deepcopy(model).requires_grad_(False)
        policy = rlhf.PolicyWithValueHead(model, hidden)
        policy.reference = lambda: contextlib.nullcontext(ref)
    else:
        raise ValueError(variant)
    if checkpointing:
        rlhf.enable_gradient_checkpointing(policy)
    built_rss, built_peak = _rss_kib("VmRSS"), _rss_kib("VmHWM")
    rlhf.train_ppo(policy, tok, prompts, reward, config, progress=False)
    peak = _rss_kib("VmHWM")
    return {"variant": variant, "model": model_kind, "batch": batch, "checkpointing": checkpointing, "n_params": n_params,
            "peak_mib": (peak - base) / 1024,
            "built_mib": (built_rss - base) / 1024, "build_peak_mib": (built_peak - base) / 1024}


LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
"""glibc's malloc serves blocks over this size by ``mmap`` and returns them to the kernel when freed. By default the
threshold rises (up to 32 MiB) each time such a block is freed, after which tensors come from the heap and their
memory stays resident once freed; the resident peak then counts freed activations too. With it fixed, the peak
counts the tensors alive at once, which is what ``torch.cuda.max_memory_allocated`` reports on a GPU."""


def peak_memory(variant: str, model_kind: str, *, steps: int = 2, batch: int = 8, checkpointing: bool = False,
                live: bool = True) -> dict:
    """Peak MiB that PPO adds (see :func:`_memory_child`), measured in a fresh Python process; ``live`` fixes
    malloc's mmap threshold (:data:`LIVE_MALLOC`), otherwise glibc's defaults apply."""
    code = (f"import json; from helpers import bench; print('RESULT', json.dumps("
            f"bench._memory_child({variant!r}, {model_kind!r}, {steps}, {batch}, {checkpointing!r})))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for k in LIVE_MALLOC:
        env.pop(k, None)
    if live:
        env.update(LIVE_MALLOC)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if out.returncode:
        raise RuntimeError(f"memory run {variant}/{model_kind} failed:\n{out.stderr[-2000:]}")
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# ------------------------------------------------------------------------------------ 5. tiny-model build


def build_seconds() -> float:
    """Seconds to build the tiny tokenizer and models from nothing (a fresh COURSE_CACHE), in a subprocess."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "COURSE_CACHE": cache, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "helpers.zoo", "build"], env=env, check=True, capture_output=True,
                       timeout=1800)
        return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ 6. notebooks


def notebook_seconds(folder: str = "course") -> list[tuple[str, float, str | None]]:
    """Seconds per notebook of ``folder`` on the local preset (papermill, as ``course-run`` runs them)."""
    from . import notebooks

    root = notebooks.find_root()
    with tempfile.TemporaryDirectory() as out:
        timings = notebooks.time_notebooks(notebooks.all_notebooks(root, (folder,)), Path(out), preset="local",
                                           html=False, file=sys.stderr)
    return [(t.notebook, t.seconds, t.error) for t in timings]


def notebook_seconds_from_log(path: Path) -> list[tuple[str, float, str | None]]:
    """Seconds per notebook from a saved ``make test`` output (``make test 2>&1 | tee build/test.log``): the table
    that tests/conftest.py prints at the end of the run."""
    import re

    row = re.compile(r"^(\S+\.ipynb)\s+([0-9.]+)\s+[0-9]+\s+(OK|OVER|FAILED)\s*$")
    out = []
    for line in Path(path).read_text().splitlines():
        m = row.match(line.strip())
        if m:
            out.append((m.group(1), float(m.group(2)), "failed" if m.group(3) == "FAILED" else None))
    if not out:
        raise ValueError(f"{path} holds no 'seconds per notebook' table (is it the output of make test?)")
    return out


# ------------------------------------------------------------------------------------------------ the run


def run(args) -> tuple[str, dict]:
    import torch

    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)  # 1 thread for every side: on a shared 2-core machine more only adds contention
    hf_logging.disable_progress_bar()
    raw: dict = {"load_before": os.getloadavg(), "cpus": os.cpu_count(), "torch": torch.__version__}
    rows = []  # (figure, measured, ratio, target, verdict)

    def note(*msg):
        print(*msg, file=sys.stderr, flush=True)

    def want(section: str) -> bool:
        return not args.only or section in args.only

    # 1. PPO vs GRPO / RLOO
    if want("steps"):
        setup = StepSetup(reps=args.reps)
        note("1. PPO vs GRPO vs RLOO steps ...")
        ppo = ppo_step_seconds(setup)
        ppo_default = ppo_step_seconds(setup, ppo_epochs=2, mini_batches=2)
        grpo = trl_step_seconds("grpo", setup)
        rloo = trl_step_seconds("rloo", setup)
        raw["step_seconds"] = {"ppo": ppo, "ppo_2x2": ppo_default, "grpo": grpo, "rloo": rloo}
        m = {k: median(v) for k, v in raw["step_seconds"].items()}
        shape = (f"{setup.completions} completions ({setup.completions // setup.generations} prompts x "
                 f"{setup.generations}), {setup.max_new_tokens} new tokens")
        r = m["ppo"] / m["grpo"]
        rows.append(("PPO step / TRL GRPO step", f"{m['ppo']:.3f} s / {m['grpo']:.3f} s ({shape}; 1 epoch, 1 mini-batch)",
                     r, "<= 1.0", "ok" if r <= 1.0 else "SLOWER"))
        rows.append(("PPO step / TRL RLOO step", f"{m['ppo']:.3f} s / {m['rloo']:.3f} s", m["ppo"] / m["rloo"], "-", ""))
        rows.append(("PPO step, 2 epochs x 2 mini-batches / GRPO step", f"{m['ppo_2x2']:.3f} s / {m['grpo']:.3f} s",
                     m["ppo_2x2"] / m["grpo"], "-", "four updates per rollout instead of one"))
        if r > 1.0 or args.profile:
            note("   profiling the PPO step ...")
            raw["ppo_phases"] = ppo_phase_seconds(setup)

    # 2. reward model
    if want("reward"):
        note("2. reward-model training ...")
        course = reward_step_seconds("course", steps=args.reps * 3, warmup=3)
        trl_rm = reward_step_seconds("trl", steps=args.reps * 3, warmup=3)
        raw["reward_step_seconds"] = {"course": course, "trl": trl_rm}
        pc, pt = 32 / median(course), 32 / median(trl_rm)
        rows.append(("reward model pairs/s: course loop / TRL RewardTrainer", f"{pc:.0f} / {pt:.0f} pairs/s (batch 32)",
                     pc / pt, "-", ""))

    # 3. generation
    if want("generation"):
        note("3. generation with and without the KV cache ...")
        from . import zoo

        model, tok = zoo.load("local", "sft")
        for n in (24, 96):
            with_cache = generation_tokens_per_second(use_cache=True, new_tokens=n, reps=args.reps, model=model, tok=tok)
            without = generation_tokens_per_second(use_cache=False, new_tokens=n, reps=args.reps, model=model, tok=tok)
            raw[f"generation_{n}"] = {"cache": with_cache, "no_cache": without}
            a, b = median(with_cache), median(without)
            rows.append((f"generation tokens/s, KV cache / none ({n} new tokens, batch 16)", f"{a:.0f} / {b:.0f} tokens/s",
                         a / b, "> 1", "ok" if a > b else "NO GAIN"))

    # 4. memory
    # (model, batch, gradient checkpointing, live malloc, variants). The target applies to the t4 preset's
    # architecture with checkpointing: a model of the size the GPU presets train, set up as they would be.
    all3 = ("lora", "lora+copy", "full+copy")
    plan = [("tiny", 8, False, True, all3),
            ("gpt2", 8, False, True, all3),
            ("gpt2", 8, False, False, ("lora", "lora+copy")),
            ("gpt2", 8, True, True, ("lora", "lora+copy")),
            ("smollm", 8, False, True, ("lora", "lora+copy")),
            ("smollm", 8, True, True, all3)]
    names = {"tiny": "tiny model", "gpt2": "GPT-2-small shape, random", "smollm": "t4 preset's shape (SmolLM2-360M, Llama), random"}
    if want("memory"):
        note("4. peak memory of LoRA-PPO vs a separate reference copy (subprocesses) ...")
        mem, sizes = {}, {}
        for kind, batch, ckpt, live, variants in plan:
            for variant in variants:
                runs = [peak_memory(variant, kind, batch=batch, checkpointing=ckpt, live=live)
                        for _ in range(args.mem_reps)]
                mem[(kind, batch, ckpt, live, variant)] = median([x["peak_mib"] for x in runs])
                sizes[kind] = runs[0]["n_params"]
                raw.setdefault("memory", []).extend({**x, "live_malloc": live} for x in runs)
        for kind, batch, ckpt, live, variants in plan:
            label = (f"{names[kind]}, {sizes[kind] / 1e6:.0f}M params, batch {batch}"
                     f"{', gradient checkpointing' if ckpt else ''}{'' if live else ', default malloc'}")
            target = kind == "smollm" and ckpt
            m = {v: mem[(kind, batch, ckpt, live, v)] for v in variants}
            for other, what in (("lora+copy", "LoRA-PPO + reference copy"), ("full+copy", "full-weight PPO + reference copy")):
                if other in m:
                    r = m["lora"] / m[other]
                    rows.append((f"peak memory LoRA-PPO / {what} ({label})", f"{m['lora']:.0f} / {m[other]:.0f} MiB", r,
                                 "<= 0.6" if target else "-", ("ok" if r <= 0.6 else "ABOVE") if target else ""))
    for name in ("t4", "a100", "a100-80"):  # the same ratios by formula, at the GPU presets' sizes
        for ckpt in (False, True):
            est = lambda **kw: memory_estimate(PRESETS[name], checkpointing=ckpt, **kw)["total"]
            a, b, c = est(), est(ref_copy=True), est(lora=False, ref_copy=True)
            how = f"preset {name}{', gradient checkpointing' if ckpt else ''}"
            rows.append((f"formula (memory_estimate): LoRA-PPO / + reference copy, {how}", f"{a:.1f} / {b:.1f} GiB",
                         a / b, "<= 0.6" if ckpt else "-", ("ok" if a / b <= 0.6 else "ABOVE") if ckpt else ""))
            rows.append((f"formula (memory_estimate): LoRA-PPO / full-weight PPO + reference copy, {how}",
                         f"{a:.1f} / {c:.1f} GiB", a / c, "<= 0.6" if ckpt else "-",
                         ("ok" if a / c <= 0.6 else "ABOVE") if ckpt else ""))

    # 5. build
    if not args.skip_build and want("build"):
        note("5. building the tiny models from nothing ...")
        s = build_seconds()
        raw["build_seconds"] = s
        rows.append(("tiny-model build / 240 s first-run budget", f"{s:.0f} s (one run)", s / 240, "<= 1", "ok" if s <= 240 else "OVER"))

    # 6. notebooks
    if args.notebooks or args.notebook_log:
        note("6. notebooks ...")
        raw["notebooks"] = notebook_seconds_from_log(args.notebook_log) if args.notebook_log else notebook_seconds()
        for name, s, err in raw["notebooks"]:
            rows.append((f"notebook {name} / 120 s budget", f"{s:.0f} s" + (" FAILED" if err else ""), s / 120, "<= 1",
                         "FAILED" if err else ("ok" if s <= 120 else "OVER")))

    raw["load_after"] = os.getloadavg()
    lines = ["| figure | measured | ratio | target | |", "|---|---|---:|---|---|"]
    lines += [f"| {f} | {v} | {r:.2f} | {t} | {verdict} |" for f, v, r, t, verdict in rows]
    head = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} CPU cores, torch "
            f"{torch.__version__}, 1 torch thread; load average before {raw['load_before'][0]:.1f}, after "
            f"{raw['load_after'][0]:.1f}. Times: median of {args.reps} repetitions after a warm-up "
            f"(reward model: {args.reps * 3} steps after 3); memory: median of {args.mem_reps} fresh processes.")
    text = head + "\n\n" + "\n".join(lines) + "\n"
    if "ppo_phases" in raw:
        total = sum(raw["ppo_phases"].values())
        text += "\nPPO step by phase (median s, one epoch, one mini-batch): " + ", ".join(
            f"{k} {v:.3f} ({v / total:.0%})" for k, v in raw["ppo_phases"].items()) + "\n"
    return text, raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers.bench", description=__doc__.splitlines()[0])
    parser.add_argument("what", nargs="?", default="all", choices=["all", "memory-table"],
                        help="all: measure and write the table; memory-table: print the GPU memory table")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions per figure (after warm-up)")
    parser.add_argument("--mem-reps", type=int, default=2, help="fresh processes per memory figure")
    parser.add_argument("--notebooks", action="store_true", help="also time every course/ notebook (slow)")
    parser.add_argument("--notebook-log", type=Path, default=None,
                        help="read seconds per notebook from a saved `make test` output instead of running them")
    parser.add_argument("--skip-build", action="store_true", help="skip timing a from-scratch tiny-model build")
    parser.add_argument("--profile", action="store_true", help="time the PPO step's phases even if it is fast")
    parser.add_argument("--only", nargs="+", choices=["steps", "reward", "generation", "memory", "build"], default=[],
                        help="measure only these sections (default: all)")
    parser.add_argument("--out", type=Path, default=Path("build/bench.md"))
    args = parser.parse_args(argv)
    if args.what == "memory-table":
        print(memory_table(), end="")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    text, raw = run(args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"written to {args.out} (raw numbers in {args.out.with_suffix('.json')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
