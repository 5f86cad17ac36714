"""Supervised fine-tuning with LoRA: the adapter's size, its configuration for a model, the training loop
(the Hugging Face Trainer with callbacks that save versioned adapters) and sizes on disk.

Used by weeks 5 and 7 (:mod:`helpers.socratic`, :mod:`helpers.judges`).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .dialogue import TURN_END

# ================================================================================================= LoRA SFT
#
# LoRA (Hu et al. 2021) freezes a weight W (d_out x d_in) and learns a low-rank update: W + (alpha / r) B A, with
# A (r x d_in) and B (d_out x r), B initialised to zero so training starts from the base model exactly. Per
# adapted matrix that is r * (d_in + d_out) trainable numbers instead of d_in * d_out.


def lora_parameter_count(model, target_modules: Sequence[str], r: int) -> int:
    """Trainable parameters LoRA of rank ``r`` adds to the modules of ``model`` whose name ends with one of
    ``target_modules``: ``sum r * (d_in + d_out)`` over the adapted linear layers (no biases).

    Handles ``nn.Linear`` (weight ``(d_out, d_in)``) and GPT-2's ``Conv1D`` (weight ``(d_in, d_out)``).
    Naive check: peft's ``get_peft_model(model, LoraConfig(r=r, target_modules=...)).get_nb_trainable_parameters()``.
    """
    total = 0
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        d_in, d_out = _linear_shape(module)
        total += r * (d_in + d_out)
    return total


def _linear_shape(module) -> tuple[int, int]:
    """``(d_in, d_out)`` of a linear layer: ``nn.Linear`` or GPT-2's transposed ``Conv1D`` (or either, wrapped
    by peft: the layer it adapts is its ``base_layer``)."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight (d_in, d_out)
        return module.weight.shape[0], module.weight.shape[1]
    raise TypeError(f"{type(module).__name__} is not a linear layer LoRA can adapt")


def lora_config(model, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                target_modules: Sequence[str] | None = None):
    """A peft ``LoraConfig`` for ``model``: its architecture's attention projections unless told otherwise."""
    from peft import LoraConfig

    from . import zoo

    targets = list(target_modules or zoo.lora_target_modules(model))
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM",
                      fan_in_fan_out=model.config.model_type == "gpt2")


@dataclass(frozen=True)
class SFTConfig:
    """A LoRA fine-tuning run (its hash names the cached adapter)."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator: the update is ``(alpha / r) * B @ A``."""
    target_modules: tuple[str, ...] | None = None
    """Adapted modules; ``None``: the architecture's attention projections (:func:`helpers.zoo.lora_target_modules`)."""
    steps: int = 120
    """Optimiser steps."""
    batch_size: int = 32
    lr: float = 3e-3
    """AdamW learning rate (LoRA takes larger rates than full fine-tuning)."""
    warmup_steps: int = 10
    max_len: int = 128
    """Longest example in tokens (context + reply + turn end); longer ones lose their context's start."""
    save_every: int = 40
    """Save a versioned adapter (``v001``, ``v002``, ...) every this many steps, and at the end."""
    lora: bool = True
    """False: fine-tune every weight instead (the versions are then whole models)."""
    seed: int = 0


def sft_example(tokenizer, record: dict, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one (context, reply) record: the loss is on the reply and how the turn ends.

    The reply is followed by :data:`TURN_END` (``"\\nUser:"``, the next speaker's label) when the dialogue goes
    on (``record["continues"]``), by the end-of-text token when it does not: the model learns where its turn
    ends. The context is masked (label -100); when too long, its *start* is cut, never the reply.
    """
    prompt = tokenizer(record["prompt"])["input_ids"]
    end = TURN_END if record.get("continues") else tokenizer.eos_token
    reply = tokenizer(record["response"] + end, add_special_tokens=False)["input_ids"]
    reply = reply[:max_len - 4]
    prompt = prompt[-(max_len - len(reply)):]
    return prompt + reply, [-100] * len(prompt) + reply


class _PairDataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, records: Sequence[dict], max_len: int):
        self.items = [sft_example(tokenizer, r, max_len) for r in records]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, labels = self.items[i]
        return {"input_ids": ids, "labels": labels}


def _collate(pad_id: int):
    def collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad_id)
        labels = torch.full((len(batch), width), -100)
        att = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):  # right padding for training
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], att[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": att}

    return collate


def _trainer_callbacks():
    """Callback classes built on ``transformers.TrainerCallback`` (imported lazily: transformers is slow to load)."""
    from transformers import TrainerCallback

    class VersionedAdapters(TrainerCallback):
        """Save the adapter every ``every`` steps into ``root/v001``, ``root/v002``, ... and at the end of training,
        with ``root/versions.json`` listing each version's step, training loss and wall-clock seconds."""

        def __init__(self, root: str | Path, every: int):
            self.root, self.every, self.versions, self.t0 = Path(root), every, [], time.perf_counter()

        def _save(self, model, state) -> None:
            if self.versions and self.versions[-1]["step"] == state.global_step:
                return
            name = f"v{len(self.versions) + 1:03d}"
            model.save_pretrained(self.root / name)
            losses = [h["loss"] for h in state.log_history if "loss" in h]
            self.versions.append({"version": name, "step": state.global_step,
                                  "loss": losses[-1] if losses else None,
                                  "seconds": round(time.perf_counter() - self.t0, 2)})
            (self.root / "versions.json").write_text(json.dumps(self.versions, indent=1))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % self.every == 0:
                self._save(model, state)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self._save(model, state)

    class Progress(TrainerCallback):
        """A tqdm bar on stdout (the Trainer's own writes to stderr), showing the loss."""

        def on_train_begin(self, args, state, control, **kwargs):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc="LoRA SFT", file=sys.stdout, leave=False)

        def on_step_end(self, args, state, control, **kwargs):
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.bar.set_postfix(loss=f"{logs['loss']:.3f}")

        def on_train_end(self, args, state, control, **kwargs):
            self.bar.close()

    return VersionedAdapters, Progress


def train_lora_sft(model, tokenizer, records: Sequence[dict], config: SFTConfig, out_dir: str | Path, *,
                   progress: bool = True) -> tuple[object, list[dict]]:
    """LoRA fine-tuning of ``model`` on (context, reply) ``records`` with ``transformers.Trainer``.

    A callback saves versioned adapters into ``out_dir/v001, v002, ...`` (every ``config.save_every`` steps and
    at the end) and ``out_dir/versions.json``. Returns the peft model (adapter active, eval mode) and the
    training log (one dict per logged step: ``step``, ``loss``, ``lr``). With ``config.lora=False`` every weight
    trains and ``model`` itself is returned.
    """
    import logging

    from peft import get_peft_model
    from transformers import PrinterCallback, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    torch.manual_seed(config.seed)
    if config.lora:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # a deprecation notice peft triggers in transformers
            peft_model = get_peft_model(model, lora_config(model, config.r, config.alpha, 0.0, config.target_modules))
    else:
        peft_model = model
    data = _PairDataset(tokenizer, records, config.max_len)
    args = TrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=config.steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.lr, warmup_steps=config.warmup_steps, lr_scheduler_type="cosine", weight_decay=0.0,
        logging_steps=max(1, config.steps // 20), save_strategy="no", report_to=[], disable_tqdm=True,
        seed=config.seed, data_seed=config.seed, use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        remove_unused_columns=False, bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )
    VersionedAdapters, Progress = _trainer_callbacks()
    callbacks = [VersionedAdapters(out_dir, config.save_every)] + ([Progress()] if progress else [])
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecation notices from inside the Trainer
            trainer = Trainer(model=peft_model, args=args, train_dataset=data,
                              data_collator=_collate(tokenizer.pad_token_id), callbacks=callbacks)
            trainer.remove_callback(PrinterCallback)  # it prints every log dict; the bar shows the loss instead
            trainer.train()
    finally:
        hf_logging.set_verbosity(verbosity)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)
    log = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate")}
           for h in trainer.state.log_history if "loss" in h]
    peft_model.eval()
    return peft_model, log


def folder_size_mb(path: str | Path) -> float:
    """Size on disk of a file, or of every file under a folder, in MB (10^6 bytes)."""
    path = Path(path)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def weights_size_mb(path: str | Path) -> float:
    """Size of the weight files (``*.safetensors``, ``*.bin``) under a saved model or adapter folder, in MB."""
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.suffix in (".safetensors", ".bin")) / 1e6
