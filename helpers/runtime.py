"""Presets, device and dtype, seeding, and Colab detection.

Every notebook starts with the same two cells: a setup cell (on Colab it installs this package; elsewhere it
does nothing) and a ``parameters`` cell holding ``PRESET = "auto"`` and ``SEED``. ``setup(PRESET, SEED)`` then
resolves the preset, seeds every generator and prints one line saying what it chose and why.

Presets (the README's preset table says the same):

==========  =======  =====================================  ==========================================
name        device   models                                 chosen by ``auto`` when
==========  =======  =====================================  ==========================================
local       cpu      the course's tiny Agora models (zoo)   CI, grading, no GPU, or offline
t4          cuda     SmolLM2-360M-Instruct, fp16            a GPU with at least 14 GiB (free Colab)
a100        cuda     Qwen2.5-1.5B-Instruct, bf16            a GPU with at least 35 GiB
a100-80     cuda     Qwen2.5-3B-Instruct, bf16              a GPU with at least 70 GiB
==========  =======  =====================================  ==========================================

The GPU presets write down their memory need by formula (:func:`memory_estimate`), so the choice is made from
the card's size, not by trial and error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sys
from dataclasses import dataclass

import numpy as np

REPOSITORY = "https://github.com/agora-course/align-course"
"""Where Colab installs the package from. Forks change this one line (and the badges in README.md)."""


@dataclass(frozen=True)
class Architecture:
    """The numbers the memory formula needs, read from the model's config.json."""

    n_params: int
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    vocab: int


@dataclass(frozen=True)
class Preset:
    """One hardware/model size the course runs at."""

    name: str
    """Short name used in notebooks: ``PRESET = "local"``."""
    device: str
    """``"cpu"`` or ``"cuda"``."""
    dtype: str
    """Weights' dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``."""
    model_id: str | None
    """Hub id of the base model; ``None`` means the course's tiny Agora model from :mod:`helpers.zoo`."""
    arch: Architecture | None
    """Shape of ``model_id`` for the memory formula; ``None`` for ``local``."""
    batch_size: int
    """Prompts per rollout batch."""
    mini_batch_size: int
    """Sequences per optimisation step (gradients are taken on mini-batches of the rollout)."""
    max_new_tokens: int
    """Tokens generated per response."""
    seq_len: int
    """Longest prompt + response the preset trains on."""
    lora_r: int
    """LoRA rank for adapters trained on this preset."""
    min_gpu_gib: float
    """Smallest card (GiB) ``auto`` picks this preset for; 0 for CPU."""
    description: str

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


PRESETS: dict[str, Preset] = {
    "local": Preset(
        name="local", device="cpu", dtype="float32", model_id=None, arch=None,
        batch_size=16, mini_batch_size=16, max_new_tokens=24, seq_len=128, lora_r=8, min_gpu_gib=0,
        description="CPU, offline: the course's tiny Agora tokenizer and GPT-2 models",
    ),
    "t4": Preset(
        name="t4", device="cuda", dtype="float16", model_id="HuggingFaceTB/SmolLM2-360M-Instruct",
        arch=Architecture(n_params=361_821_120, n_layers=32, hidden=960, n_heads=15, n_kv_heads=5, vocab=49_152),
        batch_size=16, mini_batch_size=4, max_new_tokens=64, seq_len=512, lora_r=16, min_gpu_gib=14,
        description="free Colab T4 (16 GB): SmolLM2-360M-Instruct in fp16, LoRA",
    ),
    "a100": Preset(
        name="a100", device="cuda", dtype="bfloat16", model_id="Qwen/Qwen2.5-1.5B-Instruct",
        arch=Architecture(n_params=1_543_714_304, n_layers=28, hidden=1536, n_heads=12, n_kv_heads=2, vocab=151_936),
        batch_size=32, mini_batch_size=8, max_new_tokens=96, seq_len=768, lora_r=16, min_gpu_gib=35,
        description="A100 40 GB: Qwen2.5-1.5B-Instruct in bf16, LoRA",
    ),
    "a100-80": Preset(
        name="a100-80", device="cuda", dtype="bfloat16", model_id="Qwen/Qwen2.5-3B-Instruct",
        arch=Architecture(n_params=3_085_938_688, n_layers=36, hidden=2048, n_heads=16, n_kv_heads=2, vocab=151_936),
        batch_size=32, mini_batch_size=8, max_new_tokens=128, seq_len=1024, lora_r=32, min_gpu_gib=70,
        description="A100/H100 80 GB: Qwen2.5-3B-Instruct in bf16, LoRA",
    ),
}

_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def memory_estimate(preset: Preset, *, lora: bool = True, ref_copy: bool = False,
                    checkpointing: bool = False) -> dict[str, float]:
    """GiB needed to train ``preset`` with PPO, by formula, component by component.

    - weights: ``n_params * bytes(dtype)`` (a second copy if ``ref_copy``: a separate reference policy);
    - gradients and Adam state: for the trainable parameters only, in fp32 (4 + 8 bytes each); LoRA trains
      ``2 * r * hidden`` parameters per adapted matrix, four matrices (q, k, v, o) per layer;
    - activations: for one optimisation mini-batch ``b``, ``s * b * h * 34`` bytes per layer in 16-bit (Korthikanti et al. 2022, eq. 2, without the
      attention-score term that FlashAttention/SDPA avoid); with gradient ``checkpointing`` only each layer's
      input (``s * b * h`` values) is kept, plus one layer's full activations while it is recomputed;
    - KV cache for generating the whole rollout batch ``B``: ``2 * layers * B * s * kv_heads * head_dim * bytes``;
    - logits: ``b * s * vocab * 4`` bytes (fp32 log-softmax over the vocabulary, per mini-batch).

    Returns a dict of GiB per component plus ``"total"``.
    """
    if preset.arch is None:
        raise ValueError(f"preset {preset.name!r} uses the tiny local models; it has no GPU memory estimate")
    a, B, b, s = preset.arch, preset.batch_size, preset.mini_batch_size, preset.seq_len
    nbytes = _BYTES[preset.dtype]
    trainable = 4 * a.n_layers * 2 * preset.lora_r * a.hidden if lora else a.n_params
    head_dim = a.hidden // a.n_heads
    gib = 1024**3
    parts = {
        "weights": a.n_params * nbytes * (2 if ref_copy else 1) / gib,
        "gradients": trainable * 4 / gib,
        "optimizer": trainable * 8 / gib,
        "activations": (a.n_layers * s * b * a.hidden * nbytes + s * b * a.hidden * 34 if checkpointing
                        else a.n_layers * s * b * a.hidden * 34) / gib,
        "kv_cache": 2 * a.n_layers * B * s * a.n_kv_heads * head_dim * nbytes / gib,
        "logits": b * s * a.vocab * 4 / gib,
    }
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------- environment


def in_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def in_ci() -> bool:
    """True under a CI runner (they set ``CI``)."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false")


def in_grading() -> bool:
    """True while nbgrader executes a submission."""
    return bool(os.environ.get("NBGRADER_EXECUTION"))


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(f, "").lower() not in ("", "0", "false") for f in flags)


def gpu_memory_gib() -> float:
    """Total memory of GPU 0 in GiB, or 0.0 without CUDA."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0.0
    if not torch.cuda.is_available():
        return 0.0
    return torch.cuda.get_device_properties(0).total_memory / 1024**3


def resolve_preset(name: str = "auto", *, gpu_gib: float | None = None) -> tuple[Preset, str]:
    """The preset for ``name`` and the reason it was chosen.

    ``"auto"`` gives ``local`` under CI, under grading, offline or without a GPU, else the largest preset whose
    ``min_gpu_gib`` fits the card. The environment variable ``COURSE_PRESET`` overrides ``"auto"``.
    """
    if name == "auto" and os.environ.get("COURSE_PRESET"):
        name = os.environ["COURSE_PRESET"]
        if name != "auto":
            return _named(name, "COURSE_PRESET"), f"COURSE_PRESET={name}"
    if name != "auto":
        return _named(name, "PRESET"), "asked for by name"
    if in_ci():
        return PRESETS["local"], "running under CI"
    if in_grading():
        return PRESETS["local"], "running under nbgrader"
    if hub_offline():
        return PRESETS["local"], "the hub is offline (HF_HUB_OFFLINE)"
    gib = gpu_memory_gib() if gpu_gib is None else gpu_gib
    if gib <= 0:
        return PRESETS["local"], "no GPU found"
    fitting = [p for p in PRESETS.values() if p.on_gpu and p.min_gpu_gib <= gib]
    if not fitting:
        return PRESETS["local"], f"the GPU has {gib:.0f} GiB, less than the smallest GPU preset needs"
    best = max(fitting, key=lambda p: p.min_gpu_gib)
    return best, f"a GPU with {gib:.0f} GiB"


def _named(name: str, where: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"{where}: unknown preset {name!r}; choose one of {', '.join(['auto', *PRESETS])}")
    return PRESETS[name]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so a run repeats exactly on the same machine."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def autocast(preset: Preset):
    """Mixed precision on GPU presets, a no-op on CPU (one code path for both)."""
    if not preset.on_gpu or preset.dtype == "float32":
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type="cuda", dtype=preset.torch_dtype)


def setup(preset: str = "auto", seed: int = 0, *, quiet: bool = False) -> Preset:
    """Resolve the preset, seed everything, and say what was chosen. Call it once, right after the parameters."""
    chosen, why = resolve_preset(preset)
    seed_everything(seed)
    if chosen.device == "cpu":
        import torch

        # Small models on two cores: more threads than cores only adds contention.
        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    _plotly_renderer()
    if not quiet:
        print(f"preset {chosen.name!r} ({why}): {chosen.description}; seed {seed}")
    return chosen


def _plotly_renderer() -> None:
    """Figures live in the notebook both as plotly JSON (JupyterLab) and as HTML with plotly.js embedded, so the
    HTML copies that ``course-run`` writes show them too, offline. Colab keeps its own renderer."""
    if in_colab():
        return
    import plotly.io as pio

    pio.renderers.default = "plotly_mimetype+notebook"


def replace(preset: Preset, **changes) -> Preset:
    """A copy of ``preset`` with some fields changed, e.g. ``replace(p, batch_size=4)``."""
    return dataclasses.replace(preset, **changes)


SETUP_CELL = f'''# Setup: on Colab this installs the course package; anywhere else it does nothing.
import sys
if "google.colab" in sys.modules:
    get_ipython().run_line_magic("pip", "install -q 'agora-alignment-course[notebooks] @ git+{REPOSITORY}'")
'''
"""The first cell of every notebook."""
