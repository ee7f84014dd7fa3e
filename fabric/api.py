"""Module-level API over the default fabric, and :func:`open`.

The default fabric is created on first use from the environment:

* ``FABRIC_NODE=host:port`` (+ ``FABRIC_SECRET`` or ``FABRIC_SECRET_FILE``):
  every call goes through that running peer node;
* otherwise an embedded node whose cassette lives in ``$FABRIC_HOME``, or in
  the user cache directory (``$XDG_CACHE_HOME/evalfabric`` or
  ``~/.cache/evalfabric``; ``~/Library/Caches/evalfabric`` on macOS).
"""

from __future__ import annotations

import builtins
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

from cassette.errors import FabricError, StatusCode
from fabric.local import Fabric
from fabric.request import Reply, Request

__all__ = ["open", "default", "set_default", "realize", "arealize", "put", "get", "get_into", "default_home"]

_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(\d{1,5})$")
_lock = threading.Lock()
_default: Any = None


def _after_fork_in_child() -> None:
    """A forked child makes :data:`_lock` anew: a parent thread may have held it at the fork
    (making the default fabric), and the child's copy would stay held forever.  The default
    fabric itself carries over (embedded or remote, it re-attaches in the child)."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def default_home() -> Path:
    """Where the embedded default cassette lives (see module docstring)."""
    home = os.environ.get("FABRIC_HOME")
    if home:
        return Path(home).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "evalfabric"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "evalfabric"


def _secret_from_env() -> bytes | None:
    s = os.environ.get("FABRIC_SECRET")
    if s:
        return s.encode()
    f = os.environ.get("FABRIC_SECRET_FILE")
    if f:
        return read_secret_file(f)
    return None


def _secret_forms_from_env() -> tuple[bytes, ...]:
    """:func:`_secret_from_env` as a node accepts it (see :func:`secret_file_forms`); () if unset."""
    s = os.environ.get("FABRIC_SECRET")
    if s:
        return (s.encode(),)
    f = os.environ.get("FABRIC_SECRET_FILE")
    return secret_file_forms(f) if f else ()


def read_secret_file(path: str | os.PathLike) -> bytes:
    """A shared secret from a file: its bytes without surrounding whitespace (so
    ``echo secret > F`` works); INVALID_ARGUMENT if nothing is left, or if F holds more
    than :data:`MAX_SECRET_FILE_BYTES` (it is never read whole).  A node that
    reads F also accepts clients proving F's exact bytes (:func:`secret_file_forms`)."""
    return secret_file_forms(path)[0]


#: a secret file larger than this is refused (INVALID_ARGUMENT), not read whole
MAX_SECRET_FILE_BYTES = 64 << 10


def secret_file_forms(path: str | os.PathLike) -> tuple[bytes, ...]:
    """The secrets a node reading ``path`` accepts: its bytes without surrounding
    whitespace (the one it dials peers with) and, when different, its exact bytes
    (a client passing ``secret=open(F, "rb").read()``)."""
    try:
        with builtins.open(path, "rb") as f:
            raw = f.read(MAX_SECRET_FILE_BYTES + 1)  # bounded: /dev/zero or a huge file is not read into memory
    except OSError as exc:
        raise FabricError(StatusCode.FAILED_PRECONDITION, f"cannot read secret file {path}: {exc.strerror}") from None
    if len(raw) > MAX_SECRET_FILE_BYTES:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"secret file {path} is larger than {MAX_SECRET_FILE_BYTES} bytes")
    data = raw.strip()
    if not data:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"secret file {path} is empty")
    return (data,) if raw == data else (data, raw)


#: a secret shorter than this is accepted with a warning (a node logs one)
SECRET_ADVISED_BYTES = 16


def is_address(target: Any) -> bool:
    """Whether ``target`` is a ``HOST:PORT`` string (rather than a directory path)."""
    return isinstance(target, str) and bool(_ADDRESS.match(target)) and not os.path.isdir(target)


def open(target: str | os.PathLike | None = None, *, secret: bytes | str | None = None, **kwargs: Any) -> Any:
    """An explicit fabric: ``open(path)`` embeds a node over that directory;
    ``open("host:port", secret=...)`` connects to a running node.  With no
    target, the default location (``$FABRIC_HOME`` / user cache dir)."""
    if target is None:
        target = default_home()
    if is_address(target):
        from fabric import remote

        if secret is None:
            secret = _secret_from_env()
        if secret is None:
            raise FabricError(StatusCode.UNAUTHENTICATED, f"connecting to {target} needs secret= (or FABRIC_SECRET / FABRIC_SECRET_FILE)")
        return remote.RemoteFabric(str(target), secret.encode() if isinstance(secret, str) else secret, **kwargs)
    return Fabric(target, **kwargs)


#: the environment variables the default fabric is made from (see the module docstring)
_ENV_VARS = ("FABRIC_NODE", "FABRIC_SECRET", "FABRIC_SECRET_FILE", "FABRIC_HOME", "XDG_CACHE_HOME")
_default_env: tuple | None = None  # _environment() when _default was made from it; None when set by set_default
try:  # os.environ's own dict: a lookup there is ~25 ns, os.environ.get ~1 us (checked on every call)
    _ENV_DATA = os.environ._data  # type: ignore[attr-defined]
    _ENV_KEYS = tuple(os.environ.encodekey(v) for v in _ENV_VARS)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - another Python
    _ENV_DATA, _ENV_KEYS = None, ()


def _environment() -> tuple:
    """The values of :data:`_ENV_VARS` now (raw, as the process environment holds them)."""
    if _ENV_DATA is not None:
        get = _ENV_DATA.get
        return tuple(get(k) for k in _ENV_KEYS)
    return tuple(os.environ.get(v) for v in _ENV_VARS)  # pragma: no cover


def default() -> Any:
    """The process's default fabric, made from the environment on first use.

    It follows the environment: when ``FABRIC_NODE``, ``FABRIC_SECRET(_FILE)``,
    ``FABRIC_HOME`` or ``XDG_CACHE_HOME`` has changed since it was made, the next
    call closes it and makes a new one (so a test that sets ``FABRIC_HOME`` gets
    its own cassette).  A fabric installed with :func:`set_default` stays until
    replaced, whatever the environment says.
    """
    global _default, _default_env
    fab = _default
    if fab is not None and (_default_env is None or _default_env == _environment()):
        return fab
    old = None
    with _lock:
        env = _environment()
        if _default is None or (_default_env is not None and _default_env != env):
            node = os.environ.get("FABRIC_NODE")
            made = open(node) if node else open(default_home())
            old, _default, _default_env = _default, made, env
        fab = _default
    if old is not None:
        old.close()
    return fab


def set_default(fab: Any) -> Any:
    """Install ``fab`` as the default fabric, kept whatever the environment says
    (``None``: make it from the environment again on next use); returns the old one,
    which the caller now owns (it is not closed)."""
    global _default, _default_env
    with _lock:
        old, _default, _default_env = _default, fab, None
    return old


def realize(req: Request, *, device: Any = None, **kw: Any) -> Reply:
    """Realize ``req`` on the default fabric.  ``device="cuda:0"`` returns numpy values as CuPy arrays."""
    return default().realize(req, device=device, **kw)


async def arealize(req: Request, *, device: Any = None, **kw: Any) -> Reply:
    """:func:`realize` under trio."""
    return await default().arealize(req, device=device, **kw)


def put(data: Any, **kw: Any):
    """Store an artifact on the default fabric; returns its ArtifactRef."""
    return default().put(data, **kw)


def get(key: Any):
    """An artifact (bytes / numpy) or a reply value from the default fabric."""
    return default().get(getattr(key, "key", key))


def get_into(key: Any, out: Any):
    """Fill ``out`` (numpy or CuPy) with an artifact from the default fabric; returns ``out``."""
    return default().get_into(getattr(key, "key", key), out)


def _default_artifact_stream(key):
    return default().artifact_stream(key)


def _install_gpu_source() -> None:
    import gpu

    gpu.set_default_source(_default_artifact_stream)


_install_gpu_source()
