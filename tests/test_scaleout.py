"""Scale-out: the Accelerate configs in configs/accelerate/ launch the course's PPO and a TRL recipe on two CPU
processes, and two processes reach the same result as one. The DeepSpeed ZeRO-2 tests need ``deepspeed``
(the test environment installs it; elsewhere they are skipped with the reason); on a machine without a GPU they
run DeepSpeed's CPU accelerator over gloo.

``accelerate launch --cpu --num_processes 2`` would start a single process (Accelerate's simple launcher), so the
tests pass the config file instead: on a machine without a GPU its launcher (torchrun) starts two CPU processes,
and their Accelerator joins a gloo process group. Each test checks that two processes really ran.
"""

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import zoo

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "accelerate"
ACCELERATE = Path(sys.executable).parent / "accelerate"
# The environment's bin first: DeepSpeed compiles its CPU op with the ninja that pip installed there.
ENV = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
       "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "ACCELERATE_DISABLE_RICH": "1"}

needs_accelerate = pytest.mark.skipif(not ACCELERATE.exists(), reason="the accelerate command is not installed")


def deepspeed_problem() -> str | None:
    """Why the DeepSpeed config cannot be tested here, or None."""
    if not any(shutil.which(c) for c in ("c++", "g++")):
        return "DeepSpeed compiles its CPU communication op and needs a C++ compiler (apt-get install g++)"
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed; it is not a course dependency)"
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # an import that fails for want of a CUDA toolkit, say
        return f"import deepspeed fails: {type(exc).__name__}: {exc}"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}"
    return out


def launch(config: str, target: list[str]) -> subprocess.CompletedProcess:
    return run([str(ACCELERATE), "launch", "--config_file", str(CONFIGS / config), "--num_processes", "2",
                "--main_process_port", str(free_port()), *target])


def assert_same_weights(one: Path, two: Path, atol: float = 1e-4) -> None:
    w1, w2 = torch.load(one / "trainable.pt"), torch.load(two / "trainable.pt")
    assert set(w1) == set(w2) and w1
    moved = 0.0
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=atol, rtol=1e-3, msg=lambda m: f"{k}: {m}")
        if "lora_B" in k:
            moved = max(moved, w1[k].abs().max().item())
    assert moved > 1e-3  # the adapters trained: the comparison is not between two zero-initialised ones


# ----------------------------------------------------------------------------------------------- the configs


def test_configs_parse_as_accelerate_configs():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp = load_config_from_file(str(CONFIGS / "ddp.yaml"))
    assert ddp.distributed_type == "MULTI_GPU" and ddp.num_processes >= 2 and ddp.mixed_precision == "no"
    ds = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml"))
    assert ds.distributed_type == "DEEPSPEED" and ds.deepspeed_config["zero_stage"] == 2


# -------------------------------------------------------------------------------------- DDP: the course's PPO

PPO_ARGS = ["--steps", "2", "--batch-size", "8", "--mini-batch-size", "8", "--generation-batch-size", "2",
            "--prompts", "16"]


@pytest.fixture(scope="module")
def ppo_one(tmp_path_factory):
    """The course's PPO on one process (in a subprocess, like the launched runs)."""
    zoo.build()
    out = tmp_path_factory.mktemp("ppo") / "one"
    run([sys.executable, "-m", "helpers.rlhf", *PPO_ARGS, "--out", str(out)])
    return out


def compare_ppo(one: Path, two: Path) -> None:
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    assert len(h1) == len(h2) == 2
    for a, b in zip(h1, h2):  # the same rollouts, scores and KL
        assert a["score"] == pytest.approx(b["score"], abs=1e-5) and a["kl"] == pytest.approx(b["kl"], abs=1e-4)
    assert_same_weights(one, two)


@needs_accelerate
def test_ddp_config_runs_course_ppo_on_two_processes(ppo_one, tmp_path):
    out = launch("ddp.yaml", ["-m", "helpers.rlhf", *PPO_ARGS, "--out", str(tmp_path / "two")])
    assert "2 process(es)" in out.stdout
    compare_ppo(ppo_one, tmp_path / "two")


@needs_accelerate
@pytest.mark.skipif(deepspeed_problem() is not None, reason=str(deepspeed_problem()))
def test_deepspeed_zero2_config_runs_course_ppo_on_two_processes(ppo_one, tmp_path):
    out = launch("deepspeed_zero2.yaml", ["-m", "helpers.rlhf", *PPO_ARGS, "--out", str(tmp_path / "two")])
    assert "2 process(es), DEEPSPEED" in out.stdout
    compare_ppo(ppo_one, tmp_path / "two")


# ------------------------------------------------------------------------------------------- DDP: TRL's DPO

# Plain SGD: Adam divides each coordinate by the root of its squared gradient, so a coordinate whose gradient is
# nearly 0 moves by about lr in a direction that rounding (the order of the sum over processes) decides.
DPO_ARGS = ["--steps", "3", "--batch-size", "8", "--optim", "sgd", "--lr", "0.5"]


@pytest.fixture(scope="module")
def dpo_one(tmp_path_factory):
    zoo.build()
    out = tmp_path_factory.mktemp("dpo") / "one"
    result = run([sys.executable, "scripts/trl_dpo.py", *DPO_ARGS, "--out", str(out)])
    assert "1 process(es)" in result.stdout
    return out


def compare_dpo(one: Path, two: Path) -> None:
    l1 = json.loads((one / "log.json").read_text())
    l2 = json.loads((two / "log.json").read_text())
    assert len(l1) == len(l2) == 3
    assert l1[-1]["loss"] == pytest.approx(l2[-1]["loss"], abs=1e-4)
    assert_same_weights(one, two)


@needs_accelerate
def test_ddp_config_runs_trl_dpo_on_two_processes(dpo_one, tmp_path):
    out = launch("ddp.yaml", ["scripts/trl_dpo.py", *DPO_ARGS, "--out", str(tmp_path / "two")])
    assert "2 process(es), MULTI_" in out.stdout and "DistributedDataParallel" in out.stdout
    compare_dpo(dpo_one, tmp_path / "two")


@needs_accelerate
@pytest.mark.skipif(deepspeed_problem() is not None, reason=str(deepspeed_problem()))
def test_deepspeed_zero2_config_runs_trl_dpo_on_two_processes(dpo_one, tmp_path):
    out = launch("deepspeed_zero2.yaml", ["scripts/trl_dpo.py", *DPO_ARGS, "--out", str(tmp_path / "two")])
    assert "2 process(es), DEEPSPEED, DeepSpeedEngine" in out.stdout
    compare_dpo(dpo_one, tmp_path / "two")


PROBE = '''
import torch
from helpers import rlhf
accelerator = rlhf.make_accelerator()  # as the course's PPO makes it
model = torch.nn.Linear(4, 1)
accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 1  # no dataloader to tell it
engine, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
stage = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None
print(f"rank {accelerator.process_index}: {accelerator.distributed_type.value} {type(engine).__name__} stage {stage}")
'''


@needs_accelerate
@pytest.mark.skipif(deepspeed_problem() is not None, reason=str(deepspeed_problem()))
def test_deepspeed_zero2_config_gives_a_zero2_engine(tmp_path):
    """The two runs above would also pass under plain DDP; this checks that the config really wraps the model
    in DeepSpeed's engine with ZeRO stage 2."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    out = launch("deepspeed_zero2.yaml", [str(probe)])
    for rank in (0, 1):
        assert f"rank {rank}: DEEPSPEED DeepSpeedEngine stage 2" in out.stdout, out.stdout
