"""``TraceWidget``: a run's live timeline and its signal panel, as an anywidget.

The engine calls the widget's listener on the run's loop for every step, status change and
event; the listener only queues the message. A flush, at most every ``flush_interval``
seconds on that same loop, folds the queue into the :class:`TraceModel` and ships the rows
that changed as one ``rows`` message (never the whole list), so a live step costs the
kernel microseconds whatever the run's length. The whole list travels only when a view
asks for it (``sync`` with a stale revision), when a new execution starts, and once when
the run ends (so the kernel-side state is whole for saving).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import anywidget
import traitlets

from ..engine import Job, defined, fork, get_job, resume, runtime
from ..errors import (
    ArgumentError,
    ArgumentTypeError,
    DurableError,
    RunLockedError,
    RunNotFoundError,
    WidgetUnavailableError,
)
from ..trace import run_trace
from ._inspect import step_detail
from ._messages import NoticeMessage, RowsMessage, StepRow, Waiting
from ._model import FINAL, TraceModel
from ._static import static_html

__all__ = ["BUNDLE", "TraceWidget"]

#: the front-end, built from extension/widget by `npm run build` (the wheel build runs it)
BUNDLE = Path(__file__).resolve().parent.parent / "static" / "trace_widget.js"
_bundle_cache: tuple[float, str] | None = None


def _bundle() -> str:
    """The bundle's text, read once (and again if the file changes: a rebuild)."""
    global _bundle_cache
    try:
        mtime = BUNDLE.stat().st_mtime
        if _bundle_cache is None or _bundle_cache[0] != mtime:
            _bundle_cache = (mtime, BUNDLE.read_text(encoding="utf-8"))
    except OSError:
        raise WidgetUnavailableError(
            f"the trace widget's front-end bundle {str(BUNDLE)!r} is missing, so the widget "
            "cannot be shown; in a clone, build it with `bash scripts/setup.sh` (or `npm ci && "
            "npm run build` in extension/widget); otherwise reinstall durable_nb from a wheel"
        ) from None
    return _bundle_cache[1]


class TraceWidget(anywidget.AnyWidget):
    """A run's timeline (one row per step, colour-coded by state, with durations and
    totals), a button per signal the run waits for, Cancel / Resume, and "Re-run from here"
    on a clicked step (a fork of the run from that step, which the widget then follows).

    ``TraceWidget(job)`` follows a run of this kernel live; ``TraceWidget("run-id")`` shows
    a stored run (live too if it executes here). Clicking a step shows its inputs, output
    and error. Where widgets cannot render (nbconvert, GitHub) the same trace appears as
    static HTML.
    """

    run = traitlets.Dict().tag(sync=True)
    steps: traitlets.List[StepRow] = traitlets.List().tag(sync=True)
    steps_rev = traitlets.Int(0).tag(sync=True)
    totals = traitlets.Dict().tag(sync=True)
    waiting: traitlets.List[Waiting] = traitlets.List().tag(sync=True)

    @property
    def _esm(self) -> str:
        # read when a widget is made, not at import: a missing bundle is an error there
        return _bundle()

    def __init__(
        self, run: Job[Any] | str, *, flush_interval: float = 0.05, _missing_ok: bool = False
    ) -> None:
        if isinstance(run, Job):
            job: Job[Any] | None = run
            run_id = run.run_id
        elif isinstance(run, str):
            run_id = run
            try:
                job = get_job(run)
            except RunNotFoundError:
                if not _missing_ok:
                    raise
                job = None
        else:
            raise ArgumentTypeError(
                f"run must be a Job or a run id (str), got {run!r}; pass dn.start(...)'s job "
                "or the id shown by `%durable runs`"
            )
        if (
            not isinstance(flush_interval, (int, float))
            or isinstance(flush_interval, bool)
            or not 0 < flush_interval <= 10
        ):
            raise ArgumentError(
                f"flush_interval must be a number of seconds in (0, 10], got {flush_interval!r}"
            )
        self._lock = threading.RLock()
        self._interval = float(flush_interval)
        self._pending: list[dict[str, Any]] = []
        self._scheduled = False
        self._last_flush = 0.0
        self._job: Job[Any] | None = None
        self._unsubscribe: Any = None
        self._model = TraceModel(run_id)
        if job is None or not (job.workflow is not None and job.status() == "pending"):
            try:  # what the store knows; live messages continue from there
                self._model.load_trace(run_trace(runtime.store, run_id))
            except RunNotFoundError:
                if not _missing_ok:
                    raise
        self._model.set_resumable(self._defined_here(job))
        self._model.take_patch()  # the state below is the whole list at this revision
        super().__init__(
            run=dict(self._model.run),
            steps=list(self._model.rows),
            steps_rev=self._model.rev,
            totals=dict(self._model.totals()),
            waiting=list(self._model.waiting),
        )
        self.on_msg(self._on_frontend)
        if job is not None:
            self.attach(job)

    @property
    def run_id(self) -> str:
        return self._model.run["run_id"]

    def __repr__(self) -> str:
        return f"TraceWidget({self.run_id!r})"

    # following a job ------------------------------------------------------------------------
    def attach(self, job: Job[Any]) -> None:
        """Follow ``job`` (a run of this kernel) live from now on."""
        if not isinstance(job, Job):
            raise ArgumentTypeError(f"job must be a durable_nb Job, got {job!r}")
        if job.run_id != self.run_id:
            raise ArgumentError(
                f"job {job.run_id!r} is not this widget's run {self.run_id!r}; make a widget "
                "for it with job.widget()"
            )
        with self._lock:
            if self._unsubscribe is not None:
                self._unsubscribe()
            self._job = job
            self._model.set_resumable(self._defined_here(job))
            if job.workflow is not None:
                self._model.run["workflow"] = job.workflow.name
            if job.workflow is not None and not job.done():
                status = job.status()
                self._model.run["live"] = True
                self._model.apply({"kind": "status", "status": status, "detail": {}})
            self._unsubscribe = job.subscribe(self._on_message)
        self.flush()

    def _defined_here(self, job: Job[Any] | None) -> bool:
        """Whether this kernel can resume or fork the run: its workflow is defined here."""
        if job is not None and job.workflow is not None:
            return True
        name = self._model.run["workflow"]
        return bool(name) and defined(name) is not None

    def close(self) -> None:
        unsubscribe = getattr(self, "_unsubscribe", None)  # None: __init__ refused its arguments
        if unsubscribe is not None:
            unsubscribe()
            self._unsubscribe = None
        super().close()

    def _on_message(self, msg: dict[str, Any]) -> None:
        """The engine's listener (on the run's loop): queue, and make sure a flush comes."""
        with self._lock:
            self._pending.append(msg)
            if self._scheduled:
                return
            self._scheduled = True
        delay = max(0.0, self._last_flush + self._interval - time.monotonic())
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            loop.call_later(delay, self.flush)
        else:  # called from a thread without a loop: a timer thread does the flush
            timer = threading.Timer(delay, self.flush)
            timer.daemon = True
            timer.start()

    def flush(self) -> None:
        """Fold the queued messages in and ship what changed (normally called on a timer)."""
        with self._lock:
            msgs, self._pending = self._pending, []
            self._scheduled = False
            self._last_flush = time.monotonic()
            model = self._model
            was_live = model.run["live"]
            for m in msgs:
                model.apply(m)
            full, updates = model.take_patch()
            if was_live and not model.run["live"] and updates:
                full, updates = True, []  # the run ended: make the synced list whole again
            rev = model.rev
            run, totals, waiting = dict(model.run), dict(model.totals()), list(model.waiting)
            rows = list(model.rows) if full else None
        if getattr(self, "comm", None) is None:
            return  # closed
        with self.hold_sync():
            if run != self.run:
                self.run = run
            if totals != self.totals:
                self.totals = totals
            if waiting != self.waiting:
                self.waiting = waiting
            if rows is not None:
                self.steps = rows
                self.steps_rev = rev
        if updates:
            patch: RowsMessage = {"kind": "rows", "rev": rev, "updates": updates}
            self.send(patch)

    # the front-end's messages ---------------------------------------------------------------
    def _on_frontend(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if not isinstance(content, dict):
            return
        kind = content.get("kind")
        try:
            if kind == "sync":
                self._sync(content.get("rev"))
            elif kind == "signal":
                self.send_signal(str(content.get("name", "")), str(content.get("payload", "")))
            elif kind == "cancel":
                self.cancel()
            elif kind == "resume":
                self.resume()
            elif kind == "inspect":
                self._inspect(content.get("seq"), content.get("name"))
            elif kind == "fork":
                self.fork(content.get("seq"))  # type: ignore[arg-type]  # checked there
        except DurableError as e:
            self._notice("error", str(e))
        except Exception as e:  # a click must never kill the kernel's message handler
            self._notice("error", f"{type(e).__name__}: {e}")

    def _notice(self, level: str, text: str) -> None:
        msg: NoticeMessage = {
            "kind": "notice",
            "level": "error" if level == "error" else "info",
            "text": text,
        }
        self.send(msg)

    def _sync(self, rev: object) -> None:
        with self._lock:
            if rev == self._model.rev:
                return
            rows, rev_now = list(self._model.rows), self._model.rev
        with self.hold_sync():
            self.steps = rows
            self.steps_rev = rev_now
        self.send_state(["steps", "steps_rev"])

    def _inspect(self, seq: object, name: object) -> None:
        if not isinstance(seq, int) or not isinstance(name, str):
            raise ArgumentTypeError(
                f"inspect needs an int seq and a str name, got {seq!r}, {name!r}"
            )
        with self._lock:
            row = next((r for r in self._model.rows if r["seq"] == seq and r["name"] == name), None)
        label, error, state = (
            (row["label"], row["error"], row["state"]) if row is not None else (name, "", "")
        )
        self.send(step_detail(runtime.store, self.run_id, seq, name, label, error, state))

    # actions (the buttons; callable from Python too) ---------------------------------------
    def send_signal(self, name: str, payload: str = "") -> None:
        """Send the run signal ``name`` with ``payload`` given as JSON text ("" for null)."""
        if not isinstance(payload, str):
            raise ArgumentTypeError(f"payload must be JSON text (a str), got {payload!r}")
        try:
            value = json.loads(payload) if payload.strip() else None
        except ValueError as e:
            raise ArgumentError(
                f'the payload {payload!r} is not JSON ({e}); quote text: "yes", or use '
                'true, 42, {"ok": true}'
            ) from None
        from ..engine import signal

        signal(self.run_id, name, value)
        self._notice("info", f"sent {name!r} to {self.run_id}")

    def cancel(self) -> None:
        """Cancel the run (it stops at its next await)."""
        from ..engine import cancel

        cancel(self.run_id, "cancelled from the trace widget")
        self._notice("info", f"cancel requested for {self.run_id}")

    def resume(self) -> Job[Any]:
        """Resume the run from its history (``dn.resume``: finished steps replay, a
        cancellation is cleared) and follow it."""
        job = self._job
        if job is not None and not job.done():
            raise RunLockedError(f"run {self.run_id!r} is executing already; nothing to resume")
        new = resume(self.run_id)
        self.attach(new)
        self._notice("info", f"resumed {self.run_id}")
        return new

    def fork(self, seq: int) -> Job[Any]:
        """ "Re-run from here": fork the run from step ``seq`` (``dn.fork``: the steps before it
        replay from this run's records, the rest execute) and follow the fork from now on;
        this run is not changed."""
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise ArgumentTypeError(f"seq must be a step number (an int), got {seq!r}")
        original = self.run_id
        new = fork(original, from_step=seq)
        with self._lock:
            if self._unsubscribe is not None:
                self._unsubscribe()
                self._unsubscribe = None
            self._model = TraceModel(new.run_id)
            self._model.load_trace(run_trace(runtime.store, new.run_id))
            self._job = None
        self.attach(new)
        self._notice("info", f"re-running {original} from step {seq} as {new.run_id}")
        return new

    # pictures -----------------------------------------------------------------------------
    def static_html(self) -> str:
        """The timeline as static HTML (no script): what nbconvert and GitHub show."""
        self.flush()
        with self._lock:
            m = self._model
            return static_html(m.run, list(m.rows), m.totals(), list(m.waiting))

    def _repr_html_(self) -> str:
        return self.static_html()

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is None:
            return None
        data, metadata = bundle
        data["text/html"] = self.static_html()
        return data, metadata

    @property
    def rows(self) -> list[StepRow]:
        """The timeline's rows as they stand (flushes first)."""
        self.flush()
        with self._lock:
            return list(self._model.rows)

    def is_final(self) -> bool:
        return self._model.run["status"] in FINAL
