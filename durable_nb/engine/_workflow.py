"""``@durable`` workflows: what a workflow is, and the versions of each that this process
defines.

A :class:`Workflow` wraps an ``async def workflow(ctx, ...)``: its name (which names derived
run ids), its argument binder and code version, its ``strict`` flag and its version. Calling
it runs it to completion; ``dn.start`` / ``dn.run`` (``_driver.py``) start its runs. With
``@durable(version=...)`` several versions of one workflow live side by side: a run
finishes on the version it started on (:func:`for_run`), a new run takes the newest
(:func:`newest`).
"""

from __future__ import annotations

import functools
import inspect
import re
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Generic, ParamSpec, TypeVar, cast, overload

from .. import _hashing
from .._journal import check_name
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    BlockingCallError,
    WorkflowVersionError,
)
from ..store import RunRecord
from ._runtime import current_scope, running_loop, runtime
from ._state import RunState

__all__ = ["Workflow", "defined", "durable", "for_run", "newest", "version_of"]

P = ParamSpec("P")
R = TypeVar("R")


class Workflow(Generic[P, R]):
    """A durable workflow (see :func:`durable`). Call it to run it to completion."""

    def __init__(
        self,
        fn: Callable[..., Coroutine[Any, Any, R]],
        *,
        name: str | None = None,
        strict: bool = False,
        version: str | None = None,
    ) -> None:
        if version is not None and (
            not isinstance(version, str) or not version or len(version) > 100
        ):
            raise ArgumentError(
                f"version must be a non-empty str of at most 100 characters, got {version!r}"
            )
        if not inspect.iscoroutinefunction(fn):
            raise ArgumentTypeError(
                f"@durable needs an async function (async def {getattr(fn, '__name__', '?')}"
                f"(ctx, ...)), got {fn!r}"
            )
        params = list(inspect.signature(fn).parameters.values())
        if not params or params[0].kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            raise ArgumentTypeError(
                f"a @durable workflow takes the run's Context as its first parameter: "
                f"async def {fn.__name__}(ctx, ...)"
            )
        self.fn = fn
        self.name = check_name(name, "name") if name is not None else _hashing.effect_identity(fn)
        self.strict = bool(strict)
        self.binder = _hashing.ArgBinder(fn, skip_first=True)
        self.source_version: str | None = None  # set by %%durable: the cell's own code version
        # set by %%durable: a completed run executes again, replaying every step, so the
        # cell's names and output come back (its recorded result alone would not do that)
        self.replay_completed = False
        self.version = version
        functools.update_wrapper(self, fn)  # __name__, __doc__, __wrapped__ for introspection
        with _versions_lock:  # what dn.resume / dn.fork find by name (a rerun cell replaces it)
            _defined[self.name] = self
        if version is not None:
            with _versions_lock:  # a redefinition (a rerun cell) replaces that version
                _versions.setdefault(self.name, {})[version] = self

    def __repr__(self) -> str:
        if self.version is not None:
            return f"<durable workflow {self.name} version {self.version!r}>"
        return f"<durable workflow {self.name}>"

    @property
    def code_version(self) -> str:
        """A hash of the workflow's normalized source: a completed run whose code changed
        executes again (replaying its recorded steps) instead of returning a stale result.
        A versioned workflow's code version is its version: edits within it do not count."""
        if self.source_version is None and self.version is not None:
            return "v:" + self.version
        return self.source_version or _hashing.code_version(self.fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        # (a sync effect in a worker thread may block: the run's loop goes on meanwhile)
        if isinstance(current_scope.get(), RunState) and running_loop() is not None:
            raise BlockingCallError(
                f"calling workflow {self.name} inside a run would block it; use "
                f"`await ctx.child({self.fn.__name__}, ...)` instead"
            )
        return runtime.start_run(self, args, kwargs, blocking=True).result()

    def run_id_for(self, *args: Any, **kwargs: Any) -> str:
        """The run id derived from the workflow's name and its arguments."""
        return f"{self.name}:{self.binder.input_hash(args, kwargs)[:16]}"


@overload
def durable(fn: Callable[..., Coroutine[Any, Any, R]], /) -> Workflow[..., R]: ...


@overload
def durable(
    *, name: str | None = None, strict: bool = False, version: str | None = None
) -> Callable[[Callable[..., Coroutine[Any, Any, R]]], Workflow[..., R]]: ...


def durable(
    fn: Any = None, /, *, name: str | None = None, strict: bool = False, version: str | None = None
) -> Any:
    """Make an ``async def workflow(ctx, ...)`` resumable (guide, "How it works").

    ``name`` replaces ``module.qualname`` (it names derived run ids); ``strict`` raises
    :class:`NonDeterminismError` when a replay departs from the recorded order.

    ``version`` makes versions of one workflow (one ``name``) live side by side: a run
    started on a version finishes on it (its ``RunRecord.version``), whichever version's
    object is passed to ``start``/``run``; a new run (and a run's next generation after
    ``continue_as_new``) takes the newest defined version (compared like "1" < "2" < "10");
    resuming a run whose version is no longer defined raises
    :class:`~durable_nb.errors.WorkflowVersionError`.
    """
    if fn is None:
        return lambda f: Workflow(f, name=name, strict=strict, version=version)
    return Workflow(fn, name=name, strict=strict, version=version)


# every version of every versioned workflow defined in this process: name -> version -> it
_versions: dict[str, dict[str, Workflow[..., Any]]] = {}
# the workflow last defined under each name in this process (a %%durable cell's too)
_defined: dict[str, Workflow[..., Any]] = {}
_versions_lock = threading.Lock()


def defined(name: str) -> Workflow[..., Any] | None:
    """The workflow this process last defined as ``name`` (what a run names in its record),
    or None: how a run is resumed or forked by its id alone."""
    with _versions_lock:
        return _defined.get(name)


def _version_order(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order: numbers compare as numbers ("2" < "10"), the rest as text."""
    parts = re.findall(r"\d+|\D+", version)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def newest(wf: Workflow[..., R]) -> Workflow[..., R]:
    """The workflow a new run (or generation) of ``wf``'s name executes."""
    if wf.version is None:
        return wf
    with _versions_lock:
        known = dict(_versions.get(wf.name, {}))
    if not known:
        return wf
    return cast(Workflow[..., R], known[max(known, key=_version_order)])


def for_run(wf: Workflow[..., R], rec: RunRecord) -> Workflow[..., R]:
    """The workflow an existing run executes: the version it started on."""
    if not rec.version or wf.version == rec.version:
        return wf
    with _versions_lock:
        known = dict(_versions.get(wf.name, {}))
    found = known.get(rec.version)
    if found is None:
        defined = ", ".join(repr(v) for v in sorted(known, key=_version_order)) or "none"
        raise WorkflowVersionError(
            f"run {rec.run_id!r} started on version {rec.version!r} of workflow {wf.name!r}, "
            f"which is not defined in this process (defined versions: {defined}); define it "
            f"again with @durable(name={wf.name!r}, version={rec.version!r}) to let the run "
            "finish, or start the run afresh with restart=True"
        )
    return cast(Workflow[..., R], found)


def version_of(wf: Workflow[..., R], version: object) -> Workflow[..., R]:
    """Version ``version`` of ``wf``'s workflow, chosen explicitly (``dn.start(...,
    version=)``, ``ctx.continue_as_new(..., version=)``); it must be defined here."""
    if not isinstance(version, str) or not version or len(version) > 100:
        raise ArgumentError(
            f"version must be a non-empty str of at most 100 characters, got {version!r}"
        )
    if wf.version == version:
        return wf
    with _versions_lock:
        known = dict(_versions.get(wf.name, {}))
    found = known.get(version)
    if found is None:
        defined = ", ".join(repr(v) for v in sorted(known, key=_version_order)) or "none"
        raise WorkflowVersionError(
            f"version {version!r} of workflow {wf.name!r} is not defined in this process "
            f"(defined versions: {defined}); define it with @durable(name={wf.name!r}, "
            f"version={version!r}), or pick a defined one"
        )
    return cast(Workflow[..., R], found)
