"""Example evaluators used by ``fabric demo`` and the tests: small but real computations.

Load them with ``--evaluators examples.evaluators`` (from the repo root) or
``--evaluators examples/evaluators.py``.  Every evaluator is deterministic:
equal arguments give byte-identical replies on every machine.  Names carry a
prefix (``text.embed``, not the ``embed`` of the design's examples) so that loading
these into a process never changes which version of a user's own ``embed`` is the
latest registered one.
"""

from __future__ import annotations

import math
import os
from collections import Counter

import blake3
import numpy as np

import fabric


def _side_effect(name: str) -> None:
    """If ``FABRIC_EVAL_LOG`` names a file, append one line per evaluator run (tests count them)."""
    path = os.environ.get("FABRIC_EVAL_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{name} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


@fabric.evaluator("linalg.spectrum", version="1")
def spectrum(seed: int, n: int = 64) -> dict:
    """Eigenvalues of a seeded random symmetric n×n matrix, plus its trace and condition number."""
    _side_effect("linalg.spectrum")
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    sym = (a + a.T) / 2.0
    eig = np.linalg.eigvalsh(sym)
    mags = np.abs(eig)
    return {
        "eigenvalues": eig,
        "trace": float(np.trace(sym)),
        "condition": float(mags.max() / max(mags.min(), 1e-300)),
    }


@fabric.evaluator("text.stats", version="1")
def text_stats(text: str, top: int = 5) -> dict:
    """Word and character statistics of ``text``: counts, the ``top`` words, character entropy (bits)."""
    _side_effect("text.stats")
    words = [w.strip(".,;:!?\"'()").lower() for w in text.split()]
    words = [w for w in words if w]
    chars = Counter(text)
    total = sum(chars.values()) or 1
    entropy = -sum((c / total) * math.log2(c / total) for c in chars.values())
    return {
        "words": len(words),
        "unique_words": len(set(words)),
        "chars": len(text),
        "top": [[w, c] for w, c in sorted(Counter(words).items(), key=lambda kv: (-kv[1], kv[0]))[:top]],
        "entropy_bits": round(entropy, 12),
    }


@fabric.evaluator("text.embed", version="1")
def embed(text: str, dim: int = 16) -> np.ndarray:
    """A hashed bag-of-words embedding (BLAKE3 feature hashing), L2-normalised float32."""
    _side_effect("text.embed")
    v = np.zeros(dim, dtype=np.float32)
    for w in text.lower().split():
        h = blake3.blake3(w.encode()).digest(8)
        idx = int.from_bytes(h[:4], "little") % dim
        sign = 1.0 if h[4] & 1 else -1.0
        v[idx] += sign
    norm = float(np.linalg.norm(v))
    return v / norm if norm else v


@fabric.evaluator("slow.square", version="1")
def slow_square(x: int, delay: float = 0.05) -> int:
    """``x * x`` after sleeping ``delay`` seconds: an "expensive" evaluation for concurrency tests."""
    import time

    _side_effect(f"slow.square x={x}")
    time.sleep(delay)
    return x * x


@fabric.evaluator("fail.always", version="1")
def fail_always(message: str = "boom") -> None:
    """Always raises ``ValueError(message)`` (tests that evaluator errors reach the caller unchanged)."""
    _side_effect("fail.always")
    raise ValueError(message)
