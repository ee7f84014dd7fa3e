"""fabric.allocator: the heap settings of the processes evalfabric owns (what they buy is
shown by tests/test_node.py's page-fault test of a serving node)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, *argv: str) -> str:
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the heap thresholds are glibc's (mallopt)")
def test_a_cli_command_sets_the_heap_thresholds(tmp_path):
    code = ("import sys; from fabric import allocator, cli; cli.main(['verify', '--data', sys.argv[1]]); "
            "print(allocator._applied, allocator.keep_freed_memory())")
    assert _python(code, str(tmp_path / "none")).splitlines()[-1] == "True True"


def test_importing_the_library_leaves_the_heap_settings_alone():
    assert _python("import fabric, fabric.remote, fabric.net, fabric.local; from fabric import allocator; "
                   "print(allocator._applied)") == "None"
