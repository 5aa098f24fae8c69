"""The IPython extension: ``%%effect``, ``%%durable`` and ``%durable``.

``%load_ext durable_nb`` registers the magics and a ``pre_run_cell`` hook (occurrences of
top-level effects are counted afresh for each cell); ``%unload_ext durable_nb`` removes
both, so ``%reload_ext`` is idempotent. This is the only module that imports IPython.
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import importlib
import io
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from . import _codecs, _hashing
from .engine import Workflow, runtime, start_run
from .errors import (
    DurableError,
    RunNotFoundError,
    UnhashableInputError,
    UnstorableValueError,
    WidgetUnavailableError,
)
from .store import EffectRecord
from .trace import format_run, format_runs, run_info

__all__ = ["load_ipython_extension", "unload_ipython_extension"]

_RESULT = "__durable_nb_result__"


# ---------------------------------------------------------------------------- cell analysis


class _Names(ast.NodeVisitor):
    """Names a cell reads before it assigns them (its inputs) and names it assigns."""

    def __init__(self) -> None:
        self.reads: list[str] = []
        self.writes: list[str] = []
        self._bound: set[str] = set()
        self._local: list[set[str]] = []

    def _read(self, name: str) -> None:
        if any(name in scope for scope in self._local):
            return
        if name not in self._bound and name not in self.reads:
            self.reads.append(name)

    def _write(self, name: str) -> None:
        if self._local:
            self._local[-1].add(name)
            return
        self._bound.add(name)
        if name not in self.writes:
            self.writes.append(name)

    def visit_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._read(node.id)
        else:
            self._write(node.id)

    def visit_Assign(self, node: ast.Assign) -> None:
        self.visit(node.value)  # the value is read before the targets are bound
        for t in node.targets:
            self.visit(t)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self.visit(node.value)
        if isinstance(node.target, ast.Name):
            self._read(node.target.id)
        self.visit(node.target)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self.visit(node.value)
        self.visit(node.target)

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        self.visit(node.target)

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self.visit(node.iter)
        self.visit(node.target)
        for stmt in [*node.body, *node.orelse]:
            self.visit(stmt)

    visit_AsyncFor = visit_For

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for alias in node.names:
            if alias.name != "*":
                self._write(alias.asname or alias.name.split(".")[0])

    visit_ImportFrom = visit_Import

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        for d in getattr(node, "decorator_list", []):
            self.visit(d)
        for default in [*node.args.defaults, *node.args.kw_defaults]:
            if default is not None:
                self.visit(default)
        if not isinstance(node, ast.Lambda):
            self._write(node.name)
        args = node.args
        params = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
        params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        self._local.append(params)
        body = [node.body] if isinstance(node, ast.Lambda) else node.body
        for stmt in body:
            self.visit(stmt)
        self._local.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]:
            self.visit(expr)
        self._write(node.name)
        self._local.append(set())
        for stmt in node.body:
            self.visit(stmt)
        self._local.pop()

    def _comprehension(
        self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp
    ) -> None:
        self._local.append(set())
        for gen in node.generators:
            self.visit(gen.iter)
            self.visit(gen.target)
            for cond in gen.ifs:
                self.visit(cond)
        if isinstance(node, ast.DictComp):
            self.visit(node.key)
            self.visit(node.value)
        else:
            self.visit(node.elt)
        self._local.pop()

    visit_ListComp = visit_SetComp = visit_GeneratorExp = visit_DictComp = _comprehension


def analyse_cell(tree: ast.Module) -> tuple[list[str], list[str]]:
    """``(reads, writes)``: names read before assignment, and names the cell assigns."""
    names = _Names()
    for stmt in tree.body:
        names.visit(stmt)
    return names.reads, names.writes


def _normalized(tree: ast.Module) -> str:
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def _split_last_expression(tree: ast.Module) -> ast.Module:
    """Make the value of a trailing expression land in ``__durable_nb_result__``."""
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body[-1]
        assign = ast.Assign(targets=[ast.Name(_RESULT, ast.Store())], value=last.value)
        tree.body[-1] = ast.copy_location(assign, last)
        ast.fix_missing_locations(tree)
    return tree


# ---------------------------------------------------------------------------- output capture


class _Tee:
    """A stream that writes through and remembers what was written."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return int(self.target.write(text) or 0)

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


@contextmanager
def _capture(ip: InteractiveShell) -> Iterator[dict[str, Any]]:
    """Show the cell's output live and keep a copy: stdout, stderr and rich displays."""
    out, err = _Tee(sys.stdout), _Tee(sys.stderr)
    displays: list[list[Any]] = []
    pub = ip.display_pub
    original_publish = pub.publish

    def publish(data: dict[str, Any], metadata: dict[str, Any] | None = None, **kw: Any) -> None:
        displays.append([data, metadata or {}])
        original_publish(data, metadata, **kw)

    got: dict[str, Any] = {}
    sys.stdout, sys.stderr = cast(Any, out), cast(Any, err)  # tees, duck-typed streams
    pub.publish = publish  # type: ignore[method-assign,assignment]  # restored below
    try:
        yield got
        inline = sys.modules.get("matplotlib_inline.backend_inline")
        if inline is not None:  # figures are shown at the end of a cell: show them now
            inline.flush_figures()
    finally:
        sys.stdout, sys.stderr = out.target, err.target
        pub.publish = original_publish  # type: ignore[method-assign]
        got["stdout"] = "".join(out.parts)
        got["stderr"] = "".join(err.parts)
        got["displays"] = displays


# ---------------------------------------------------------------------------- magics


def _hash_inputs(ns: dict[str, Any], names: list[str]) -> tuple[str, list[str]]:
    """The content hash of the cell's inputs; also which inputs could not be hashed."""
    values: dict[str, Any] = {}
    bad: list[str] = []
    for name in names:
        if name not in ns:
            continue  # a builtin, or a NameError the cell will raise itself
        value = ns[name]
        if isinstance(value, type(sys)):
            values[name] = ("module", value.__name__, str(getattr(value, "__version__", "")))
            continue
        try:
            values[name] = _hashing.hash_value(value, name=name)  # each input hashed once
        except UnhashableInputError:
            bad.append(name)
    return _hashing.hash_value(values).hex(), bad


@magics_class
class DurableMagics(Magics):
    """``%%effect``, ``%%durable`` and ``%durable``."""

    def __init__(self, shell: InteractiveShell) -> None:
        super().__init__(shell)
        self.cell_id: str | None = None
        self._source = ""  # the transformed source of the cell being run
        self._warned: set[str] = set()

    @property
    def ns(self) -> dict[str, Any]:
        assert self.shell is not None
        return self.shell.user_ns  # type: ignore[no-any-return]

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
        content of every variable it reads. On a hit the cell does not run: the variables it
        assigns are restored and its output is shown again."""
        args = parse_argstring(self.effect, line)
        tree = self._parse(cell, "%%effect")
        reads, writes = analyse_cell(tree)
        reads = [n for n in reads if not hasattr(builtins, n) or n in self.ns]
        input_hash, bad = _hash_inputs(self.ns, reads)
        identity = "cell:" + (args.name or _hashing.hash_value(_normalized(tree)).hex()[:16])
        version = _hashing.hash_value(_normalized(tree)).hex()[:16]
        top = runtime.top
        key4 = (identity, version, input_hash, top.next_occurrence(identity, input_hash))
        if bad:
            self._warn(
                f"%%effect: variable {bad[0]!r} has no content hash, so this cell is not "
                "cached; pass its content (a path, an id) instead"
            )
            return self._run(tree)
        if not args.force:
            rec = top.lookup(key4, -1)
            if rec is not None:
                return self._replay(rec, key4, writes)
        t0, started = time.perf_counter(), runtime.clock.time()
        with _capture(self.shell) as out:  # type: ignore[arg-type]
            result = self._run(tree)
        self._record(key4, writes, out, result, started, time.perf_counter() - t0)
        return result

    def _warn(self, message: str) -> None:
        """A warning that points at the cell and shows every time the cell runs."""
        warnings.warn_explicit(message, UserWarning, self._filename(), 1, registry={})

    def _run(self, tree: ast.Module) -> Any:
        tree = _split_last_expression(tree)
        self.ns.pop(_RESULT, None)
        exec(compile(tree, self._filename(), "exec"), self.ns)
        return self.ns.pop(_RESULT, None)

    def _record(
        self,
        key4: tuple[str, str, str, int],
        writes: list[str],
        out: dict[str, Any],
        result: Any,
        started: float,
        duration: float,
    ) -> None:
        store, scope = runtime.store, runtime.top.scope_id
        recs: list[EffectRecord] = []
        stored: list[str] = []
        modules: dict[str, str] = {}
        for name in [*writes, _RESULT]:
            value = result if name == _RESULT else self.ns.get(name)
            if name != _RESULT and name not in self.ns:
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
                return
            recs.append(
                EffectRecord(
                    scope, key4[0] + "#" + name, *key4[1:], payload=payload, kind="cell-var"
                )
            )
            stored.append(name)
        summary = {
            "vars": [n for n in stored if n != _RESULT],
            "modules": modules,
            "stdout": out["stdout"],
            "stderr": out["stderr"],
            "displays": out["displays"],
            "duration": duration,
        }
        try:
            payload = _codecs.encode(json.loads(json.dumps(summary, default=str)), store.signer)
        except (TypeError, ValueError, UnstorableValueError):
            return
        recs.append(
            EffectRecord(
                scope, *key4, payload=payload, kind="cell", started_at=started, duration=duration
            )
        )
        store.put_effects(recs)

    def _replay(self, rec: EffectRecord, key4: tuple[str, str, str, int], writes: list[str]) -> Any:
        assert self.shell is not None
        store = runtime.store
        summary = _codecs.decode(rec.payload, store.signer)
        assert isinstance(summary, dict)
        values: dict[str, Any] = {}
        for name in [*summary["vars"], _RESULT]:
            var = store.get_effect((runtime.top.scope_id, key4[0] + "#" + name, *key4[1:]))
            if var is None:
                if name == _RESULT:
                    continue
                return self._run(ast.parse(""))  # pragma: no cover - a half-deleted record
            values[name] = _codecs.decode(var.payload, store.signer)
        for name, module in summary["modules"].items():
            values[name] = importlib.import_module(module)
        result = values.pop(_RESULT, None)
        self.ns.update(values)
        sys.stdout.write(summary["stdout"])
        sys.stderr.write(summary["stderr"])
        for data, metadata in summary["displays"]:
            self.shell.display_pub.publish(data, metadata)
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
        tree = _split_last_expression(tree)
        try:
            code = compile(tree, self._filename(), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        except SyntaxError as e:
            raise UsageError(f"the %%durable cell cannot run: {e.msg} (line {e.lineno})") from None
        ns = self.ns
        version = _hashing.hash_value(_normalized(tree)).hex()[:16]
        run_id = args.name or f"cell:{self.cell_id or version}"

        async def body(ctx: Any) -> Any:
            previous = ns.get("ctx", _MISSING)
            ns["ctx"] = ctx
            ns.pop(_RESULT, None)
            try:
                coro = eval(code, ns)
                if asyncio.iscoroutine(coro):
                    await coro
                return ns.pop(_RESULT, None)
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
                widget.attach(job)
            return job
        try:
            if widget is None:
                return start_run(
                    wf, (), {}, run_id=run_id, restart=args.restart, blocking=True
                ).result()
            return self._start_followed(wf, run_id, args.restart, widget).result()
        except DurableError as e:
            raise UsageError(str(e)) from None

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
            from .widgets import TraceWidget

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
        choices=["store", "runs", "show", "signal", "cancel", "forget", "cache"],
        help="What to do.",
    )
    @argument(
        "args",
        nargs="*",
        help="Its arguments: store [URL] | show RUN | "
        "signal RUN NAME [JSON] | cancel RUN | forget RUN | cache [clear]",
    )
    @line_magic("durable")  # type: ignore[arg-type]  # IPython types the name argument as Never
    def durable_line(self, line: str) -> Any:
        """Inspect and steer runs: %durable store [URL] | runs | show RUN |
        signal RUN NAME [JSON] | cancel RUN | forget RUN | cache [clear]"""
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
        from .engine import get_job

        get_job(run_id).signal(name, value)
        print(f"sent {name!r} to {run_id}")

    def _cancel(self, run_id: str) -> None:
        from .engine import cancel

        cancel(run_id, "cancelled with %durable cancel")
        print(f"cancel requested for {run_id}")

    def _forget(self, run_id: str) -> None:
        if not runtime.store.delete_run(run_id):
            raise UsageError(f"no run {run_id!r} in the store; list runs with %durable runs")
        print(f"forgot {run_id}")

    def _cache(self, action: str | None = None) -> None:
        scope = runtime.top.scope_id
        if action is None:
            n = sum(1 for r in runtime.store.load_effects(scope) if r.kind != "cell-var")
            print(f"{n} cached result(s) for this notebook ({scope})")
        elif action == "clear":
            n = runtime.store.delete_effects(scope)
            print(f"cleared {n} record(s) of this notebook ({scope})")
        else:
            raise UsageError(
                f"unknown %durable cache action {action!r}; type: %durable cache clear"
            )


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


# ---------------------------------------------------------------------------- load / unload

_loaded: dict[int, tuple[DurableMagics, Callable[..., None]]] = {}


def _notebook_name(ip: InteractiveShell) -> str:
    path = ip.user_ns.get("__vsc_ipynb_file__") or os.environ.get("JPY_SESSION_NAME")
    return str(path) if path else "interactive"


def load_ipython_extension(ip: InteractiveShell) -> None:
    if id(ip) in _loaded:
        return
    magics = DurableMagics(ip)
    ip.register_magics(magics)

    def pre_run_cell(info: Any = None) -> None:
        runtime.top.reset()
        magics.cell_id = getattr(info, "cell_id", None)

    ip.events.register("pre_run_cell", pre_run_cell)
    runtime.set_top_scope(_notebook_name(ip))
    _loaded[id(ip)] = (magics, pre_run_cell)


def unload_ipython_extension(ip: InteractiveShell) -> None:
    entry = _loaded.pop(id(ip), None)
    if entry is None:
        return
    magics, hook = entry
    ip.events.unregister("pre_run_cell", hook)
    for kind in ("cell", "line"):
        for name in list(magics.magics[kind]):
            ip.magics_manager.magics[kind].pop(name, None)
    ip.magics_manager.registry.pop(type(magics).__name__, None)
