"""Shared helpers for tests that touch real files and real subprocesses.

Kept small on purpose: a repo-root path, an environment for child processes,
and a helper that flips bytes inside a (closed) LMDB file to simulate bit rot.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent

# The default suite draws the same hypothesis examples on every run, so a red CI is a
# regression, never an unlucky draw; `make soak` (FABRIC_HYPOTHESIS=explore) draws
# fresh ones each time (and 5x as many), to find what the fixed draw does not.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile(os.environ.get("FABRIC_HYPOTHESIS", "ci"))


def flip_in_file(path: str | os.PathLike, needle: bytes, *, at: int | None = None, xor: int = 0x01) -> int:
    """Flip one byte (``needle[at] ^= xor``, default the middle byte) in every occurrence of ``needle``.

    Every occurrence is altered, because LMDB's copy-on-write can leave stale
    copies of a value in free pages.  Returns how many occurrences were changed
    and fails the test if there were none.  The LMDB environment must be closed.
    """
    assert needle, "empty needle"
    i_at = len(needle) // 2 if at is None else at
    data = bytearray(Path(path).read_bytes())
    hits = 0
    start = 0
    while True:
        i = data.find(needle, start)
        if i < 0:
            break
        data[i + i_at] ^= xor
        hits += 1
        start = i + len(needle)
    assert hits, f"{len(needle)}-byte needle not found in {path}"
    with open(path, "r+b") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hits


def child_env(home: str | os.PathLike, **extra: str) -> dict[str, str]:
    """Environment for a child process: repo importable, FABRIC_HOME isolated, no remote node."""
    env = dict(os.environ)
    for k in ("FABRIC_NODE", "FABRIC_SECRET", "FABRIC_SECRET_FILE", "FABRIC_EVAL_LOG"):
        env.pop(k, None)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["FABRIC_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@pytest.fixture
def fabric_home(tmp_path, monkeypatch):
    """An isolated ``$FABRIC_HOME`` for this test (and its children)."""
    home = tmp_path / "fabric-home"
    monkeypatch.setenv("FABRIC_HOME", str(home))
    monkeypatch.delenv("FABRIC_NODE", raising=False)
    return home


PYTHON = sys.executable
