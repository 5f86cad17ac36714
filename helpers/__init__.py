"""The shared package of the Agora alignment course: every notebook starts with ``import helpers``.

One module per idea, in layers that import one way (docs/architecture.md):

- world and models: :mod:`~helpers.runtime` (presets, seeding, Colab), :mod:`~helpers.cache` (artifacts built
  once), :mod:`~helpers.agora` (the course world and its ground truth), :mod:`~helpers.lm` (log-probs, sampling,
  generation), :mod:`~helpers.zoo` (tiny Agora models, hub loading for GPU presets), :mod:`~helpers.plots`;
- algorithms: :mod:`~helpers.ppo`, :mod:`~helpers.trpo`, :mod:`~helpers.rewards`, :mod:`~helpers.rlhf`,
  :mod:`~helpers.sft` (LoRA supervised fine-tuning), :mod:`~helpers.dialogue` (Socratic dialogue data, one-turn
  generation);
- weeks: :mod:`~helpers.cai`, :mod:`~helpers.judges`, :mod:`~helpers.socratic`, :mod:`~helpers.redteam`,
  :mod:`~helpers.safety`, :mod:`~helpers.social`, :mod:`~helpers.scai`, :mod:`~helpers.widgets`;
- :mod:`~helpers.checks` (exercise checks, one module per week);
- instructor and maintainer tools: :mod:`~helpers.grading` (``course-grade``), :mod:`~helpers.bench`
  (``make bench``), :mod:`~helpers.notebooks` (``course-run``).

Submodules are imported on first use, so ``import helpers`` stays fast.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = {"runtime", "agora", "zoo", "lm", "plots", "checks", "grading", "notebooks", "cache", "ppo", "trpo",
               "rewards", "widgets", "rlhf", "cai", "judges", "socratic", "redteam", "safety", "social", "scai", "bench",
               "sft", "dialogue"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")


def setup(preset="auto", seed=0, **kwargs):
    """Shortcut for :func:`helpers.runtime.setup`."""
    from .runtime import setup as _setup

    return _setup(preset, seed, **kwargs)
