"""The numbers the specs and the README state, against the code that holds them.

Every spec under ``specs/`` ends with a machine-read table ``| constant | value | stated as |``:
``constant`` names a code constant (``module.NAME``, ``module.Class.attr``, or
``module.Class(param)`` for a parameter default), ``value`` is its value as the spec writes
it (``65,536``, ``4 MiB``, ``2³¹−1``, ``0.4``, ``300 s``, ``0x01``, or a string in backticks),
and ``stated as`` quotes (“…”, joined by ``·``) the phrases of the spec's own text that state
that number. For every row the constant must have the value, and every phrase must occur in
the spec outside the table and contain the value exactly as the table writes it. A number
changed in the code, in the prose or in the table alone therefore fails here.

specs/errors.md's tables of codes and retry policies are read as they stand, and so is the
op table of specs/wire.md section 13; README.md's limits are checked from :data:`README_CLAIMS`.
"""

from __future__ import annotations

import codecs
import importlib
import inspect
import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
README = ROOT / "README.md"

#: specs that must carry a constants table
WITH_CONSTANTS = ("wire.md", "gossip.md", "cassette-format.md", "codec.md", "errors.md")

_HEADER = ("constant", "value", "stated as")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_PHRASE = re.compile(r"“([^”]+)”")
_SUPERSCRIPT = re.compile(r"([0-9])([⁰¹²³⁴⁵⁶⁷⁸⁹]+)")
_SUPER_DIGITS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
_UNITS = {None: 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "s": 1, "ms": Fraction(1, 1000)}
_NUMBER = re.compile(
    r"(?:(?P<pow>[0-9]+)\^(?P<exp>[0-9]+)(?:\s*-\s*(?P<minus>[0-9]+))?|(?P<hex>0x[0-9a-fA-F]+)|(?P<dec>[0-9]+(?:\.[0-9]+)?))"
    r"(?:\s*(?P<unit>KiB|MiB|GiB|B|ms|s))?"
)


def _cells(line: str) -> list[str]:
    """The cells of one markdown table row (``\\|`` is a literal pipe inside a cell)."""
    inner = line.strip()
    assert inner.startswith("|") and inner.endswith("|"), line
    return [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(inner[1:-1])]


def _is_row(line: str) -> bool:
    return line.startswith("|") and line.rstrip().endswith("|")


def tables(text: str, header: tuple[str, ...]) -> list[tuple[list[dict[str, str]], tuple[int, int]]]:
    """Every markdown table of ``text`` whose header row is ``header``: its rows as maps, and
    the span of lines (start, end) it takes."""
    lines = text.splitlines()
    found = []
    i = 0
    while i < len(lines):
        if _is_row(lines[i]) and tuple(c.lower() for c in _cells(lines[i])) == header:
            start, i = i, i + 2  # header and the |---| rule
            rows = []
            while i < len(lines) and _is_row(lines[i]):
                cells = _cells(lines[i])
                assert len(cells) == len(header), f"table row with {len(cells)} cells, expected {len(header)}: {lines[i]}"
                rows.append(dict(zip(header, cells)))
                i += 1
            found.append((rows, (start, i)))
        else:
            i += 1
    return found


def parse_value(cell: str) -> Any:
    """A table value: a backticked string (backslash escapes apply), or a number with an optional
    unit (B, KiB, MiB, GiB: bytes; s, ms: seconds), written ``65,536``, ``2³¹−1``, ``2^63 - 1``,
    ``0x01`` or ``0.4``. Numbers come back exact (int or Fraction)."""
    if len(cell) >= 2 and cell[0] == cell[-1] == "`":
        return codecs.decode(cell[1:-1], "unicode_escape")
    text = _SUPERSCRIPT.sub(lambda m: f"{m.group(1)}^{m.group(2).translate(_SUPER_DIGITS)}", cell)
    text = re.sub(r"(?<=[0-9])[,_](?=[0-9]{3})", "", text.replace("−", "-"))
    m = _NUMBER.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not a spec value: {cell!r}")
    if m["pow"]:
        n = Fraction(int(m["pow"]) ** int(m["exp"]) - int(m["minus"] or 0))
    elif m["hex"]:
        n = Fraction(int(m["hex"], 16))
    else:
        n = Fraction(m["dec"])
    n *= _UNITS[m["unit"]]
    return int(n) if n.denominator == 1 else n


def resolve(path: str) -> Any:
    """The value of ``module.NAME``, ``module.Class.attr`` or ``module.Callable(param)`` (that
    parameter's default)."""
    m = re.fullmatch(r"([A-Za-z_][\w.]*)(?:\((\w+)\))?", path)
    assert m, f"not a constant path: {path!r}"
    parts = m.group(1).split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            continue
    else:
        raise AssertionError(f"no module in {path!r}")
    for attr in parts[i:]:
        obj = getattr(obj, attr)
    if m.group(2):
        obj = inspect.signature(obj).parameters[m.group(2)].default
    return obj


def same(code: Any, spec: Any) -> bool:
    """Whether a code constant equals a spec value (floats to within rounding of the decimal)."""
    if isinstance(spec, str):
        return (code.decode("utf-8") if isinstance(code, bytes) else code) == spec
    if isinstance(code, bool) or not isinstance(code, (int, float)):
        return False
    if isinstance(code, float):
        return math.isclose(code, float(spec), rel_tol=1e-12, abs_tol=0.0)
    return code == spec


def _flat(text: str) -> str:
    return " ".join(text.split())


def constants(spec: Path) -> tuple[list[dict[str, str]], str]:
    """The constants table of ``spec`` and the spec's text without it (whitespace folded)."""
    text = spec.read_text(encoding="utf-8")
    found = tables(text, _HEADER)
    assert len(found) == 1, f"{spec.name}: expected one `| constant | value | stated as |` table, found {len(found)}"
    rows, (start, end) = found[0]
    lines = text.splitlines()
    return rows, _flat("\n".join(lines[:start] + lines[end:]))


def _rows():
    for name in WITH_CONSTANTS:  # a spec without its table fails test_every_normative_spec_has_a_constants_table
        for rows, _ in tables((SPECS / name).read_text(encoding="utf-8"), _HEADER)[:1]:
            for row in rows:
                yield pytest.param(name, row, id=f"{name}:{row['constant'].strip('`')}")


def check_row(where: str, row: dict[str, str], text: str) -> None:
    """One ``constant | value | stated as`` row against the code and against ``text``."""
    path = row["constant"].strip("`")
    want = parse_value(row["value"])
    got = resolve(path)
    assert same(got, want), f"{where}: {path} is {got!r} in the code, the spec says {row['value']} ({want!r})"
    phrases = _PHRASE.findall(row["stated as"])
    if isinstance(want, str):
        assert want in text or row["value"].strip("`") in text, f"{where}: {row['value']} does not occur in the text"
    else:
        assert phrases, f"{where}: {path}: quote the phrase that states {row['value']}"
    for phrase in phrases:
        phrase = _flat(phrase)
        assert row["value"] in phrase, f"{where}: the phrase “{phrase}” does not contain {row['value']}"
        assert phrase in text, f"{where}: “{phrase}” ({path}) no longer occurs in the text"


def test_every_normative_spec_has_a_constants_table():
    for name in WITH_CONSTANTS:
        rows, _ = constants(SPECS / name)
        assert rows, name


@pytest.mark.parametrize("spec, row", list(_rows()))
def test_spec_constant_matches_the_code_and_the_text(spec, row):
    _, text = constants(SPECS / spec)
    check_row(spec, row, text)


def test_value_parser_reads_the_forms_the_specs_use():
    assert parse_value("65,536") == 65_536
    assert parse_value("4 MiB") == 4 << 20 and parse_value("1 GiB") == 1 << 30 and parse_value("512 B") == 512
    assert parse_value("2³¹−1") == 2**31 - 1 and parse_value("2^63 − 1") == 2**63 - 1 and parse_value("2^20") == 1 << 20
    assert parse_value("0x02") == 2 and parse_value("0.4") == Fraction(2, 5) and parse_value("5 ms") == Fraction(1, 200)
    assert parse_value("300 s") == 300 and parse_value("`a\\nb`") == "a\nb"
    with pytest.raises(ValueError):
        parse_value("about 3")


# -- specs/errors.md: the codes table and the retry policy table, read as they stand ---------


def _errors_table(header: tuple[str, ...]) -> list[dict[str, str]]:
    found = tables((SPECS / "errors.md").read_text(encoding="utf-8"), header)
    assert len(found) == 1, f"errors.md: expected one table {header}"
    return found[0][0]


def test_errors_spec_codes_are_the_status_codes_and_their_retry_column_is_the_helpers():
    from fabric.errors import RETRYABLE_CODES, FabricError, RetryPolicy, StatusCode, is_retryable, retry_call

    rows = _errors_table(("code", "value", "raised when", "retried"))
    spec = {r["code"]: (int(r["value"]), r["retried"]) for r in rows}
    assert {n: v for n, (v, _) in spec.items()} == {c.name: c.value for c in StatusCode}
    assert {r for _, r in spec.values()} == {"yes", "no"}
    assert {n for n, (_, r) in spec.items() if r == "yes"} == {c.name for c in RETRYABLE_CODES}
    for name, (_, retried) in spec.items():
        err = FabricError(StatusCode[name], "m")
        assert err.retryable is (retried == "yes") and is_retryable(err) is (retried == "yes"), name
        calls = []

        def once(code=StatusCode[name]):
            calls.append(1)
            if len(calls) == 1:
                raise FabricError(code, "first try fails")
            return "ok"

        policy = RetryPolicy(attempts=2, deadline_s=10.0, base_delay_s=0.0, max_delay_s=0.0)
        if retried == "yes":
            assert retry_call(once, op="spec", policy=policy, sleep=lambda s: None) == "ok" and len(calls) == 2, name
        else:
            with pytest.raises(FabricError):
                retry_call(once, op="spec", policy=policy, sleep=lambda s: None)
            assert len(calls) == 1, name


def test_errors_spec_retry_table_is_the_default_policies():
    from fabric.errors import DEFAULT_POLICIES

    rows = _errors_table(("operation", "overall deadline", "attempts"))
    spec = {r["operation"]: (parse_value(r["overall deadline"]), int(r["attempts"])) for r in rows}
    assert spec == {op: (p.deadline_s, p.attempts) for op, p in DEFAULT_POLICIES.items()}


# -- specs/wire.md section 13: the reserved op names and the realize body --------------------


def _wire_ops() -> dict[str, dict[str, str]]:
    found = tables((SPECS / "wire.md").read_text(encoding="utf-8"), ("op", "`open` body", "stream", "final `close` body / faults"))
    assert len(found) == 1, "wire.md: expected one op table"
    return {m.group(1): r for r in found[0][0] if (m := re.fullmatch(r"`(\w+)`", r["op"]))}


def test_wire_spec_op_table_names_exactly_the_ops_a_node_serves():
    from fabric import admin, serve

    ops = _wire_ops()
    assert set(ops) == set(serve._NODE_OPS), "specs/wire.md section 13 and fabric/serve.py disagree on the ops"
    assert admin.OPS <= set(ops)


def test_wire_spec_realize_body_names_every_field_a_node_reads():
    # fabric/serve.py reads evaluator, version, args and the key hint; fabric/fleet.py sends home
    fields = set(re.findall(r'"(\w+)":', _wire_ops()["realize"]["`open` body"]))
    assert fields == {"evaluator", "version", "args", "key", "home"}


# -- README.md ------------------------------------------------------------------------------

#: (phrase README.md states, constant, value as the phrase writes it)
README_CLAIMS = [
    ("A secret file over 64 KiB is refused unread", "fabric.api.MAX_SECRET_FILE_BYTES", "64 KiB"),
    ("use 32 random bytes; < 16 logs a warning", "fabric.api.SECRET_ADVISED_BYTES", "16"),
    ("and `--node-id` (1-128 UTF-8 bytes", "fabric.wire.MAX_NODE_ID_BYTES", "128"),
    ("for `--idle-timeout` seconds (default 300)", "fabric.wire.StreamFrameLimits.idle_timeout_s", "300"),
    ("(op `holders`, in parallel, within 2 s)", "fabric.fleet.ASK_HOLDERS_S", "2 s"),
    ("answers a `lookup` of up to 256 request keys", "fabric.serve.LOOKUP_MAX", "256"),
    ("a realize or fetch of a held key (record ≤ 1 MiB) is answered with no task", "fabric.serve.INLINE_MAX", "1 MiB"),
    ("(4 in flight each, a shared queue", "fabric.fleet.FETCH_PER_HOLDER", "4"),
    ("sends `obtaining` heartbeats every 5 s", "fabric.serve.OBTAIN_HEARTBEAT_S", "5 s"),
    ("move rows in batches capped at 8 MiB", "cassette.store.SCAN_BATCH_BYTES", "8 MiB"),
    ("move rows in batches capped at 8 MiB", "cassette.ledgerfile.REPLAY_BATCH_BYTES", "8 MiB"),
    ("freed memory up to 64 MiB kept", "fabric.allocator.TRIM_THRESHOLD_BYTES", "64 MiB"),
    ("buffers under 32 MiB from the heap", "fabric.allocator.MMAP_THRESHOLD_BYTES", "32 MiB"),
]


@pytest.mark.parametrize("phrase, path, value", README_CLAIMS, ids=[c[1] for c in README_CLAIMS])
def test_readme_limit_matches_the_code(phrase, path, value):
    check_row("README.md", {"constant": path, "value": value, "stated as": f"“{phrase}”"}, _flat(README.read_text(encoding="utf-8")))


def test_readme_demo_flag_bounds_are_the_demo_limits():
    from fabric.demo import LIMITS

    text = _flat(README.read_text(encoding="utf-8"))
    m = re.search(r"so the flags are bounded: (.*?)\.", text)
    assert m, "README.md no longer states the demo's flag bounds"
    stated = {flag: (parse_value(lo), parse_value(hi)) for flag, lo, hi in re.findall(r"`(--[a-z]+)` ([0-9]+(?:,[0-9]{3})*)-([0-9]+(?:,[0-9]{3})*)", m.group(1))}
    assert stated == {flag: (lo, hi) for flag, _, lo, hi in LIMITS}
