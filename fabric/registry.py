"""The evaluator registry: ``@fabric.evaluator(name, version=...)``.

An evaluator is a function ``fn(**args) -> value`` named by ``name`` and
``version``; both are part of every request key, so bumping the version
invalidates nothing and recomputes everything.  Registering the same name and
version twice with a *different* function is FAILED_PRECONDITION; registering
the same function again (the same object, or the same definition made anew:
same module, qualified name and code, e.g. a module reload) replaces it
silently, in its place.  The "latest" version of a name is the last *new*
version registered for it, so reloading a module of older versions does not
make them the latest again.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cassette.errors import FabricError, StatusCode

__all__ = ["Evaluator", "evaluator", "lookup", "latest_version", "registered", "load_evaluators"]


@dataclass(frozen=True)
class Evaluator:
    """A registered evaluator: its name, version and the function that computes it."""

    name: str
    version: str
    fn: Callable[..., Any]

    @property
    def is_async(self) -> bool:
        """Whether ``fn`` is a coroutine function (run under trio)."""
        return inspect.iscoroutinefunction(self.fn)

    def _arg_problem(self, args: dict) -> str | None:
        """What is wrong with ``args`` for this function's signature, or None."""
        try:
            params = inspect.signature(self.fn).parameters
        except (TypeError, ValueError):
            return None  # no introspectable signature: let the call decide
        P = inspect.Parameter
        named = {n: p for n, p in params.items() if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
        takes_any = any(p.kind is P.VAR_KEYWORD for p in params.values())
        unexpected = [k for k in args if k not in named and not takes_any]
        missing = [n for n, p in named.items() if p.default is P.empty and n not in args]
        if not unexpected and not missing:
            return None
        parts = []
        if unexpected:
            parts.append("unexpected " + ", ".join(repr(k) for k in unexpected))
        if missing:
            parts.append("missing " + ", ".join(repr(k) for k in missing))
        return f"{'; '.join(parts)} (evaluator {self.name}@{self.version} takes {', '.join(named) or 'no arguments'})"

    def call(self, args: dict) -> Any:
        """Run the evaluator on ``args`` (keyword arguments) and return its value.

        Arguments that do not fit the function's signature are INVALID_ARGUMENT
        (checked before the call, so the evaluator's own TypeErrors stay its own).
        """
        problem = self._arg_problem(args)
        if problem:
            raise FabricError(StatusCode.INVALID_ARGUMENT, f"args: {problem}")
        if self.is_async:
            import functools

            import trio

            return trio.run(functools.partial(self.fn, **args))
        return self.fn(**args)


_lock = threading.Lock()
_by_name: dict[str, dict[str, Evaluator]] = {}
#: name -> its latest version (the last key of ``_by_name[name]``), kept by :func:`register`:
#: every ``Request`` naming no version reads it
_latest: dict[str, str] = {}


def _after_fork_in_child() -> None:
    """A forked child makes :data:`_lock` anew: a parent thread may have held it at the fork
    (registering, or listing for a NOT_FOUND), and the child's copy would stay held forever."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _norm_version(version: Any) -> str:
    if isinstance(version, bool) or not isinstance(version, (str, int)):
        # the type, never a repr: the value may come off the wire (a nested list's repr recurses)
        got = repr(version) if version is None or type(version) in (bool, float) else type(version).__name__
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"evaluator version must be a str (or int), got {got}")
    v = str(version)
    if not v:
        raise FabricError(StatusCode.INVALID_ARGUMENT, "evaluator version must not be empty")
    return v


def _same_function(a: Callable, b: Callable) -> bool:
    """Whether ``b`` is ``a`` registered again: the same object, or the same definition
    made anew (a module reload, a notebook cell run again): same module and qualified
    name, equal code, defaults, closure values and bound ``self``; for a
    ``functools.partial``, the same function with equal arguments; for another
    callable object, the same class and equal attributes.  Anything that cannot be
    compared counts as different."""
    if a is b:
        return True
    if isinstance(a, functools.partial) or isinstance(b, functools.partial):
        return (type(a) is type(b) and _same_function(a.func, b.func)  # type: ignore[union-attr]
                and _equal(a.args, b.args) and _equal(a.keywords, b.keywords))  # type: ignore[union-attr]
    code_a, code_b = getattr(a, "__code__", None), getattr(b, "__code__", None)
    if code_a is not None or code_b is not None:
        return (
            getattr(a, "__module__", None) == getattr(b, "__module__", None)
            and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
            and code_a == code_b
            and _equal(getattr(a, "__defaults__", None), getattr(b, "__defaults__", None))
            and _equal(getattr(a, "__kwdefaults__", None), getattr(b, "__kwdefaults__", None))
            and _equal(_cell_values(a), _cell_values(b))
            and _equal(getattr(a, "__self__", None), getattr(b, "__self__", None))
        )
    ta, tb = type(a), type(b)
    return (
        (ta.__module__, ta.__qualname__) == (tb.__module__, tb.__qualname__)
        and hasattr(a, "__dict__") and hasattr(b, "__dict__")
        and _equal(_state(a), _state(b))
    )


#: attributes :func:`evaluator` sets on what it decorates (not part of a callable object's state)
_ADDED = frozenset({"request", "realize", "evaluator_name", "evaluator_version"})


def _state(obj: Any) -> dict:
    return {k: v for k, v in vars(obj).items() if k not in _ADDED}


def _equal(x: Any, y: Any) -> bool:
    try:
        return x is y or bool(x == y)
    except Exception:  # noqa: BLE001 - e.g. numpy arrays: ambiguous truth value
        return False


def _cell_values(fn: Any) -> list | None:
    cells = getattr(fn, "__closure__", None)
    if cells is None:
        return None
    out = []
    for c in cells:
        try:
            out.append(c.cell_contents)
        except ValueError:  # an empty cell
            out.append(_EMPTY_CELL)
    return out


_EMPTY_CELL = object()


def register(name: str, version: Any, fn: Callable[..., Any]) -> Evaluator:
    """Register ``fn`` as ``name``/``version`` (see module docstring for conflicts)."""
    if not isinstance(name, str) or not name:
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"evaluator name must be a non-empty str, got {name!r}")
    v = _norm_version(version)
    ev = Evaluator(name, v, fn)
    with _lock:
        versions = _by_name.setdefault(name, {})
        old = versions.get(v)
        if old is not None and not _same_function(old.fn, fn):
            raise FabricError(
                StatusCode.FAILED_PRECONDITION,
                f"evaluator {name!r} version {v!r} is already registered to another function "
                f"({_describe(old.fn)}); bump the version to register a different function",
            )
        versions[v] = ev  # a new version goes last (the latest); the same one again keeps its place
        _latest[name] = next(reversed(versions))
    return ev


def _describe(fn: Any) -> str:
    """``module.qualname`` of a function (or of a callable object's class)."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


def evaluator(name: str | Callable | None = None, *, version: Any = "1") -> Callable[[Callable], Callable]:
    """Decorator registering a function as an evaluator; returns the function unchanged.

    ``name`` defaults to the function's ``__name__`` (bare ``@evaluator`` works too).  The function gains
    ``fn.request(**args)`` (a :class:`fabric.Request` for it) and
    ``fn.realize(**args)`` (realize that request on the default fabric).
    """

    def deco(fn: Callable) -> Callable:
        ev = register(name or fn.__name__, version, fn)

        def request(**args: Any):
            from fabric.request import Request

            return Request(ev.name, args, version=ev.version)

        def realize(**args: Any):
            from fabric import api

            return api.realize(request(**args))

        fn.request = request  # type: ignore[attr-defined]
        fn.realize = realize  # type: ignore[attr-defined]
        fn.evaluator_name = ev.name  # type: ignore[attr-defined]
        fn.evaluator_version = ev.version  # type: ignore[attr-defined]
        return fn

    if callable(name):  # bare @evaluator: ``name`` is the function itself
        fn, name = name, None
        return deco(fn)
    return deco


def latest_version(name: str) -> str | None:
    """The last new version of ``name`` registered (see module docstring), or ``None`` if ``name`` is unknown."""
    return _latest.get(name)


def lookup(name: str, version: str | None = None) -> Evaluator:
    """The registered evaluator, or NOT_FOUND naming it and listing what is registered."""
    versions = _by_name.get(name)
    if versions:  # (single dict reads: safe while another thread registers)
        ev = versions.get(_latest.get(name) if version is None else version)
        if ev is not None:
            return ev
        with _lock:  # the message iterates the table: not while it changes
            listed = ", ".join(versions)
        raise FabricError(StatusCode.NOT_FOUND, f"evaluator {name!r} has no version {version!r}; registered versions: {listed}")
    with _lock:
        known = ", ".join(f"{n}@{v}" for n, vs in sorted(_by_name.items()) for v in vs) or "none"
    raise FabricError(StatusCode.NOT_FOUND, f"no evaluator named {name!r}; registered: {known}")


def registered() -> list[tuple[str, str]]:
    """All registered ``(name, version)`` pairs, sorted."""
    with _lock:
        return sorted((n, v) for n, vs in _by_name.items() for v in vs)


def _imported_from(file: Path) -> bool:
    """Whether a module in ``sys.modules`` was loaded from ``file`` (a resolved path): then a
    load of that file by path is the same module again (``examples/evaluators.py`` after
    ``import examples.evaluators``), not other functions under the same names."""
    for module in list(sys.modules.values()):
        origin = getattr(module, "__file__", None)
        if isinstance(origin, str) and os.path.basename(origin) == file.name:
            try:
                if Path(origin).resolve() == file:
                    return True
            except OSError:
                continue
    return False


def load_evaluators(spec: str) -> None:
    """Import evaluators from a module path (``examples.evaluators``) or a ``.py`` file path.

    Module paths are resolved with the current directory first on ``sys.path``,
    as ``python -m`` does.  Failure is NOT_FOUND / INVALID_ARGUMENT with one line.
    """
    path = Path(spec)
    try:
        if spec.endswith(".py") or path.is_file():
            if not path.is_file():
                raise FabricError(StatusCode.NOT_FOUND, f"evaluator file {spec} does not exist")
            if _imported_from(path.resolve()):
                return  # already imported (as a package module, or by path): its evaluators are registered
            mod_name = "fabric_evaluators_" + path.stem
            s = importlib.util.spec_from_file_location(mod_name, path.resolve())
            if s is None or s.loader is None:  # a file without a Python source suffix
                raise FabricError(StatusCode.INVALID_ARGUMENT, f"evaluator file {spec} is not a Python source file (.py)")
            module = importlib.util.module_from_spec(s)
            sys.modules[mod_name] = module
            s.loader.exec_module(module)
        else:
            cwd = os.getcwd()
            if cwd not in sys.path:
                sys.path.insert(0, cwd)
            if spec not in sys.modules:
                found = importlib.util.find_spec(spec)
                if found is not None and isinstance(found.origin, str) and _imported_from(Path(found.origin).resolve()):
                    return  # its file was loaded by path already: the same evaluators
            importlib.import_module(spec)
    except FabricError:
        raise
    except ModuleNotFoundError as exc:
        raise FabricError(StatusCode.NOT_FOUND, f"cannot import evaluators {spec!r}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a user module may fail in any way
        raise FabricError(StatusCode.INVALID_ARGUMENT, f"importing evaluators {spec!r} failed: {type(exc).__name__}: {exc}") from None
