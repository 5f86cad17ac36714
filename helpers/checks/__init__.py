"""Exercise checks: ``check_<name>(fn)`` runs a student's function against the reference.

Each check draws fresh random inputs (the seed is printed on failure, to reproduce it), includes a
numerical-stability case, and, when the answer is wrong, compares it with the outputs of the typical mistakes
to say which one it looks like: "padding positions are not zero: is the mask applied?". A check prints one short
pass line, raises an ``AssertionError`` on failure, and writes nothing to stderr (nbgrader scores a test cell
that writes to stderr as 0).

One module per week: ``from helpers.checks import week00`` then ``week00.check_token_logprobs(token_logprobs)``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import random
import sys
import warnings
from typing import Callable

import torch


class CheckError(AssertionError):
    """A check failed; the message says what was expected and the likely mistake."""


# Tests replace this with a seeded ``random.Random`` so that every check run is reproducible; students get
# fresh inputs on every run (the seed is printed on failure).
seed_source: random.Random | None = None


def fresh_seed() -> int:
    return (seed_source or random.SystemRandom()).randrange(2**31)


def run_student(fn: Callable, *args, name: str | None = None, **kwargs):
    """Call the student's function; turn 'not implemented' and crashes into messages a student can act on."""
    label = name or getattr(fn, "__name__", "your function")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise CheckError(f"{label} is not implemented yet: replace `raise NotImplementedError()` with your code.") from None
    except CheckError:
        raise
    except Exception as e:  # the student's bug: show it as a failed check, not a crash in the check
        raise CheckError(f"{label} raised {type(e).__name__}: {e}") from e


def close(a, b, atol: float = 1e-5, rtol: float = 1e-4) -> bool:
    """True when two tensors have the same shape and values (inf in the same places counts as equal)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    a, b = a.detach().double(), b.detach().double()
    return bool(torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=False))


def expect_tensor(got, shape: tuple, label: str) -> torch.Tensor:
    if not isinstance(got, torch.Tensor):
        raise CheckError(f"{label} should return a torch.Tensor, got {type(got).__name__}.")
    if tuple(got.shape) != tuple(shape):
        raise CheckError(f"{label} returned shape {tuple(got.shape)}, expected {tuple(shape)}.")
    return got


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = (a.detach().double() - b.detach().double()).abs()
    return float(torch.nan_to_num(diff, nan=float("inf")).max()) if diff.numel() else 0.0


def diagnose(got: torch.Tensor, expected: torch.Tensor, mistakes: dict[str, torch.Tensor], *, label: str,
             seed: int, atol: float = 1e-5) -> None:
    """Raise a :class:`CheckError` unless ``got`` matches ``expected``; name the mistake ``got`` matches, if any."""
    if close(got, expected, atol=atol):
        return
    # Name the mistake ``got`` is closest to (two mistakes can nearly coincide on some inputs); a "mistake" that
    # equals the right answer on these inputs says nothing and is skipped.
    matches = [(_distance(got, wrong), message) for message, wrong in mistakes.items()
               if close(got, wrong, atol=atol) and not close(wrong, expected, atol=atol)]
    if matches:
        raise CheckError(f"{label}: {min(matches)[1]} (seed {seed})")
    diff = (got.detach().double() - expected.detach().double()).abs()
    diff = torch.nan_to_num(diff, nan=float("inf"))
    where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
    raise CheckError(f"{label}: wrong values (largest difference {diff.max().item():.3g} at index {where}: "
                     f"got {got.detach()[where].item():.4g}, expected {expected[where].item():.4g}; seed {seed}).")


def check(fn):
    """Decorator for checks: stderr goes to stdout and warnings are silenced, then a pass line is printed."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.redirect_stderr(sys.stdout), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            detail = fn(*args, **kwargs)
        print(f"PASS {fn.__name__}" + (f": {detail}" if detail else ""))
        return True

    return wrapper


def quietly(fn: Callable, *args, **kwargs):
    """Run ``fn`` with its stdout swallowed (used to try a function on many inputs without noise)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)
