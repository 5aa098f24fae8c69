"""How an effect call is attempted: the retry policy, per-attempt and total timeouts.

:class:`Retry` says how a call is retried; :class:`Attempts` carries one call through its
attempts — the one attempt policy of sync, async and streaming effects, durable inside a
run; each failed attempt's error and the schedule's deadlines are described here once.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from .._journal import iso_time
from ..errors import ArgumentError, ArgumentTypeError, EffectTimeoutError
from ._runtime import CancelScope, Key4, TopScope, runtime

if TYPE_CHECKING:
    from ._state import RunState

__all__ = [
    "Attempts",
    "Retry",
    "attempt_timeout",
    "call_with_timeout",
    "check_retry",
    "check_timeout",
    "preview_args",
    "retry_after",
    "total_timeout",
]

R = TypeVar("R")

_preview = reprlib.Repr()
_preview.maxstring = 80
_preview.maxother = 80
_preview.maxlist = _preview.maxtuple = _preview.maxdict = _preview.maxset = 6


def preview_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A short, human-readable preview of a call's arguments for traces."""
    try:
        parts = [_preview.repr(a) for a in args]
        parts += [f"{k}={_preview.repr(v)}" for k, v in kwargs.items()]
    except Exception:  # a broken __repr__ must not break the effect
        return "(...)"
    text = "(" + ", ".join(parts) + ")"
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass(frozen=True)
class Retry:
    """How an effect is retried: ``attempts`` in all, waiting ``initial_delay * backoff**n``
    (at most ``max_delay``) between them, for exceptions matching ``retry_on``.

    ``total_timeout`` (seconds) bounds all attempts and the waits between them together,
    counted from the first attempt's start: an attempt is cut short when it would run past
    it, and no retry is scheduled that could not start before it; then the call raises
    :class:`~durable_nb.errors.EffectTimeoutError`. (The per-attempt limit is the effect's
    ``timeout=``.) Inside a run the retry schedule is durable: each failed attempt is
    recorded, so a process that restarts between two attempts waits only what is left of
    the delay and goes on with the next attempt instead of starting over.
    """

    attempts: int = 3
    backoff: float = 2.0
    initial_delay: float = 1.0
    max_delay: float = 60.0
    retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,)
    total_timeout: float | None = None

    def __post_init__(self) -> None:
        if (
            not isinstance(self.attempts, int)
            or isinstance(self.attempts, bool)
            or self.attempts < 1
        ):
            raise ArgumentError(f"attempts must be an int >= 1, got {self.attempts!r}")
        for name in ("backoff", "initial_delay", "max_delay"):
            v = getattr(self, name)
            if (
                not isinstance(v, (int, float))
                or isinstance(v, bool)
                or not math.isfinite(v)
                or v < 0
            ):
                raise ArgumentError(f"{name} must be a finite number >= 0, got {v!r}")
        check_timeout(self.total_timeout, "total_timeout")
        on = self.retry_on
        if isinstance(on, type):
            object.__setattr__(self, "retry_on", (on,))
            on = (on,)
        if not isinstance(on, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in on
        ):
            raise ArgumentTypeError(
                f"retry_on must be an exception class or a tuple of them, got {on!r}"
            )

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failed attempt."""
        return float(min(self.initial_delay * self.backoff ** (failures - 1), self.max_delay))


def check_timeout(timeout: float | None, name: str = "timeout") -> float | None:
    if timeout is None:
        return None
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise ArgumentError(f"{name} must be a number of seconds > 0 or None, got {timeout!r}")
    return float(timeout)


def check_retry(retry: Retry | int | None) -> Retry | None:
    if retry is None:
        return None
    if isinstance(retry, int) and not isinstance(retry, bool):
        return Retry(attempts=retry)
    if not isinstance(retry, Retry):
        raise ArgumentTypeError(
            f"retry must be a durable_nb.Retry or an int (attempts), got {retry!r}"
        )
    return retry


_timeout_pool: concurrent.futures.ThreadPoolExecutor | None = None


def call_with_timeout(
    fn: Callable[[], R], timeout: float, what: str, scope: CancelScope | None = None
) -> R:
    """Run a sync function in a worker thread, giving up after ``timeout`` seconds.

    Python cannot stop a thread: on timeout the call is abandoned (its result is dropped)
    and its cancel scope is set, so the function can notice with ``dn.cancelled()``.
    """
    global _timeout_pool
    if _timeout_pool is None:
        _timeout_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=32, thread_name_prefix="durable_nb-effect"
        )
    ctx = contextvars.copy_context()
    fut = _timeout_pool.submit(ctx.run, fn)
    try:
        return fut.result(timeout)
    except concurrent.futures.TimeoutError:
        if scope is not None:
            scope.cancel()
        raise attempt_timeout(what, timeout) from None


_MAX_RETRY_AFTER = 3600.0  # a hint longer than an hour is a server's mistake, not a plan


def retry_after(exc: BaseException) -> float | None:
    """Seconds an error says to wait before retrying: its ``retry_after`` attribute, or the
    ``retry-after-ms`` / ``retry-after`` (seconds) header of its HTTP ``response`` (what the
    ``openai`` and ``anthropic`` SDKs' errors carry); None when it says nothing."""
    value = getattr(exc, "retry_after", None)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        value = None
        headers = getattr(getattr(exc, "response", None), "headers", None)
        if headers is not None:
            try:
                ms, sec = headers.get("retry-after-ms"), headers.get("retry-after")
                value = float(ms) / 1000 if ms is not None else float(sec)
            except (TypeError, ValueError, AttributeError):  # absent, or an HTTP date
                value = None
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return min(float(value), _MAX_RETRY_AFTER)


def attempt_timeout(what: str, timeout: float) -> EffectTimeoutError:
    return EffectTimeoutError(
        f"effect {what} did not finish within timeout={timeout:g}s; raise the timeout "
        "or make the work smaller (the attempt was abandoned; dn.cancelled() tells it so)"
    )


def total_timeout(what: str, retry: Retry, failures: int, last: str) -> EffectTimeoutError:
    return EffectTimeoutError(
        f"effect {what} did not succeed within total_timeout={retry.total_timeout:g}s "
        f"({failures} failed attempt{'s' if failures != 1 else ''}, the last with {last[:300]}); "
        "raise total_timeout or make the work more reliable"
    )


class Attempts:
    """One call's attempts under its :class:`Retry` policy — the one attempt policy of sync,
    async and streaming effects: where the call's retry schedule stands (recorded inside a
    run, so a restart between two attempts waits only what is left of the delay), how long
    the next attempt may take, and what a failed attempt leads to."""

    __slots__ = (
        "deadline",
        "due",
        "failures",
        "first",
        "identity",
        "key4",
        "last",
        "retry",
        "scope",
        "seq",
        "timeout",
    )

    def __init__(
        self,
        scope: RunState | TopScope,
        key4: Key4,
        seq: int,
        identity: str,
        retry: Retry | None,
        timeout: float | None,
    ) -> None:
        self.scope, self.key4, self.seq, self.identity = scope, key4, seq, identity
        self.retry, self.timeout = retry, timeout
        self.failures, self.due, self.last, self.deadline = 0, None, "", None
        self.first = runtime.clock.time()
        if retry is None:  # the common case, kept cheap: no schedule to look up
            return
        prior = scope.retry_state(key4)
        if prior is not None and not prior.get("exhausted"):
            self.failures, self.first = int(prior["failures"]), float(prior["first"])
            self.due, self.last = prior["next_at"], str(prior.get("error", "?"))
        if retry.total_timeout is not None:
            self.deadline = self.first + retry.total_timeout

    def _wait(self) -> float:
        return max(0.0, self.due - runtime.clock.time()) if self.due is not None else 0.0

    def pause_sync(self) -> None:
        """Wait (blocking) until the next attempt is due."""
        if (wait := self._wait()) > 0:
            runtime.clock.sleep_sync(wait)

    async def pause(self) -> None:
        """Wait until the next attempt is due; the run shows it waits on a retry."""
        if (wait := self._wait()) > 0 and self.due is not None:
            what = {"kind": "retry", "name": self.identity, "until": iso_time(self.due)}
            await self.scope.caught_up()  # its retry schedule is durable before it waits
            self.scope.begin_wait(what)
            try:
                await runtime.clock.sleep(wait)
            finally:
                self.scope.end_wait(what)

    def expired(self) -> EffectTimeoutError | None:
        """The total timeout ran out between attempts (say while no process ran the run)."""
        if self.deadline is None or not self.failures or self.retry is None:
            return None
        if runtime.clock.time() < self.deadline:
            return None
        return total_timeout(self.identity, self.retry, self.failures, self.last)

    def limit(self) -> float | None:
        """How long this attempt may take: its ``timeout``, cut to the total timeout."""
        limit = self.timeout
        if self.deadline is not None:
            left = max(0.0, self.deadline - runtime.clock.time())
            limit = left if limit is None else min(limit, left)
        return limit

    @staticmethod
    def give_up(err: BaseException, exc: BaseException) -> NoReturn:
        """Raise what :meth:`failed` decided for the failure ``exc``: ``exc`` itself, or
        ``err`` (a total timeout) caused by it."""
        if err is exc:
            raise exc
        raise err from exc

    def failed(self, exc: BaseException) -> BaseException | None:
        """An attempt failed with ``exc``: ``None`` to try again (the schedule is recorded
        first, so a restart resumes it), else the error to raise."""
        scope, retry = self.scope, self.retry
        self.failures += 1
        self.last = repr(exc)
        if retry is None or self.failures >= retry.attempts or not isinstance(exc, retry.retry_on):
            if retry is not None and self.failures > 1:
                # a later execution of the run starts a fresh schedule for this call
                done = {"failures": self.failures, "first": self.first, "next_at": None}
                scope.record_retry(self.key4, self.seq, {**done, "exhausted": True})
            return exc
        # an API that says when to come back (HTTP 429/503 Retry-After) is obeyed, at least
        delay = max(retry.delay(self.failures), retry_after(exc) or 0.0)
        next_at = runtime.clock.time() + delay
        if self.deadline is not None and next_at >= self.deadline:
            return total_timeout(self.identity, retry, self.failures, repr(exc))
        scope.note_failure(
            self.key4, self.seq, exc, self.first, attempt=self.failures, retry_in=delay
        )
        state = {"failures": self.failures, "first": self.first, "next_at": next_at}
        scope.record_retry(self.key4, self.seq, {**state, "error": repr(exc)[:300]})
        self.due = next_at
        return None
