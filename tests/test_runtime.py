"""Presets: auto-selection, overrides, seeding, and the GPU memory formula."""

import random

import pytest
import torch

from helpers import runtime


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("CI", "NBGRADER_EXECUTION", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "COURSE_PRESET"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.mark.parametrize("var", ["CI", "NBGRADER_EXECUTION", "HF_HUB_OFFLINE"])
def test_auto_is_local_under_ci_grading_or_offline(clean_env, var):
    clean_env.setenv(var, "1")
    preset, why = runtime.resolve_preset("auto", gpu_gib=80)
    assert preset.name == "local" and why


@pytest.mark.parametrize("gib,name", [(0, "local"), (8, "local"), (15, "t4"), (40, "a100"), (80, "a100-80")])
def test_auto_picks_by_gpu_memory(clean_env, gib, name):
    assert runtime.resolve_preset("auto", gpu_gib=gib)[0].name == name


def test_override_and_unknown_names(clean_env):
    clean_env.setenv("COURSE_PRESET", "t4")
    assert runtime.resolve_preset("auto")[0].name == "t4"
    assert runtime.resolve_preset("local")[0].name == "local"  # an explicit name beats the variable
    with pytest.raises(ValueError, match="unknown preset 'h9000'"):
        runtime.resolve_preset("h9000")


def test_setup_seeds_everything(capsys):
    runtime.setup("local", seed=7)
    a = (random.random(), torch.rand(1).item())
    runtime.setup("local", seed=7)
    assert (random.random(), torch.rand(1).item()) == a
    assert "preset 'local'" in capsys.readouterr().out


@pytest.mark.parametrize("name", [n for n, p in runtime.PRESETS.items() if p.on_gpu])
def test_gpu_presets_fit_their_card_with_headroom(name):
    preset = runtime.PRESETS[name]
    est = runtime.memory_estimate(preset)
    card = {"t4": 15.0, "a100": 40.0, "a100-80": 80.0}[name]  # usable GiB of the card the preset targets
    assert est["total"] <= 0.85 * card, est
    assert est["total"] == pytest.approx(sum(v for k, v in est.items() if k != "total"))


def test_memory_formula_hand_worked():
    arch = runtime.Architecture(n_params=1_000_000_000, n_layers=10, hidden=1024, n_heads=8, n_kv_heads=8,
                                vocab=1000)
    p = runtime.replace(runtime.PRESETS["a100"], arch=arch, batch_size=1, mini_batch_size=1, seq_len=1024, lora_r=8)
    est = runtime.memory_estimate(p, lora=False)
    gib = 1024**3
    assert est["weights"] == pytest.approx(2e9 / gib)  # bf16
    assert est["optimizer"] == pytest.approx(8e9 / gib)  # Adam: two fp32 moments
    assert est["kv_cache"] == pytest.approx(2 * 10 * 1024 * 1024 * 2 / gib)
    assert runtime.memory_estimate(p, ref_copy=True)["weights"] == pytest.approx(2 * est["weights"])
    # activations: 34 bytes per token, layer and unit of width; checkpointed, each layer keeps only its bf16 input
    # (2 bytes) and one layer at a time holds its full 34
    assert est["activations"] == pytest.approx(10 * 1024 * 1024 * 34 / gib)
    ckpt = runtime.memory_estimate(p, lora=False, checkpointing=True)
    assert ckpt["activations"] == pytest.approx((10 * 2 + 34) * 1024 * 1024 / gib)
    assert {k: v for k, v in ckpt.items() if k not in ("activations", "total")} == \
        {k: v for k, v in est.items() if k not in ("activations", "total")}
    with pytest.raises(ValueError, match="tiny local models"):
        runtime.memory_estimate(runtime.PRESETS["local"])


def test_setup_cell_installs_only_on_colab():
    assert 'if "google.colab" in sys.modules' in runtime.SETUP_CELL
    assert runtime.REPOSITORY in runtime.SETUP_CELL
