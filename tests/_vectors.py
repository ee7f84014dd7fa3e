"""Spec test vectors: find a spec's machine-read JSON block; rebuild values from the
vector value notation (specs/content-key.md section 8).  Shared by the codec and key tests."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np

from cassette.keys import ContentKey

_FENCE = re.compile(r"^```json[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def spec_vectors(path: Path, ident: str) -> dict:
    """The JSON fenced block of ``path`` whose ``"vectors"`` member is ``ident``."""
    found = []
    for block in _FENCE.findall(path.read_text(encoding="utf-8")):
        try:
            doc = json.loads(block)
        except ValueError:
            continue
        if isinstance(doc, dict) and doc.get("vectors") == ident:
            found.append(doc)
    assert len(found) == 1, f"{path.name}: expected one {ident!r} block, found {len(found)}"
    return found[0]


def build(spec):
    """Rebuild a value from the vector value notation (content-key.md section 8)."""
    if spec is None or isinstance(spec, (bool, str)):
        return spec
    if isinstance(spec, list):
        return [build(x) for x in spec]
    if isinstance(spec, dict) and len(spec) == 1:
        ((tag, arg),) = spec.items()
        if tag == "int":
            return int(arg)
        if tag == "f64":
            return float(arg)
        if tag == "f64_bits":
            return struct.unpack(">d", bytes.fromhex(arg))[0]
        if tag == "bytes_hex":
            return bytes.fromhex(arg)
        if tag == "map":
            return {k: build(v) for k, v in arg}
        if tag == "tuple":
            return tuple(build(x) for x in arg)
        if tag == "ndarray":
            a = np.frombuffer(bytes.fromhex(arg["data_hex"]), dtype=np.dtype(arg["dtype"]))
            a = a.reshape(arg["shape"])
            return np.asfortranarray(a) if arg.get("order") == "F" else a.copy()
        if tag == "np_scalar":
            return np.frombuffer(bytes.fromhex(arg["data_hex"]), dtype=np.dtype(arg["dtype"]))[0]
        if tag == "key":
            return ContentKey.parse(arg)
    raise ValueError(f"not vector value notation: {spec!r}")
