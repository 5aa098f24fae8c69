"""The magics themselves: ``%%effect`` (a cached cell), ``%%durable`` (a resumable workflow
cell) and ``%durable`` (runs, signals, the cache, why a cell executed).
"""

from __future__ import annotations

import ast
import asyncio
import base64
import builtins
import importlib
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.core.magic_arguments import parse_argstring as _parse_argstring

from .. import _cells, _codecs, _explain, _hashing
from .._cells import analyse_cell, normalized
from .._journal import STEP_KINDS, run_scope
from .._provenance import tracker
from ..engine import Workflow, runtime, start_run
from ..engine._usage import kept_usage_records
from ..errors import (
    DurableError,
    RunNotFoundError,
    UnhashableInputError,
    UnstorableValueError,
    WidgetUnavailableError,
)
from ..store import EffectRecord
from ..trace import format_run, format_runs, run_info
from ._outputs import RESULT_NAME, capture, split_last_expression

_LAST = "cell-last:"  # identity prefix of a cell's `cell-last` record (see _explain.py)
_INLINE_BYTES = 64 * 1024  # variables up to this size are kept in the cell's own record
_SOURCE_KEPT = 20_000  # characters of a cell's source kept to show what an edit changed


def _hash_inputs(
    ns: dict[str, Any], names: tuple[str, ...] | list[str], env: tuple[str, ...]
) -> tuple[str, dict[str, list[str]], list[tuple[str, str]]]:
    """The key part of the cell's inputs: each variable's content hash, or its provenance key
    when it has none (``_provenance.py``), and the environment variables the cell reads by
    name. Also each input as an explanation shows it (kind, type, short hash), and the
    inputs that have neither key, with why."""
    values: dict[str, Any] = {}
    shown: dict[str, list[str]] = {}
    bad: list[tuple[str, str]] = []
    for name in names:
        if name not in ns:
            continue  # a builtin, or a NameError the cell will raise itself
        value = ns[name]
        if isinstance(value, type(sys)):
            version = str(getattr(value, "__version__", ""))
            values[name] = ("module", value.__name__, version)
            shown[name] = ["module", value.__name__, version]
            continue
        try:
            digest = _hashing.hash_value(value, name=name)  # each input hashed once
        except UnhashableInputError:
            bad.append((name, tracker.why_none(name, value)))
            continue
        values[name] = digest
        kind = "provenance" if _hashing.is_opaque(type(value)) else "content"
        shown[name] = [kind, type(value).__name__, digest.hex()[:12]]
    for var in env:  # `$` cannot start a variable's name: no clash
        value = os.environ.get(var)
        values["$" + var] = value
        shown["$" + var] = [
            "environment",
            type(value).__name__,
            _hashing.hash_value(value).hex()[:12],
        ]
    return _hashing.hash_value(values).hex(), shown, bad


def parse_argstring(magic: Callable[..., Any], line: str) -> Any:
    """IPython's parser, but a line shlex cannot split (an unclosed quote) is misuse too."""
    try:
        return _parse_argstring(magic, line)
    except ValueError as e:  # shlex: "No closing quotation", "No escaped character"
        raise UsageError(f"cannot read the arguments {line!r}: {e}") from None


@magics_class
class DurableMagics(Magics):
    """``%%effect``, ``%%durable`` and ``%durable``."""

    def __init__(self, shell: InteractiveShell) -> None:
        super().__init__(shell)
        self.cell_id: str | None = None
        self._source = ""  # the transformed source of the cell being run
        self._warned: set[str] = set()
        self._why: dict[str, str] = {}  # cell -> why it last executed or replayed
        self._last_cell: str | None = None
        self._transformed: dict[str, str | None] = {}  # raw cell -> source, for provenance

    @property
    def ns(self) -> dict[str, Any]:
        assert self.shell is not None
        return self.shell.user_ns  # type: ignore[no-any-return]

    def plain_source(self, raw: str) -> str | None:
        """The Python source of an ordinary cell, for provenance tracking; None for the
        cells whose magic keys what they assign itself (``%%effect``, ``%%durable``).
        Cached by the raw text, so a cell run again costs a dict lookup."""
        if raw in self._transformed:
            return self._transformed[raw]
        assert self.shell is not None
        source: str | None
        if raw.lstrip().startswith("%%"):
            first, _, body = raw.lstrip().partition("\n")
            magic = first[2:].split(None, 1)[0] if first[2:].strip() else ""
            # other cell magics (%%time, %%capture) run their body as Python
            source = None if magic in ("effect", "durable") else self.shell.transform_cell(body)
        else:
            source = self.shell.transform_cell(raw)
        if len(self._transformed) > 1024:
            self._transformed.clear()
        self._transformed[raw] = source
        return source

    def _filename(self) -> str:
        """Register the cell's code with IPython's compiler (as run_cell does), so tracebacks
        and ``inspect.getsource`` of functions it defines find their lines."""
        assert self.shell is not None
        return str(self.shell.compile.cache(self._source))

    def _parse(self, cell: str, what: str) -> ast.Module:
        assert self.shell is not None
        source: str = self.shell.transform_cell(cell)
        self._source = source
        try:
            return ast.parse(source)
        except SyntaxError as e:
            raise UsageError(
                f"the {what} cell has a syntax error on line {(e.lineno or 0) + 1}: {e.msg}; "
                "fix it and run the cell again (nothing was run or recorded)"
            ) from None

    # ------------------------------------------------------------------ %%effect
    @magic_arguments()
    @argument("--name", help="Name of the cached cell (default: its source).")
    @argument("--force", action="store_true", help="Run the cell again and overwrite its record.")
    @cell_magic
    def effect(self, line: str, cell: str) -> Any:
        """Run the cell once per unique input: its key is its normalized source plus the
        content of every variable it reads (or, for a client or a connection, where it came
        from). On a hit the cell does not run: the variables it assigns are restored and its
        output is shown again. When it runs again, one line says why."""
        args = parse_argstring(self.effect, line)
        tree = self._parse(cell, "%%effect")
        info = _cells.analyse(self._source)
        assert info is not None  # _parse raised for a cell that does not parse
        reads = [n for n in info.reads if not hasattr(builtins, n) or n in self.ns]
        writes = list(info.writes)
        input_hash, inputs, bad = _hash_inputs(self.ns, reads, info.env)
        version = _hashing.hash_value(info.tree_dump).hex()[:16]
        identity = "cell:" + (args.name or version)
        top = runtime.top
        key4 = (identity, version, input_hash, top.next_occurrence(identity, input_hash))
        cellref = self.cell_id or (f"name:{args.name}" if args.name else identity)
        self._last_cell = cellref
        if bad:
            name, why = bad[0]
            self._why[cellref] = (
                f"executed, not cached: variable {name!r} has no content hash and no "
                f"provenance ({why})"
            )
            self._warn(
                f"%%effect: variable {name!r} has no content hash and no provenance ({why}), "
                "so this cell is not cached; assign it in a cell of this notebook, or pass "
                "its content (a path, an id) instead"
            )
            result = self._run(tree)
            tracker.after_cell(self._source)  # keyed as an ordinary cell
            return result
        provenance = f"effect\x1f{identity}\x1f{version}\x1f{input_hash}"
        if not args.force:
            rec = top.lookup(key4, -1)
            if rec is not None:
                result = self._replay(rec, key4, writes)
                self._why[cellref] = (
                    f"replayed the run of {_explain.when(rec.started_at)}: nothing it reads changed"
                )
                tracker.assign(writes, provenance)
                return result
        now = {
            "identity": identity,
            "version": version,
            "source": self._source[:_SOURCE_KEPT],
            "inputs": inputs,
        }
        prev = self._last_run(cellref)
        reasons = _explain.cell_reasons(prev, now, force=args.force)
        if prev is not None:  # a first run needs no note
            print(f"[durable_nb] running this cell again: {'; '.join(reasons)}")
        self._why[cellref] = "executed: " + "; ".join(reasons)
        t0, started = time.perf_counter(), runtime.clock.time()
        try:
            with capture(self.shell) as out:  # type: ignore[arg-type]
                result = self._run(tree)
        except BaseException as e:
            self._remember(cellref, now, started, f"it raised {type(e).__name__}")
            raise
        problem = self._record(key4, writes, out, result, started, time.perf_counter() - t0)
        self._remember(cellref, now, started, problem)
        tracker.assign(writes, provenance)
        return result

    def _last_run(self, cellref: str) -> dict[str, Any] | None:
        """What the cell read when it last executed (its ``cell-last`` record), if it did."""
        store = runtime.store
        rec = store.get_effect((runtime.top.scope_id, _LAST + cellref, "", "", 0))
        if rec is None:
            return None
        try:
            value = _codecs.decode(rec.payload, store.signer)
        except Exception:  # an unreadable explanation is no reason to fail the cell
            return None
        return value if isinstance(value, dict) else None

    def _remember(
        self, cellref: str, now: dict[str, Any], started: float, problem: str | None
    ) -> None:
        """Keep what the cell read this time, to explain its next miss after a restart."""
        store = runtime.store
        summary = {
            **now,
            "why": self._why.get(cellref, ""),
            "recorded": problem is None,
            "not_recorded": problem or "",
        }
        try:
            payload = _codecs.encode(json.loads(json.dumps(summary, default=str)), store.signer)
        except (TypeError, ValueError, UnstorableValueError):
            return
        rec = EffectRecord(
            runtime.top.scope_id,
            _LAST + cellref,
            "",
            "",
            0,
            payload=payload,
            kind="cell-last",
            started_at=started,
        )
        store.put_effects([rec])

    def _warn(self, message: str) -> None:
        """A warning that points at the cell and shows every time the cell runs."""
        warnings.warn_explicit(message, UserWarning, self._filename(), 1, registry={})

    def _run(self, tree: ast.Module) -> Any:
        tree = split_last_expression(tree)
        self.ns.pop(RESULT_NAME, None)
        exec(compile(tree, self._filename(), "exec"), self.ns)
        return self.ns.pop(RESULT_NAME, None)

    def _record(
        self,
        key4: tuple[str, str, str, int],
        writes: list[str],
        out: dict[str, Any],
        result: Any,
        started: float,
        duration: float,
    ) -> str | None:
        """Record the cell's variables and outputs; or say why it cannot be recorded."""
        store, scope = runtime.store, runtime.top.scope_id
        recs: list[EffectRecord] = []
        stored: list[str] = []
        inline: dict[str, list[str]] = {}
        modules: dict[str, str] = {}
        kept: list[Any] = []  # the values stored: the LLM responses among them count
        for name in [*writes, RESULT_NAME]:
            value = result if name == RESULT_NAME else self.ns.get(name)
            if name != RESULT_NAME and name not in self.ns:
                continue
            if isinstance(value, type(sys)):
                modules[name] = value.__name__
                continue
            if isinstance(value, io.IOBase) and value.closed:
                continue  # `with open(...) as f` leaves a closed file: nothing to restore
            try:
                payload = _codecs.encode(value, store.signer, what=f"variable {name!r}")
                if payload.codec == "pickle":
                    _codecs.decode(payload, store.signer)  # e.g. a function of this notebook
            except Exception as e:
                self._warn(
                    f"%%effect: variable {name!r} ({type(value).__name__}) cannot be stored "
                    f"({type(e).__name__}), so this cell will run again next time; "
                    "assign it in another cell"
                )
                return f"variable {name!r} cannot be stored"
            stored.append(name)
            kept.append(value)
            if payload.table is None and len(payload.data) <= _INLINE_BYTES:
                # small values travel in the cell's record: a hit is one lookup, not one
                # per variable (a pickle keeps its signature, checked when decoded)
                inline[name] = [payload.codec, base64.b64encode(payload.data).decode()]
                continue
            recs.append(
                EffectRecord(
                    scope, key4[0] + "#" + name, *key4[1:], payload=payload, kind="cell-var"
                )
            )
        summary = {
            "vars": [n for n in stored if n != RESULT_NAME],
            "result": RESULT_NAME in stored,
            "inline": inline,
            "modules": modules,
            "events": out["events"],
            "duration": duration,
        }
        try:
            payload = _codecs.encode(json.loads(json.dumps(summary, default=str)), store.signer)
        except (TypeError, ValueError, UnstorableValueError) as e:
            return f"its outputs cannot be stored ({type(e).__name__})"
        cell = EffectRecord(
            scope, *key4, payload=payload, kind="cell", started_at=started, duration=duration
        )
        store.put_effects([*recs, cell, *kept_usage_records(cell, kept)])  # tokens: once
        return None

    def _replay(self, rec: EffectRecord, key4: tuple[str, str, str, int], writes: list[str]) -> Any:
        assert self.shell is not None
        store = runtime.store
        summary = _codecs.decode(rec.payload, store.signer)
        assert isinstance(summary, dict)
        values: dict[str, Any] = {}
        inline = summary.get("inline", {})
        names = summary["vars"] + ([RESULT_NAME] if summary.get("result", True) else [])
        for name in names:
            if name in inline:
                codec, data = inline[name]
                values[name] = _codecs.decode(
                    _codecs.Payload(codec, base64.b64decode(data)), store.signer
                )
                continue
            var = store.get_effect((runtime.top.scope_id, key4[0] + "#" + name, *key4[1:]))
            if var is None:
                if name == RESULT_NAME:
                    continue
                return self._run(ast.parse(""))  # pragma: no cover - a half-deleted record
            values[name] = _codecs.decode(var.payload, store.signer)
        for name, module in summary["modules"].items():
            values[name] = importlib.import_module(module)
        result = values.pop(RESULT_NAME, None)
        self.ns.update(values)
        events = summary.get("events")
        if events is None:  # recorded before outputs kept their order
            events = [["stdout", summary["stdout"]], ["stderr", summary["stderr"]]]
            events += [["display", d, m] for d, m in summary["displays"]]
        for event in events:
            # each stream is buffered on its own: flush before switching, so what came
            # first shows first
            sys.stdout.flush()
            sys.stderr.flush()
            if event[0] == "display":
                self.shell.display_pub.publish(event[1], event[2])
            else:
                (sys.stdout if event[0] == "stdout" else sys.stderr).write(event[1])
        sys.stdout.flush()
        sys.stderr.flush()
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.started_at))
        print(
            f"[durable_nb] replayed this cell (recorded {when}); skipped "
            f"{summary['duration']:.2f} s of work"
        )
        return result

    # ------------------------------------------------------------------ %%durable
    @magic_arguments()
    @argument("name", nargs="?", help="Run id (default: derived from the cell).")
    @argument(
        "--background",
        action="store_true",
        help="Return a Job at once; the run goes on in the kernel's event loop.",
    )
    @argument(
        "--strict", action="store_true", help="Fail when a replay departs from the recorded order."
    )
    @argument("--restart", action="store_true", help="Forget the run's history and start afresh.")
    @cell_magic
    def durable(self, line: str, cell: str) -> Any:
        """Run the cell as a durable workflow: `await` works, `ctx` is the run's Context,
        effects are journaled under the run. Running it again (after a kernel restart too)
        replays finished steps and continues where it stopped."""
        args = parse_argstring(self.durable, line)
        tree = self._parse(cell, "%%durable")
        if any(isinstance(n, ast.Return) for n in ast.walk(tree) if not _in_function(tree, n)):
            raise UsageError(
                "a %%durable cell cannot `return` at top level; leave the value as the cell's "
                "last expression instead"
            )
        _, writes = analyse_cell(tree)
        if "ctx" in writes:
            raise UsageError(
                "the %%durable cell assigns `ctx`, which is the run's Context; rename your variable"
            )
        tree = split_last_expression(tree)
        try:
            code = compile(tree, self._filename(), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        except SyntaxError as e:
            raise UsageError(f"the %%durable cell cannot run: {e.msg} (line {e.lineno})") from None
        ns = self.ns
        version = _hashing.hash_value(normalized(tree)).hex()[:16]
        run_id = args.name or f"cell:{self.cell_id or version}"

        async def body(ctx: Any) -> Any:
            previous = ns.get("ctx", _MISSING)
            ns["ctx"] = ctx
            ns.pop(RESULT_NAME, None)
            try:
                coro = eval(code, ns)
                if asyncio.iscoroutine(coro):
                    await coro
                return ns.pop(RESULT_NAME, None)
            finally:
                if previous is _MISSING:
                    ns.pop("ctx", None)
                else:
                    ns["ctx"] = previous

        wf: Workflow[..., Any] = Workflow(
            body, name=f"cell:{args.name or version}", strict=args.strict
        )
        wf.source_version = version
        wf.replay_completed = True
        widget = self._trace_widget(run_id, new=True)
        if args.background:
            job = start_run(wf, (), {}, run_id=run_id, restart=args.restart)
            if widget is not None:  # the task has not begun: the widget sees every step
                widget.attach(job, show_result=True)  # and its value when it completes
            return job
        try:
            if widget is None:
                value = start_run(
                    wf, (), {}, run_id=run_id, restart=args.restart, blocking=True
                ).result()
            else:
                value = self._start_followed(wf, run_id, args.restart, widget).result()
        except DurableError as e:
            raise UsageError(str(e)) from None
        tracker.assign(writes, f"durable\x1f{run_id}\x1f{version}")
        return value

    @staticmethod
    def _start_followed(wf: Workflow[..., Any], run_id: str, restart: bool, widget: Any) -> Any:
        """Start the run on the engine's loop with the widget subscribed before its first step
        (subscribing after `start_run` returned would race with the loop thread)."""

        async def begin() -> Any:
            job = start_run(wf, (), {}, run_id=run_id, restart=restart)
            widget.attach(job)
            return job

        return asyncio.run_coroutine_threadsafe(begin(), runtime.engine_loop()).result()

    def _trace_widget(self, run_id: str, *, new: bool = False) -> Any:
        """Show a trace widget of the run under the cell; None outside a Jupyter kernel (a
        terminal shows no widgets) or when widgets are unavailable (a warning says why)."""
        if self.shell is None or getattr(self.shell, "kernel", None) is None:
            return None
        try:
            from ..widgets import TraceWidget

            widget = TraceWidget(run_id, _missing_ok=new)
        except ImportError as e:
            self._warn_once(
                f"the live trace widget needs the notebook extra ({e}); "
                "pip install 'durable_nb[notebook]'"
            )
            return None
        except WidgetUnavailableError as e:
            self._warn_once(str(e))
            return None
        from IPython.display import display

        handle = display(widget, display_id=True)

        def on_run(change: dict[str, Any]) -> None:
            old, now = change["old"] or {}, change["new"] or {}
            if old.get("live") and not now.get("live") and handle is not None:
                # the saved notebook's static picture (nbconvert, GitHub) shows the outcome
                handle.update(widget)

        widget.observe(on_run, names="run")
        return widget

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self._warn(message)

    # ------------------------------------------------------------------ %durable
    @magic_arguments()
    @argument(
        "command",
        choices=["store", "runs", "show", "signal", "cancel", "forget", "cache", "why"],
        help="What to do.",
    )
    @argument(
        "args",
        nargs="*",
        help="Its arguments: store [URL] | show RUN | "
        "signal RUN NAME [JSON] | cancel RUN | forget RUN | cache [clear] | "
        "why [CELL | EFFECT | RUN STEP]",
    )
    @line_magic("durable")  # type: ignore[arg-type]  # IPython types the name argument as Never
    def durable_line(self, line: str) -> Any:
        """Inspect and steer runs: %durable store [URL] | runs | show RUN |
        signal RUN NAME [JSON] | cancel RUN | forget RUN | cache [clear] |
        why [CELL | EFFECT | RUN STEP] (why it executed instead of replaying)"""
        words = line.split(None, 3)
        if words[:1] == ["signal"] and len(words) == 4:
            # the payload is the raw rest of the line: JSON keeps its spaces and quotes
            return self._call(self._signal, words[1], words[2], _unquote(words[3]))
        try:
            args = parse_argstring(self.durable_line, line)
        except UsageError as e:
            raise UsageError(f"{e}; type %durable? for help") from None
        cmd, rest = args.command, list(args.args)
        handlers: dict[str, tuple[Callable[..., Any], int, int]] = {
            "store": (self._store, 0, 1),
            "runs": (self._runs, 0, 0),
            "show": (self._show, 1, 1),
            "signal": (self._signal, 2, 3),
            "cancel": (self._cancel, 1, 1),
            "forget": (self._forget, 1, 1),
            "cache": (self._cache, 0, 1),
            "why": (self._why_cmd, 0, 2),
        }
        fn, lo, hi = handlers[cmd]
        if not lo <= len(rest) <= hi:
            usage = {
                "store": "%durable store [PATH | :memory: | postgresql://...]",
                "runs": "%durable runs",
                "show": "%durable show RUN",
                "signal": "%durable signal RUN NAME [JSON]",
                "cancel": "%durable cancel RUN",
                "forget": "%durable forget RUN",
                "cache": "%durable cache [clear]",
                "why": "%durable why [CELL | EFFECT | RUN STEP]",
            }[cmd]
            raise UsageError(
                f"%durable {cmd} takes {lo}-{hi} arguments, got {len(rest)}; type: {usage}"
            )
        return self._call(fn, *rest)

    @staticmethod
    def _call(fn: Callable[..., Any], *args: str) -> Any:
        try:
            return fn(*args)
        except DurableError as e:
            raise UsageError(str(e)) from None

    def _store(self, url: str | None = None) -> None:
        if url is not None:
            runtime.set_store(os.path.expanduser(url))
        print(f"durable_nb store: {runtime.store.url}")

    def _runs(self) -> None:
        print(format_runs(runtime.store.list_runs()))

    def _show(self, run_id: str) -> None:
        try:
            info = run_info(runtime.store, run_id)
        except RunNotFoundError:
            raise UsageError(
                f"no run {run_id!r} in the store {runtime.store.url!r}; list runs with "
                "%durable runs"
            ) from None
        if self._trace_widget(run_id) is None:
            print(format_run(info))

    def _signal(self, run_id: str, name: str, payload: str = "null") -> None:
        try:
            value = json.loads(payload)
        except ValueError as e:
            raise UsageError(
                f"the payload {payload!r} is not JSON ({e}); quote strings: "
                f"%durable signal {run_id} {name} '\"yes\"'"
            ) from None
        from ..engine import get_job

        get_job(run_id).signal(name, value)
        print(f"sent {name!r} to {run_id}")

    def _cancel(self, run_id: str) -> None:
        from ..engine import cancel

        cancel(run_id, "cancelled with %durable cancel")
        print(f"cancel requested for {run_id}")

    def _forget(self, run_id: str) -> None:
        if not runtime.store.delete_run(run_id):
            raise UsageError(f"no run {run_id!r} in the store; list runs with %durable runs")
        print(f"forgot {run_id}")

    def _cache(self, action: str | None = None) -> None:
        scope = runtime.top.scope_id
        if action is None:
            n = sum(
                1
                for r in runtime.store.load_effects(scope)
                if r.kind not in ("cell-var", "cell-last")
            )
            print(f"{n} cached result(s) for this notebook ({scope})")
        elif action == "clear":
            n = runtime.store.delete_effects(scope)
            print(f"cleared {n} record(s) of this notebook ({scope})")
        else:
            raise UsageError(
                f"unknown %durable cache action {action!r}; type: %durable cache clear"
            )

    def _why_cmd(self, *words: str) -> None:
        """Why the last ``%%effect`` cell, a named cell, an ``@effect`` function's latest
        call or a run's step executed instead of replaying."""
        store, scope = runtime.store, runtime.top.scope_id
        if not words:
            if self._last_cell is None:
                raise UsageError(
                    "no %%effect cell has run in this kernel yet; name what to explain: "
                    "%durable why CELL | EFFECT | RUN STEP"
                )
            print(self._why_of(self._last_cell) or "no explanation is recorded for it")
            return
        if len(words) == 2:
            print(self._step_why(*words))
            return
        name = words[0]
        for ref in (f"name:{name}", name, f"cell:{name}"):
            text = self._why_of(ref)
            if text:
                print(text)
                return
        records = [r for r in store.load_effects(scope) if r.kind == "effect"]
        found = sorted(
            {r.identity for r in records if r.identity == name or r.identity.endswith("." + name)}
        )
        if len(found) == 1:
            print(_explain.effect_why(records, found[0]))
            return
        if len(found) > 1:
            raise UsageError(f"{name!r} matches {found}; name one of them in full")
        if store.get_run(name) is not None:
            raise UsageError(
                f"{name!r} is a run; name one of its steps (its number or function): "
                f"%durable why {name} STEP"
            )
        raise UsageError(
            f"nothing called {name!r} ran in this notebook: name a %%effect cell (its --name "
            "or cell id), an @effect function, or a run and a step (%durable why RUN STEP)"
        )

    def _why_of(self, cellref: str) -> str:
        if cellref in self._why:
            return self._why[cellref]
        last = self._last_run(cellref)
        return str(last.get("why", "")) if last is not None else ""

    def _step_why(self, run_id: str, step: str) -> str:
        store = runtime.store
        if store.get_run(run_id) is None:
            raise UsageError(f"no run {run_id!r} in the store; list runs with %durable runs")
        records = [r for r in store.load_effects(run_scope(run_id)) if r.kind in STEP_KINDS]
        if step.isdigit():
            mine = [r for r in records if r.seq == int(step)]
        else:
            mine = [r for r in records if r.identity == step or r.identity.endswith("." + step)]
        if not mine:
            raise UsageError(
                f"run {run_id!r} has no step {step!r}; see its steps with %durable show {run_id}"
            )
        rec = max(mine, key=lambda r: r.started_at)
        return f"step {rec.seq} ({rec.identity}) of {run_id}: " + _explain.step_why(records, rec)


_MISSING = object()


def _unquote(text: str) -> str:
    """Strip one pair of outer quotes, as a shell would: '{"a": 1}' -> {"a": 1}."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        inner = text[1:-1]
        try:
            json.loads(text)  # "yes" is already JSON (a string): keep its quotes
        except ValueError:
            return inner
    return text


def _in_function(tree: ast.Module, node: ast.AST) -> bool:
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and any(
            n is node for n in ast.walk(fn)
        ):
            return True
    return False
