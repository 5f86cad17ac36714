"""DPO with TRL's DPOTrainer on the tiny Agora SFT model: a recipe that runs on one process or many.

    python scripts/trl_dpo.py --steps 4 --out /tmp/dpo
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 scripts/trl_dpo.py --out /tmp/dpo2
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes 2 scripts/trl_dpo.py ...

``--batch-size`` is the global batch (pairs per optimiser step, summed over processes); each process takes
``batch_size / processes`` of it, so the same pairs make each step whatever the number of processes. The
adapter is a LoRA on the attention projections and the reference policy is the model with the adapter off, as
in ``helpers.rlhf.train_trl``. Writes ``log.json`` and ``trainable.pt`` (the adapter's tensors) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def main(argv: list[str] | None = None) -> int:
    import datasets
    import torch
    import transformers
    import trl

    from helpers import agora, rlhf, zoo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step, all processes together")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--optim", default="adamw_torch",
                        help="transformers' optimizer name; the tests compare process counts with plain 'sgd'")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping; 0 turns it off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of the {world} processes")
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    model, tokenizer = zoo.load("local", "sft")
    pairs = agora.preference_pairs(args.steps * args.batch_size, seed=args.seed)
    data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in pairs])
    config = rlhf.TRLConfig(trainer="dpo", steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            beta=args.beta, seed=args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        dpo_args = trl.DPOConfig(
            output_dir=str(args.out / "trainer"), max_steps=args.steps, learning_rate=args.lr, beta=args.beta,
            optim=args.optim, max_grad_norm=args.max_grad_norm,
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # TRL's default bf16 autocasts CPUs too
            per_device_train_batch_size=args.batch_size // world, logging_steps=1, report_to="none",
            save_strategy="no", disable_tqdm=True, seed=args.seed,
            use_cpu=not torch.cuda.is_available() and not rlhf.deepspeed_on_cpu(),
            ddp_backend="gloo" if rlhf.deepspeed_on_cpu() else None,  # DeepSpeed's CPU accelerator over gloo
            lr_scheduler_type="constant", warmup_steps=0, dataloader_num_workers=0,
            max_length=model.config.n_positions)
        trainer = trl.DPOTrainer(model=model, args=dpo_args, processing_class=tokenizer, train_dataset=data,
                                 peft_config=rlhf._trl_lora(model, config))
        trainer.remove_callback(transformers.PrinterCallback)
        trainer.train()
    if trainer.accelerator.is_main_process:
        args.out.mkdir(parents=True, exist_ok=True)
        log = [row for row in trainer.state.log_history if "loss" in row]
        (args.out / "log.json").write_text(json.dumps(log, indent=1))
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        trainable = {k: v.detach().cpu() for k, v in unwrapped.named_parameters() if "lora_" in k}
        torch.save(trainable, args.out / "trainable.pt")
        print(f"{trainer.accelerator.num_processes} process(es), {trainer.accelerator.distributed_type.value}, "
              f"{type(trainer.model_wrapped).__name__}: final loss {log[-1]['loss']:.4f}")
    trainer.accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
