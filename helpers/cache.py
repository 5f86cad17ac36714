"""Expensive artifacts (tiny models, SFT policies, reward models) built once per configuration, kept on disk.

``build_once(name, config, builder)`` returns ``$COURSE_CACHE/<kind>/<name>-<hash of config>/``; the first call
runs ``builder(tmp_dir)`` into a temporary folder under a file lock and renames it into place, so a crash never
leaves a half-written artifact and two notebooks never build the same thing at once. Later calls, from any
notebook, return the folder at once. ``config`` is any JSON-serialisable dict or dataclass: change a field and a
new artifact is built beside the old one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
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
