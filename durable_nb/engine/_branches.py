"""Concurrent branches of a run (``ctx.all``, ``ctx.race``, ``ctx.wait_for``): one task per
awaitable, each with its own cancel scope inside the caller's, so a branch that loses or
whose sibling failed learns it with ``dn.cancelled()`` before it is cancelled.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from ..errors import ArgumentTypeError
from ._runtime import CancelScope, cancel_scope

__all__ = ["awaitables", "cancel_branches", "discard", "retrieve", "spawn"]

T = TypeVar("T")


def awaitables(aws: Iterable[Awaitable[T]], what: str) -> list[Awaitable[T]]:
    try:
        items = list(aws)
    except TypeError:
        raise ArgumentTypeError(
            f"{what} expects awaitables (effect calls, ctx.sleep(...), ctx.wait_signal(...), "
            f"ctx.child(...), coroutines), got {aws!r}"
        ) from None
    for i, aw in enumerate(items):
        if not inspect.isawaitable(aw):
            for other in items:  # nothing runs, and no "never awaited" warning follows
                discard(other)
            raise ArgumentTypeError(
                f"{what} expects awaitables (effect calls, ctx.sleep(...), ctx.wait_signal(...), "
                f"ctx.child(...), coroutines), got {aw!r} at position {i}; pass the call, not "
                "its function"
            )
    return items


def discard(aw: object) -> None:
    """Drop an awaitable that will not be awaited (a race's recorded loser)."""
    if inspect.iscoroutine(aw):
        aw.close()
    elif isinstance(aw, asyncio.Future):
        aw.cancel()


def spawn(items: list[Awaitable[T]]) -> list[tuple[asyncio.Future[T], CancelScope]]:
    """One task per awaitable, each with its own cancel scope (inside the caller's), created
    in order so their steps keep the order of the calls."""
    parent = cancel_scope.get()
    out: list[tuple[asyncio.Future[T], CancelScope]] = []
    for aw in items:
        scope = CancelScope(parent)
        token = cancel_scope.set(scope)  # the task copies the context as it is now
        try:
            fut = asyncio.ensure_future(aw)
        finally:
            cancel_scope.reset(token)
        out.append((fut, scope))
    return out


async def cancel_branches(branches: list[tuple[asyncio.Future[Any], CancelScope]]) -> None:
    """Cancel the branches still running (their effects see dn.cancelled() first) and wait
    until their finally blocks ran."""
    pending = []
    for fut, scope in branches:
        if not fut.done():
            scope.cancel()
            fut.cancel()
            pending.append(fut)
    if pending:
        await asyncio.wait(pending)


def retrieve(futs: list[asyncio.Future[Any]]) -> None:
    """Mark every branch's error as seen (asyncio would log the ones nobody asked for)."""
    for f in futs:
        if f.done() and not f.cancelled():
            f.exception()
