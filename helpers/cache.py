"""Expensive artifacts (tiny models, SFT policies, reward models) built once per configuration, kept on disk.

``build_once(name, config, builder)`` returns ``$COURSE_CACHE/<kind>/<name>-<hash of config>/``; the first call
runs ``builder(tmp_dir)`` into a temporary folder under a file lock and renames it into place, so a crash never
leaves a half-written artifact and two notebooks never build the same thing at once. Later calls, from any
notebook, return the folder at once. ``config`` is any JSON-serialisable dict or dataclass: change a field and a
new artifact is built beside the old one.

Each use of an artifact stamps it (the modification time of its ``.complete`` marker), so stale ones can be found
and removed: ``python -m helpers.cache list`` shows every artifact with its size and last use, and
``python -m helpers.cache prune --older-than 30`` removes those unused for 30 days (``--dry-run`` only lists them).
A pruned artifact is rebuilt the next time something asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

DONE = ".complete"


def cache_root() -> Path:
    """``$COURSE_CACHE`` or ``~/.cache/agora-course``."""
    return Path(os.environ.get("COURSE_CACHE", Path.home() / ".cache" / "agora-course"))


def config_key(config: Any, version: int = 1) -> str:
    """A short stable hash of ``config`` (a dataclass or JSON-serialisable value) and a format ``version``."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    blob = json.dumps(config, sort_keys=True, default=str) + f"|format-{version}"
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def artifact_dir(kind: str, name: str, config: Any, version: int = 1) -> Path:
    return cache_root() / kind / f"{name}-{config_key(config, version)}"


@contextlib.contextmanager
def _lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_once(kind: str, name: str, config: Any, builder: Callable[[Path], None], *, version: int = 1,
               force: bool = False) -> Path:
    """The folder of the artifact for ``config``, running ``builder(tmp_folder)`` first if it is not cached."""
    final = artifact_dir(kind, name, config, version)
    if (final / DONE).exists() and not force:
        _stamp(final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock"):
        if (final / DONE).exists() and not force:  # built by another process while we waited
            return final
        for stale in final.parent.glob(f".{final.name}.building.*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.building."))
        try:
            builder(tmp)
            (tmp / "config.json").write_text(json.dumps(
                dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config, indent=2, default=str))
            (tmp / DONE).touch()
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ------------------------------------------------------------------------------------ listing and pruning


def _stamp(folder: Path) -> None:
    """Record a use of the artifact in ``folder`` (best effort: a read-only cache still serves)."""
    with contextlib.suppress(OSError):
        os.utime(folder / DONE)


@dataclass(frozen=True)
class Entry:
    """One cached artifact."""

    kind: str
    name: str
    path: Path
    bytes: int
    last_used: float
    """Seconds since the epoch of its last use (or its build)."""


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def entries(root: Path | None = None) -> list[Entry]:
    """Every complete artifact under ``root`` (default :func:`cache_root`), least recently used first."""
    root = Path(root) if root is not None else cache_root()
    found = []
    for marker in root.glob(f"*/*/{DONE}"):
        folder = marker.parent
        if folder.name.startswith("."):
            continue
        found.append(Entry(folder.parent.name, folder.name, folder, _size(folder), marker.stat().st_mtime))
    return sorted(found, key=lambda e: e.last_used)


def prune(older_than_days: float, *, root: Path | None = None, dry_run: bool = False) -> list[Entry]:
    """Remove the artifacts not used for ``older_than_days`` days; returns them. Each removal holds the lock that
    builds take, so an artifact being built or rebuilt is never half-removed."""
    if older_than_days < 0:
        raise ValueError(f"older_than_days must be >= 0, got {older_than_days}")
    cutoff = time.time() - older_than_days * 86_400
    removed = []
    for e in entries(root):
        if e.last_used >= cutoff:
            continue
        if not dry_run:
            with _lock(e.path.parent / f".{e.path.name}.lock"):
                marker = e.path / DONE
                if not marker.exists() or marker.stat().st_mtime >= cutoff:  # used or rebuilt meanwhile
                    continue
                marker.unlink()  # first: a half-removed folder is never taken for a complete one
                shutil.rmtree(e.path)
        removed.append(e)
    return removed


def _human(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m helpers.cache", description="The course's cached artifacts.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every artifact with its size and last use, least recently used first")
    pr = sub.add_parser("prune", help="remove artifacts unused for some days (they are rebuilt when needed)")
    pr.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    pr.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    args = parser.parse_args(argv)
    now = time.time()
    if args.command == "list":
        found = entries()
        print(f"{cache_root()}: {len(found)} artifacts, {_human(sum(e.bytes for e in found))}")
        for e in found:
            print(f"  {(now - e.last_used) / 86_400:6.1f} days ago  {_human(e.bytes):>9}  {e.kind}/{e.name}")
        return 0
    removed = prune(args.older_than, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removed)} artifacts unused for {args.older_than:g} days, {_human(sum(e.bytes for e in removed))}")
    for e in removed:
        print(f"  {e.kind}/{e.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
