"""Layers import downward only: cassette <- gossip, gpu <- fabric (DESIGN.md, "Layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"cassette", "gossip", "gpu", "fabric", "examples"}
ALLOWED = {
    "cassette": set(),
    "gossip": {"cassette"},  # pure cassette modules only (keys, codec, errors); never LMDB
    "gpu": {"cassette"},
    "fabric": {"cassette", "gossip", "gpu"},
}
FORBIDDEN_MODULES = {
    "gossip": {"lmdb", "socket", "cassette.store", "cassette.ledgerfile"},
    "cassette": {"socket"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_imports_point_downward(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"layer {layer} has no modules"
    for f in files:
        for mod in _imports(f):
            top = mod.split(".")[0]
            if top in OURS and top != layer:
                assert top in ALLOWED[layer], f"{f.relative_to(ROOT)} imports {mod}: {layer} may import only {sorted(ALLOWED[layer])}"
            for bad in FORBIDDEN_MODULES.get(layer, ()):
                assert mod != bad and not mod.startswith(bad + "."), f"{f.relative_to(ROOT)} imports {mod}"


def test_importing_gossip_loads_no_lmdb_and_no_ledger():
    """gossip/ needs keys and the codec only: importing it (in a fresh interpreter) must not
    load LMDB or the cassette's ledger modules through ``cassette/__init__``."""
    import subprocess
    import sys

    code = ("import sys, gossip, gossip.holding, gossip.membership, gossip.sim, gossip.runner; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lmdb', 'socket', 'cassette')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout)
    assert not [m for m in loaded if m.startswith("lmdb") or m in ("cassette.store", "cassette.record", "cassette.ledgerfile")], loaded
