"""Both-directions tests for exercise checks, shared by the ``tests/test_checks*.py`` files.

A week's test file lists ``CASES = [(check, reference, [(wrong, phrase), ...]), ...]`` and binds the three tests::

    test_reference_passes, test_stub_says_not_implemented, test_planted_mistake_is_named = both_directions(CASES)

The reference must pass, a stub must be told that it is not implemented, and each planted mistake must fail with
``phrase`` (plain text) in the message, each on several draws of the check's random inputs (the draws are
reproducible: ``tests/conftest.py`` seeds them per test).
"""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from helpers.checks import CheckError


def run_quiet(check, *fns):
    """Run ``check(*fns)`` with its output captured; a check must write nothing to stderr. Returns stdout."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        check(*fns)
    assert err.getvalue() == "", "checks must write nothing to stderr"
    return out.getvalue()


def stub(*args, **kwargs):
    """What a student's notebook holds before the exercise is done."""
    raise NotImplementedError()


def _id(x):
    return x if isinstance(x, str) else getattr(x, "__name__", "")


def both_directions(cases, *, draws: int = 3):
    """The three parametrised tests for ``cases``, each check run on ``draws`` draws of its inputs."""

    @pytest.mark.parametrize("check,reference", [(c, r) for c, r, _ in cases], ids=_id)
    def test_reference_passes(check, reference):
        for _ in range(draws):
            assert run_quiet(check, reference).startswith("PASS")

    @pytest.mark.parametrize("check", [c for c, _, _ in cases], ids=_id)
    def test_stub_says_not_implemented(check):
        with pytest.raises(CheckError, match="not implemented"):
            run_quiet(check, stub)

    @pytest.mark.parametrize("check,wrong,phrase", [(c, w, p) for c, _, ms in cases for w, p in ms], ids=_id)
    def test_planted_mistake_is_named(check, wrong, phrase):
        for _ in range(draws):
            with pytest.raises(CheckError, match=re.escape(phrase)):
                run_quiet(check, wrong)

    return test_reference_passes, test_stub_says_not_implemented, test_planted_mistake_is_named
