"""The GPU memory table (helpers.bench.memory_table): each preset's weeks fit its card with headroom, the table's
arithmetic, and docs/performance.md holding the table as the code generates it."""

from pathlib import Path

import pytest

from helpers import bench, runtime
from helpers.runtime import PRESETS

REPO = Path(__file__).resolve().parent.parent
GPU_PRESETS = [name for name, p in PRESETS.items() if p.on_gpu]


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_every_week_fits_its_card_with_headroom(name):
    week, total = bench.largest_estimate(name)
    budget = (1 - bench.HEADROOM) * bench.CARD_GIB[name]
    assert total <= budget, f"{name}: week {week} needs {total:.1f} GiB, more than {budget:.1f} GiB of its card"
    assert bench.fits_card(name, bench.CARD_GIB[name])


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_the_check_rejects_what_does_not_fit(name):
    # Eight times the batch and the sequence: activations grow 64-fold, far past any card.
    big = runtime.replace(PRESETS[name], batch_size=8 * PRESETS[name].batch_size,
                          mini_batch_size=8 * PRESETS[name].mini_batch_size, seq_len=8 * PRESETS[name].seq_len)
    assert not bench.fits_card(big, bench.CARD_GIB[name])
    # and a card just below the largest estimate (plus headroom) is too small
    _, total = bench.largest_estimate(name)
    assert not bench.fits_card(name, 0.99 * total / (1 - bench.HEADROOM))
    assert bench.fits_card(name, 1.01 * total / (1 - bench.HEADROOM))


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_auto_picks_each_preset_for_its_card(name, monkeypatch):
    for var in ("CI", "NBGRADER_EXECUTION", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "COURSE_PRESET"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delitem(__import__("sys").modules, "google.colab", raising=False)
    preset, _ = runtime.resolve_preset("auto", gpu_gib=bench.CARD_GIB[name])
    assert preset.name == name


def test_week_estimates_by_hand():
    t4 = PRESETS["t4"]
    full = runtime.memory_estimate(t4)
    by_week = {w.week: bench.week_estimate("t4", w) for w in bench.WORKLOADS}
    assert sorted(by_week) == list(range(8))
    # week 0 samples only: weights + KV cache + logits, no training state
    w0 = by_week[0]
    assert w0["gradients"] == w0["optimizer"] == w0["activations"] == 0
    assert w0["total"] == pytest.approx(full["weights"] + full["kv_cache"] + full["logits"])
    # week 2 trains a reward model: no KV cache
    assert by_week[2]["kv_cache"] == 0 and by_week[2]["total"] == pytest.approx(full["total"] - full["kv_cache"])
    # week 3: the PPO estimate plus the reward model's weights (a second model of the same size)
    assert by_week[3]["total"] == pytest.approx(full["total"] + full["weights"])
    # SmolLM2-360M in fp16: 361.8M parameters x 2 bytes = 0.674 GiB
    assert full["weights"] == pytest.approx(361_821_120 * 2 / 1024**3)
    for e in by_week.values():
        assert e["total"] == pytest.approx(sum(e[k] for k in bench.COMPONENTS))


def test_docs_hold_the_generated_table():
    doc = (REPO / "docs" / "performance.md").read_text()
    assert bench.memory_table() in doc, "docs/performance.md is out of date: python -m helpers.bench memory-table"
    readme = (REPO / "README.md").read_text()
    assert bench.memory_table().strip() in readme, "README.md's GPU memory table is out of date: python -m helpers.bench memory-table"
