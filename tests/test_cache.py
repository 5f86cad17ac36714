"""helpers.cache: artifacts built once per configuration, atomically; their last use; listing and pruning."""

import os
import time

import pytest

from helpers import cache


@pytest.fixture()
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("COURSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def writer(calls: list, text: str = "weights"):
    def build(tmp):
        calls.append(tmp)
        (tmp / "model.bin").write_text(text)

    return build


def age(folder, days: float) -> None:
    t = time.time() - days * 86_400
    os.utime(folder / cache.DONE, (t, t))


def test_build_once_builds_once_and_keys_by_config(root):
    calls = []
    a = cache.build_once("rewards", "rm", {"lr": 1e-3}, writer(calls))
    again = cache.build_once("rewards", "rm", {"lr": 1e-3}, writer(calls))
    other = cache.build_once("rewards", "rm", {"lr": 2e-3}, writer(calls))
    assert a == again != other and len(calls) == 2
    assert (a / "model.bin").read_text() == "weights" and (a / "config.json").exists()
    assert a.parent == root / "rewards" and a.name.startswith("rm-")


def test_a_failed_build_leaves_nothing(root):
    def broken(tmp):
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        cache.build_once("rlhf", "ppo", {"steps": 1}, broken)
    assert list((root / "rlhf").iterdir()) == [root / "rlhf" / f".{cache.artifact_dir('rlhf', 'ppo', {'steps': 1}).name}.lock"]
    assert cache.entries() == []


def test_each_use_stamps_the_artifact(root):
    folder = cache.build_once("zoo", "tiny", {"n": 1}, writer([]))
    age(folder, 10)
    before = (folder / cache.DONE).stat().st_mtime
    cache.build_once("zoo", "tiny", {"n": 1}, writer([]))
    assert (folder / cache.DONE).stat().st_mtime > before + 9 * 86_400


def test_entries_and_prune_remove_only_the_stale(root):
    old = cache.build_once("rlhf", "old-run", {"a": 1}, writer([], "x" * 1000))
    new = cache.build_once("rlhf", "new-run", {"a": 2}, writer([]))
    age(old, 40)
    found = cache.entries()
    assert [e.path for e in found] == [old, new]  # least recently used first
    assert found[0].bytes >= 1000 and found[0].kind == "rlhf"
    assert [e.path for e in cache.prune(30, dry_run=True)] == [old] and old.exists()  # dry run: nothing removed
    assert [e.path for e in cache.prune(30)] == [old]
    assert not old.exists() and new.exists()
    assert cache.prune(30) == []
    calls = []  # a pruned artifact is rebuilt on demand
    assert cache.build_once("rlhf", "old-run", {"a": 1}, writer(calls)) == old and len(calls) == 1
    with pytest.raises(ValueError, match="older_than_days"):
        cache.prune(-1)


def test_command_line_lists_and_prunes(root, capsys):
    folder = cache.build_once("cai", "helpful-only", {"s": 0}, writer([]))
    age(folder, 12)
    assert cache.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "1 artifacts" in out and "12.0 days ago" in out and "cai/helpful-only-" in out
    assert cache.main(["prune", "--older-than", "7", "--dry-run"]) == 0
    assert "would remove 1 artifacts" in capsys.readouterr().out and folder.exists()
    assert cache.main(["prune", "--older-than", "7"]) == 0
    assert "removed 1 artifacts" in capsys.readouterr().out and not folder.exists()
