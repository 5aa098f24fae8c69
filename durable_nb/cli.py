"""The ``durable-nb`` command: a thin layer over :class:`durable_nb.Client`.

Every command takes ``--store URL`` (before or after the command name; default
``$DURABLE_NB_STORE`` or ``.durable_nb/store.duckdb``), prints readable text, and with
``--json`` prints JSON for scripts. Exit codes: 0 success, 1 an error of durable_nb or of the
system (no such run, a run that executes, an unreadable file; the message says what to do),
2 misuse (a bad option or argument).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import errors
from ._journal import RUN_STATUSES
from .trace import format_run, format_runs, format_trace

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])

_STORE_HELP = (
    "Store to use: a DuckDB file path, :memory: or postgresql://... "
    "(default: $DURABLE_NB_STORE, else .durable_nb/store.duckdb)."
)


def _remember_store(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.ensure_object(dict)["store"] = value


def store_option(fn: F) -> F:
    """``--store`` on a command too, so it may follow the command name."""
    return click.option(
        "--store",
        metavar="URL",
        expose_value=False,
        callback=_remember_store,
        help=_STORE_HELP,
    )(fn)


def _client(ctx: click.Context, *, create: bool = False) -> Any:
    """The Client on the chosen store. A DuckDB path that does not exist is an error unless
    the command writes (``create``): a typo must not leave an empty store behind."""
    from .client import Client
    from .engine import runtime
    from .store import default_store_url

    url = (ctx.find_root().obj or {}).get("store") or default_store_url()
    local = url != ":memory:" and not url.startswith(("postgresql://", "postgres://"))
    if local and not create and not os.path.exists(os.path.expanduser(url)):
        raise errors.StoreUnavailableError(
            f"no store at {url!r}; run the command in the folder of the notebook that uses it, "
            "or pass --store PATH (or set DURABLE_NB_STORE)"
        )
    runtime.set_store(os.path.expanduser(url) if local else url)
    return Client()


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--store", metavar="URL", envvar="DURABLE_NB_STORE", default=None, help=_STORE_HELP)
@click.version_option(package_name="durable_nb")
@click.pass_context
def cli(ctx: click.Context, store: str | None) -> None:
    """Inspect and steer durable_nb runs in a store.

    Exit codes: 0 success, 1 an error (no such run, a run that executes, a store or file
    that cannot be used), 2 misuse of the command."""
    ctx.ensure_object(dict)
    if store is not None:
        ctx.obj["store"] = store


@cli.command()
@click.option("--status", type=click.Choice(RUN_STATUSES), help="Only runs in this status.")
@click.option("--workflow", metavar="NAME", help="Only runs of this workflow.")
@click.option(
    "--since",
    metavar="WHEN",
    help="Only runs updated at or after WHEN: a duration ago (30m, 12h, 7d) or an ISO date "
    "or date-time (2024-05-01, 2024-05-01T12:00).",
)
@click.option("--until", metavar="WHEN", help="Only runs updated before WHEN (as --since).")
@click.option("--parent", metavar="RUN", help="Only the child runs of RUN.")
@click.option(
    "--limit", type=click.IntRange(min=1), default=100, show_default=True, help="At most N runs."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of runs.")
@store_option
@click.pass_context
def runs(
    ctx: click.Context,
    status: str | None,
    workflow: str | None,
    since: str | None,
    until: str | None,
    parent: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List runs, newest first."""
    from .client import parse_time

    for name, value in (("--since", since), ("--until", until)):
        if value is not None:
            try:
                parse_time(value)
            except errors.ArgumentError as e:
                raise click.BadParameter(str(e), param_hint=name) from None
    rows = _client(ctx).runs(
        status=status, workflow=workflow, since=since, until=until, parent=parent, limit=limit
    )
    if as_json:
        _echo_json(rows)
    else:
        click.echo(format_runs(rows))


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the run and its steps as JSON.")
@store_option
@click.pass_context
def show(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Show a run: status, what it waits on, custom status, children and its steps."""
    info = _client(ctx).run(run_id)
    if as_json:
        _echo_json(info)
    else:
        click.echo(format_run(info))


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the trace data (the run, steps, events) as JSON."
)
@store_option
@click.pass_context
def trace(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Show a run's timeline: every step (executed, replayed or failed, with its attempts and
    duration) and every event, in time order."""
    data = _client(ctx).trace(run_id)
    if as_json:
        _echo_json(data)
    else:
        click.echo(format_trace(data))


def _tree_lines(
    node: dict[str, Any], prefix: str = "", last: bool = True, top: bool = True
) -> list[str]:
    label = f"{node['run_id']}  {node['status']}  {node['workflow']}"
    lines = [label if top else f"{prefix}{'└─ ' if last else '├─ '}{label}"]
    inner = "" if top else prefix + ("   " if last else "│  ")
    kids = node["children"]
    for i, kid in enumerate(kids):
        lines += _tree_lines(kid, inner, i == len(kids) - 1, top=False)
    return lines


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="Print the nested tree as JSON.")
@store_option
@click.pass_context
def tree(ctx: click.Context, run_id: str, as_json: bool) -> None:
    """Show a run and its child runs, nested."""
    data = _client(ctx).tree(run_id)
    if as_json:
        _echo_json(data)
    else:
        click.echo("\n".join(_tree_lines(data)))


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.argument("name")
@click.argument("payload", metavar="[JSON]", required=False, default="null")
@store_option
@click.pass_context
def signal(ctx: click.Context, run_id: str, name: str, payload: str) -> None:
    """Send signal NAME with a JSON payload to a run (delivered once, in order; default null)."""
    try:
        value = json.loads(payload)
    except ValueError as e:
        raise click.BadParameter(
            f"{payload!r} is not JSON ({e}); quote strings: '\"yes\"', or pass true / 42 / "
            "'{\"k\": 1}'",
            param_hint="JSON",
        ) from None
    _client(ctx).signal(run_id, name, value)
    click.echo(f"sent {name!r} to {run_id}")


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--reason", default="cancelled from the command line", show_default=True)
@store_option
@click.pass_context
def cancel(ctx: click.Context, run_id: str, reason: str) -> None:
    """Cancel a run: one that a process executes stops at its next await and runs its finally
    blocks; one that no process executes is marked cancelled at once."""
    c = _client(ctx)
    c.cancel(run_id, reason)
    status = c.run(run_id)["status"]
    if status == "cancelled":
        click.echo(f"cancelled {run_id}")
    elif status in ("completed", "failed"):
        click.echo(f"{run_id} had already ended ({status}); nothing to cancel")
    else:
        click.echo(f"cancel requested for {run_id}; the process that executes it will stop it")


_APP_HELP = (
    "Execute it here, with the @durable workflows of MODULE (a dotted name or a .py path; "
    "repeatable), and print its result; without --app it is queued for a worker."
)


def _execute_here(modules: tuple[str, ...], start: Callable[[], Any], as_json: bool) -> None:
    """Import the workflows of ``modules`` and wait for the run ``start()`` returns; print its
    result (an error of the run is the command's error)."""
    from .worker import load_workflows

    load_workflows(list(modules))
    job = start()
    result = job.result()
    if as_json:
        _echo_json({"run_id": job.run_id, "status": "completed", "result": result})
    else:
        click.echo(f"{job.run_id} completed: {json.dumps(result, default=repr)}")


def _queued(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _echo_json(info)
    elif info["status"] == "completed":
        click.echo(f"{info['run_id']} had already completed; nothing to resume")
    else:
        click.echo(
            f"queued {info['run_id']} for a worker; `durable-nb worker MODULE` serves workflow "
            f"{info['workflow']!r} from the module that defines it"
        )


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--app", "modules", metavar="MODULE", multiple=True, help=_APP_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the run (or its result) as JSON.")
@store_option
@click.pass_context
def resume(ctx: click.Context, run_id: str, modules: tuple[str, ...], as_json: bool) -> None:
    """Resume a cancelled, failed or interrupted run from its history: finished steps replay,
    the rest execute, a cancellation is cleared. A completed run keeps its result; a run that
    a process executes is an error naming that process."""
    c = _client(ctx)
    if modules:
        from .engine import resume as resume_run

        _execute_here(modules, lambda: resume_run(run_id), as_json)
        return
    _queued(c.resume(run_id), as_json)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option(
    "--from-step",
    "from_step",
    type=click.IntRange(min=0),
    required=True,
    help="The first step that executes again (the SEQ column of `durable-nb trace RUN`); "
    "the steps before it replay from RUN's records.",
)
@click.option("--run-id", "new_id", metavar="ID", help="The fork's run id (default: RUN@N-<hex>).")
@click.option(
    "--no-signals",
    is_flag=True,
    help="Do not send the fork the signals RUN received from step N on (or has not consumed).",
)
@click.option("--app", "modules", metavar="MODULE", multiple=True, help=_APP_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the fork (or its result) as JSON.")
@store_option
@click.pass_context
def fork(
    ctx: click.Context,
    run_id: str,
    from_step: int,
    new_id: str | None,
    no_signals: bool,
    modules: tuple[str, ...],
    as_json: bool,
) -> None:
    """Fork a run from a step: a new run of the same workflow and arguments whose steps before
    N replay from RUN's records and whose steps from N on execute. RUN and its child runs are
    not changed."""
    c = _client(ctx)
    if modules:
        from .engine import fork as fork_run

        _execute_here(
            modules,
            lambda: fork_run(run_id, from_step=from_step, run_id=new_id, signals=not no_signals),
            as_json,
        )
        return
    info = c.fork(run_id, from_step, new_id=new_id, signals=not no_signals)
    if as_json:
        _echo_json(info)
    else:
        click.echo(
            f"forked {run_id} from step {from_step} as {info['run_id']}, queued for a worker; "
            f"`durable-nb worker MODULE` serves workflow {info['workflow']!r}"
        )


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option(
    "--keep-children", is_flag=True, help="Delete only RUN, not its child runs (the default)."
)
@store_option
@click.pass_context
def forget(ctx: click.Context, run_id: str, keep_children: bool) -> None:
    """Delete a run with its recorded steps, signals and events, and its child runs."""
    n = _client(ctx).delete(run_id, children=not keep_children)
    more = f" and {n - 1} child run(s)" if n > 1 else ""
    click.echo(f"forgot {run_id}{more}")


@cli.command()
@click.option(
    "--older-than",
    "older_than",
    metavar="AGE",
    default="7d",
    show_default=True,
    help="Prune what was not touched for AGE: seconds, or 45s, 30m, 12h, 7d, 2w.",
)
@click.option(
    "--status",
    "statuses",
    type=click.Choice(RUN_STATUSES),
    multiple=True,
    help="Prune runs in this status (repeatable; default: completed, failed and cancelled).",
)
@click.option("--keep-runs", is_flag=True, help="Prune cached effects only.")
@click.option("--keep-effects", is_flag=True, help="Prune runs only.")
@click.option("--dry-run", is_flag=True, help="Count what would be pruned; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@store_option
@click.pass_context
def gc(
    ctx: click.Context,
    older_than: str,
    statuses: tuple[str, ...],
    keep_runs: bool,
    keep_effects: bool,
    dry_run: bool,
    as_json: bool,
) -> None:
    """Prune finished runs last updated longer ago than --older-than (with everything they
    own), and cached effects (of notebooks and scripts, and shared ones) recorded before then.
    Runs that a process executes are kept."""
    from .client import parse_duration
    from .store import FINAL_STATUSES

    try:
        parse_duration(older_than)
    except errors.ArgumentError as e:
        raise click.BadParameter(str(e), param_hint="--older-than") from None
    out = _client(ctx).gc(
        older_than,
        runs=not keep_runs,
        effects=not keep_effects,
        statuses=statuses or FINAL_STATUSES,
        dry_run=dry_run,
    )
    if as_json:
        _echo_json(out)
        return
    top = "an unknown number of" if out["top_effects"] is None else str(out["top_effects"])
    verb = "would delete" if dry_run else "deleted"
    click.echo(
        f"{verb} {out['runs']} run(s), {top} cached effect(s) of notebooks and scripts and "
        f"{out['shared_effects']} shared cached effect(s), untouched since {_when(out['cutoff'])}"
    )
    if dry_run and out["top_effects"] is None:
        click.echo("(the store cannot count notebooks' cached effects without deleting them)")


@cli.command()
@click.argument("run_ids", metavar="[RUN]...", nargs=-1)
@click.option(
    "-o",
    "--output",
    metavar="FILE",
    default="-",
    show_default=True,
    help="Write to FILE ('-': standard output).",
)
@click.option("--no-children", is_flag=True, help="Leave out the child runs of the runs named.")
@click.option(
    "--no-effects", is_flag=True, help="Leave out cached effects (shared and --scope ones)."
)
@click.option(
    "--scope",
    "scopes",
    metavar="SCOPE",
    multiple=True,
    help="Also export the cached effects of this scope: top/<notebook or script path> "
    "(repeatable; shared cached effects are always exported unless --no-effects).",
)
@store_option
@click.pass_context
def export(
    ctx: click.Context,
    run_ids: tuple[str, ...],
    output: str,
    no_children: bool,
    no_effects: bool,
    scopes: tuple[str, ...],
) -> None:
    """Export runs (all, or RUN... with their child runs) with their steps, signals and
    events, and cached effects, as JSON lines for `durable-nb import` into another store."""
    c = _client(ctx)
    ids = list(run_ids) or None
    kwargs = {"children": not no_children, "include_effects": not no_effects, "scopes": scopes}
    if output == "-":
        counts = c.export(sys.stdout, ids, **kwargs)
        sys.stdout.flush()
    else:
        counts = c.export(output, ids, **kwargs)
    click.echo(
        f"exported {counts['runs']} run(s), {counts['effects']} effect(s), "
        f"{counts['signals']} signal(s), {counts['events']} event(s)"
        + (f" to {output}" if output != "-" else ""),
        err=output == "-",
    )


@cli.command("import")
@click.argument("file", metavar="FILE")
@click.option(
    "--source-key-file",
    metavar="PATH",
    type=click.Path(exists=True, dir_okay=False),
    help="The signing key of the store that exported FILE (a DuckDB store keeps it in "
    "<store>.d/key), to verify its pickled values and sign them again with this store's key.",
)
@click.option(
    "--replace",
    is_flag=True,
    help="Replace runs this store has even when they are as recent as the imported ones.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@store_option
@click.pass_context
def import_(
    ctx: click.Context, file: str, source_key_file: str | None, replace: bool, as_json: bool
) -> None:
    """Import runs and cached effects from FILE (made by `durable-nb export`; '-' reads
    standard input). Runs this store has in a state at least as recent are kept."""
    key = None
    if source_key_file is not None:
        with open(source_key_file, "rb") as f:
            key = f.read()
    c = _client(ctx, create=True)
    if file == "-":
        counts = c.import_records(sys.stdin, source_key=key, replace=replace)
    else:
        if not os.path.exists(file):
            raise click.BadParameter(f"no file {file!r}", param_hint="FILE")
        counts = c.import_records(file, source_key=key, replace=replace)
    if as_json:
        _echo_json(counts)
        return
    click.echo(
        f"imported {counts['runs']} run(s) ({counts['skipped_runs']} already there and kept), "
        f"{counts['effects']} effect(s), {counts['signals']} signal(s), "
        f"{counts['events']} event(s)"
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@store_option
@click.pass_context
def metrics(ctx: click.Context, as_json: bool) -> None:
    """Count runs by status and workflow, the steps executed and replayed, and what was
    spent and what replay saved (time, and the tokens LLM calls used) overall, per model and
    per notebook; --json adds per run."""
    m = _client(ctx).metrics()
    if as_json:
        _echo_json(m)
        return
    statuses = ", ".join(f"{k} {v}" for k, v in m["by_status"].items() if v)
    flows = ", ".join(f"{k} {v}" for k, v in m["by_workflow"].items())
    lines = [
        f"runs        {m['runs']}" + (f" ({statuses})" if statuses else ""),
        f"workflows   {flows or '-'}",
        f"executions  {m['executions']} ({m['executions_ended']} ended)",
        f"steps       {m['steps_executed']} executed, {m['steps_replayed']} replayed",
        f"time        {m['spent_seconds']:.3f} s spent, {m['saved_seconds']:.3f} s saved by replay",
    ]
    t = m["tokens"]
    if t["prompt"] or t["completion"]:
        lines.append(f"tokens      {_spent_saved(m['tokens'], m['tokens_saved'])}")
        lines.append("per model")
        lines += [
            f"  {model}  {_spent_saved(v['tokens'], v['tokens_saved'])}; "
            f"{v['spent_seconds']:.3f} s spent"
            for model, v in m["by_model"].items()
        ]
    if m["by_notebook"]:
        lines.append("per notebook")
        for name, v in m["by_notebook"].items():
            tokens = v["tokens"]
            spent = (
                f"tokens {_spent_saved(tokens, v['tokens_saved'])}; "
                if tokens["prompt"] or tokens["completion"]
                else ""
            )
            lines.append(
                f"  {name}  {spent}{v['spent_seconds']:.3f} s spent, "
                f"{v['saved_seconds']:.3f} s saved"
            )
    click.echo("\n".join(lines))


def _spent_saved(spent: dict[str, int], saved: dict[str, int]) -> str:
    """``1200 prompt + 300 completion spent, 400 + 100 saved by replay``."""
    text = f"{spent['prompt']} prompt + {spent['completion']} completion spent"
    if saved["prompt"] or saved["completion"]:
        text += f", {saved['prompt']} + {saved['completion']} saved by replay"
    return text


@cli.command()
@click.argument("modules", metavar="MODULE...", nargs=-1, required=True)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Runs executed at once by this worker.",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds runs in progress get to finish after SIGTERM before they are interrupted "
    "(released, resumable by another worker).",
)
@click.option("--name", default=None, help="How this worker shows as a lease holder.")
@store_option
@click.pass_context
def worker(
    ctx: click.Context, modules: tuple[str, ...], concurrency: int, grace: float, name: str | None
) -> None:
    """Execute runs started with dn.start(..., on="worker") for the @durable workflows
    defined in MODULE... (dotted names or .py paths), until SIGTERM or Ctrl-C. Several workers,
    on one machine or many, share a store's runs; each run has one executor at a time and a
    dead worker's runs are taken over when its leases expire."""
    from .worker import Worker

    _client(ctx)  # the store, checked like every command's
    w = Worker(list(modules), concurrency=concurrency, grace=grace, name=name)
    click.echo(
        f"{w.name}: serving {', '.join(sorted(w.workflows))} from {w.store.url} "
        f"(concurrency {concurrency}); stop with SIGTERM or Ctrl-C",
        err=True,
    )
    w.run()
    click.echo(f"{w.name}: stopped after {w.finished} run(s)", err=True)


@cli.command("install-kernel")
@click.option(
    "--user", is_flag=True, help="For the current user, where any Jupyter finds it (the default)."
)
@click.option(
    "--sys-prefix",
    is_flag=True,
    help="Into this Python environment (sys.prefix), for a Jupyter installed in it.",
)
@click.option(
    "--prefix",
    type=click.Path(file_okay=False),
    help="Under PREFIX/share/jupyter/kernels (Jupyter must have PREFIX/share/jupyter on its path).",
)
@click.option(
    "--name",
    default="durable",
    show_default=True,
    help="Name of the kernel spec; an existing spec of that name is replaced.",
)
def install_kernel(user: bool, sys_prefix: bool, prefix: str | None, name: str) -> None:
    """Install the "Python 3 (durable)" Jupyter kernel: this Python with durable_nb loaded at
    start, so %%effect, %%durable and %durable work without %load_ext."""
    from . import _kernelspec

    if user + sys_prefix + (prefix is not None) > 1:
        raise click.UsageError("choose one of --user, --sys-prefix and --prefix")
    if not re.fullmatch(r"[a-zA-Z0-9._-]+", name):
        raise click.BadParameter(
            f"{name!r} is not a kernel name; use letters, digits, '-', '.' and '_'",
            param_hint="--name",
        )
    if sys_prefix:
        prefix = sys.prefix
    where, found = _kernelspec.install(name=name, user=prefix is None, prefix=prefix)
    click.echo(f"installed kernel {_kernelspec.DISPLAY_NAME!r} as {name.lower()!r} in {where}")
    click.echo(f"it runs {_kernelspec.interpreter()} with durable_nb loaded")
    if not found:
        share = os.path.dirname(os.path.dirname(where))
        click.echo(
            f"note: Jupyter does not look in {share}; add it to JUPYTER_PATH to use the kernel",
            err=True,
        )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 misuse)."""
    try:
        cli.main(args=argv, prog_name="durable-nb", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.ClickException as e:
        e.show()
        return 2 if isinstance(e, click.UsageError) else 1
    except errors.DurableError as e:
        click.echo(f"error: {e}", err=True)
        return 1
    except OSError as e:
        click.echo(f"error: {e}", err=True)
        return 1
    finally:
        from .engine import runtime

        runtime.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
